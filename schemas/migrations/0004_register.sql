-- Issue #15: the device register, calibrations, replay of quarantined messages, data quality.

-- The register: make, model (0001), the source that first wrote the device (or the import's), and the
-- interval at which it is expected to report, for completeness and staleness (ingest.quality).
ALTER TABLE devices
    ADD COLUMN source            text,
    ADD COLUMN expected_interval double precision,   -- seconds; NULL: the source's, else learned
    ADD CONSTRAINT devices_expected_interval CHECK (expected_interval > 0);

-- Per device and metric, an affine correction applied on ingest to readings at or after
-- effective_from: stored value = value * scale + offset_value (after the catalog's unit conversion).
--
-- Its span runs to the next calibration of the series. Rewriting the stored readings of the span when
-- a calibration is added or corrected for a past time (ingest.store.calibration): the readings of
-- [effective_from, rewrite_cursor) carry this calibration; those at or after rewrite_cursor still carry
-- (from_scale, from_offset), the one they were stored with, and are rewritten in bounded transactions
-- that move the cursor, the last of which takes all that is left and sets it NULL. rewrite_cursor NULL:
-- every reading of the span carries this calibration. The writer applies the same rule to new readings,
-- under the shared side of the lock that each rewriting transaction takes exclusively, so that a reading
-- is rewritten exactly once whatever ingest does meanwhile.
CREATE TABLE calibrations (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id      integer          NOT NULL REFERENCES devices (id),
    metric_id      integer          NOT NULL REFERENCES metrics (id),
    effective_from timestamptz      NOT NULL,
    scale          double precision NOT NULL,
    offset_value   double precision NOT NULL,
    comment        text,
    from_scale     double precision NOT NULL DEFAULT 1,
    from_offset    double precision NOT NULL DEFAULT 0,
    rewrite_cursor timestamptz,
    rewritten      bigint           NOT NULL DEFAULT 0,   -- readings rewritten to this calibration so far
    created_at     timestamptz      NOT NULL DEFAULT now(),
    updated_at     timestamptz      NOT NULL DEFAULT now(),
    UNIQUE (device_id, metric_id, effective_from),
    CONSTRAINT calibrations_scale CHECK (scale <> 0 AND from_scale <> 0),
    CONSTRAINT calibrations_finite CHECK (scale::text NOT IN ('NaN', 'Infinity', '-Infinity')
                                          AND offset_value::text NOT IN ('NaN', 'Infinity', '-Infinity'))
);

-- Bumped by every change to calibrations, in the changing transaction: a writer whose cached
-- calibrations are of an older epoch reads them again, inside its own transaction.
CREATE TABLE calibration_epoch (
    one   boolean PRIMARY KEY DEFAULT true CHECK (one),
    epoch bigint  NOT NULL
);
INSERT INTO calibration_epoch VALUES (true, 0);

-- The writer's call, once per batch with numeric readings: waits for a rewriting transaction in
-- progress (the lock's exclusive side), then returns the epoch as of after it. plpgsql: the SELECT
-- takes its snapshot after the lock is granted (in one plain SQL statement it would be taken before).
CREATE FUNCTION sensor_ingest_calibration_epoch() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7215150001);
    RETURN (SELECT epoch FROM calibration_epoch);
END
$$;

-- Replay (sensor-ingest replay): the outcome of a row's replay. replayed_at (0001) set and
-- replay_reason NULL: its readings were stored; replay_reason set: still rejected, and why.
ALTER TABLE rejected_messages
    ADD COLUMN replay_reason text,
    ADD COLUMN replay_detail text;
CREATE INDEX rejected_messages_id ON rejected_messages (id);
CREATE INDEX rejected_messages_device ON rejected_messages (device_uid, received_at DESC);
