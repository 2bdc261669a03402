-- sensor-ingest core storage contract (see DESIGN.md "Storage contract").
-- Applied by `sensor-ingest migrate` in one transaction; recorded in schema_migrations.
-- Identifiers never come from payloads: devices and metrics are rows, not tables or columns.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE devices (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid         text NOT NULL UNIQUE,          -- the device id as captured, verbatim (plus a source prefix)
    make        text,
    model       text,
    attributes  jsonb NOT NULL DEFAULT '{}',   -- e.g. {"district": "Hoan Kiem", "lat": 21.03, "lon": 105.85}
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz,
    CONSTRAINT devices_uid_sane CHECK (length(uid) BETWEEN 1 AND 256)
);

CREATE TABLE metrics (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    unit        text,
    kind        text NOT NULL DEFAULT 'number',
    valid_min   double precision,               -- outside [valid_min, valid_max]: rejected
    valid_max   double precision,
    description text,
    CONSTRAINT metrics_kind CHECK (kind IN ('number', 'bool', 'state')),
    CONSTRAINT metrics_name_sane CHECK (length(name) BETWEEN 1 AND 256)
);

-- Numeric readings (booleans as 1/0). No foreign keys: ids come from devices/metrics through the
-- service's id cache, and a per-row FK check would halve the COPY rate of the hot path.
CREATE TABLE readings (
    time       timestamptz      NOT NULL,
    device_id  integer          NOT NULL,
    metric_id  integer          NOT NULL,
    value      double precision NOT NULL,
    flags      smallint         NOT NULL DEFAULT 0   -- 1: suspect value, 2: receive time substituted
);
SELECT create_hypertable('readings', by_range('time', INTERVAL '1 day'), create_default_indexes => false);
-- The one index: it is the deduplication key that makes redelivery harmless, and it serves
-- per-series queries.
CREATE UNIQUE INDEX readings_key ON readings (device_id, metric_id, time);

-- Text readings (from an explicit string slot only).
CREATE TABLE states (
    time       timestamptz NOT NULL,
    device_id  integer     NOT NULL,
    metric_id  integer     NOT NULL,
    value      text        NOT NULL,
    flags      smallint    NOT NULL DEFAULT 0
);
SELECT create_hypertable('states', by_range('time', INTERVAL '7 days'), create_default_indexes => false);
CREATE UNIQUE INDEX states_key ON states (device_id, metric_id, time);

-- Every message that was not stored as readings, with its raw bytes, so it can be replayed once
-- the mapping is fixed. A hypertable on received time so that retention can drop old chunks.
CREATE TABLE rejected_messages (
    received_at  timestamptz NOT NULL,
    id           bigint GENERATED ALWAYS AS IDENTITY,
    source       text,
    topic        text        NOT NULL,
    payload      bytea       NOT NULL,
    reason       text        NOT NULL,   -- short stable code: malformed, schema, wrong_type, bad_time, ...
    detail       text        NOT NULL,   -- what is wrong and where, in words
    device_uid   text,
    replayed_at  timestamptz
);
SELECT create_hypertable('rejected_messages', by_range('received_at', INTERVAL '1 day'));
CREATE INDEX rejected_messages_reason ON rejected_messages (reason, received_at DESC);
