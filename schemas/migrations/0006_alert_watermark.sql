-- Issue #16: rule kinds over stored rows (rate, windows, no data) and one outcome whatever the number
-- of workers (ingest/alerts/stage.py, ingest/alerts/evaluator.py, ingest/alerts/versions.py).
--
-- A series is judged from the stored readings, in event-time order, up to a watermark (the clock
-- minus alerts.lateness), under its alert_state row lock. A batch that stores readings of a series
-- sets its due_at (the watermark its earliest waiting reading needs); the batch itself judges what is
-- due already, and each worker's evaluator judges the rest once the watermark has passed it, taking
-- the due rows with FOR UPDATE SKIP LOCKED.

ALTER TABLE alert_state
    ADD COLUMN evaluated_to timestamptz,  -- clock windows: the end of the last window judged
    ADD COLUMN due_at       timestamptz,  -- the watermark the next judgement needs; NULL: nothing waits
    ADD COLUMN due_to       timestamptz,  -- the latest reading waiting (a per-device no_data rule is judged
                                          -- from due_at and due_to alone, not by reading back)
    ADD COLUMN version      text,         -- the fingerprint of the rule that judged the series last
    ADD COLUMN seen_at      timestamptz;  -- when a reading of the series last arrived (the service's clock)

-- The evaluator's scan: the series with readings waiting.
CREATE INDEX alert_state_due ON alert_state (due_at) WHERE due_at IS NOT NULL;

-- Each running worker's versions of the rules (rule name -> fingerprint), refreshed every few seconds:
-- a series judged by one version is left to it while a live worker still holds that version, and
-- taken over by the newer one when every live worker has it (or no live worker holds the old one).
CREATE TABLE alert_workers (
    worker     text        PRIMARY KEY,   -- host:pid:client id
    versions   jsonb       NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT alert_workers_versions CHECK (jsonb_typeof(versions) = 'object')
);
