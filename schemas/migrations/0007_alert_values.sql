-- Issue #17: a series' value rules are judged together (ingest.alerts.stage). The series has one
-- alert_state row with rule '*value' (no rule name starts with '*') that carries what its value rules
-- share: the last reading judged (last_time, last_value), what waits (due_at, due_to), when a reading
-- last arrived (seen_at) and the fingerprint of the value rules that judged it (version). A value rule
-- has a row of its own only once its state has left ok: with 20 threshold rules on a metric, a batch
-- locks and updates one row per series instead of 20.

-- The rows of the rules that are not ok, found by series (the judgement reads them under lock).
CREATE INDEX alert_state_open ON alert_state (device_id, metric_id) WHERE status <> 'ok';

-- The shared rows of the series judged before this migration, from the rows of their rules: judged as
-- far as the furthest of them (their readings at or before it are not judged again), with what waits.
-- A series with only rules of other kinds gets one too; it holds nothing and goes at its first
-- judgement.
INSERT INTO alert_state (rule, device_id, metric_id, status, last_time, due_at, due_to, seen_at)
SELECT '*value', device_id, metric_id, 'ok', max(last_time), min(due_at), max(due_to), max(seen_at)
FROM alert_state
WHERE metric_id <> 0
GROUP BY device_id, metric_id
ON CONFLICT DO NOTHING;
