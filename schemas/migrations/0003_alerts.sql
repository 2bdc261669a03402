-- Issue #14: threshold alerts. Their state, their events and the outbox of webhook deliveries are
-- written in the same transaction as the readings that caused them (ingest.store.writer), so that a
-- crash neither loses nor repeats an event; the dispatcher (ingest.alerts.dispatch) delivers the
-- outbox with its own connections.

-- One row per series a rule has evaluated: (rule, device, metric).
CREATE TABLE alert_state (
    rule          text             NOT NULL,
    device_id     integer          NOT NULL,
    metric_id     integer          NOT NULL,
    status        text             NOT NULL,   -- ok, pending (condition true, `for` not yet elapsed), firing
    episode_start timestamptz,                 -- event time the condition became true (pending, firing)
    last_time     timestamptz,                 -- event time of the last reading evaluated (NULL: none yet)
    last_value    double precision,
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (rule, device_id, metric_id),
    CONSTRAINT alert_state_status CHECK (status IN ('ok', 'pending', 'firing'))
);

-- Every firing and resolved event, notified or not (an episode older than alerts.max_notify_age
-- when it is recorded is history, not news).
CREATE TABLE alert_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule        text             NOT NULL,
    device_id   integer          NOT NULL,
    metric_id   integer          NOT NULL,
    status      text             NOT NULL,   -- firing, resolved
    event_time  timestamptz      NOT NULL,   -- the reading's time that caused it
    starts_at   timestamptz      NOT NULL,   -- the episode's start
    value       double precision NOT NULL,
    threshold   double precision NOT NULL,
    severity    text             NOT NULL,
    notified    boolean          NOT NULL,
    created_at  timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT alert_events_status CHECK (status IN ('firing', 'resolved'))
);
CREATE INDEX alert_events_series ON alert_events (rule, device_id, metric_id, id);
CREATE INDEX alert_events_created ON alert_events (created_at DESC);

-- One row per (event, webhook). The dispatcher takes the oldest pending row of each (webhook,
-- series) under a lease, so a resolved event never overtakes its firing event.
CREATE TABLE alert_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,   -- webhook-id: "msg_<id>"
    event_id        bigint      NOT NULL REFERENCES alert_events (id),
    webhook         text        NOT NULL,
    series          text        NOT NULL,   -- "<rule>\x1f<device_id>\x1f<metric_id>": the order key
    body            jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'pending',   -- pending, delivered, failed
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_status     integer,                -- the receiver's last HTTP status
    last_error      text,
    CONSTRAINT alert_outbox_status CHECK (status IN ('pending', 'delivered', 'failed'))
);
CREATE INDEX alert_outbox_pending ON alert_outbox (webhook, series, id) WHERE status = 'pending';
CREATE INDEX alert_outbox_failed ON alert_outbox (created_at DESC) WHERE status = 'failed';
