-- Issue #17: workers that drain a backlog together judge what one worker judges (ingest/alerts/catchup.py).
--
-- After an outage the broker holds part of every device's queue for each worker's session. While one
-- worker still drains its part, another's stored readings of a series are newer than readings still
-- on their way: judged past them, those would come late. Each worker therefore writes, several times
-- a second, whether it has caught up (connected, and nothing of a backlog at the broker or
-- uncommitted); while any worker has not, no worker judges, so that a series is judged once all of
-- its readings are stored.

CREATE TABLE alert_sessions (
    client_id    text        PRIMARY KEY,  -- the worker's MQTT client id (its broker session)
    seen_at      timestamptz NOT NULL,     -- the worker's last write (its clock)
    caught_up_at timestamptz,              -- its last write while caught up; NULL: not caught up since it
                                           -- first wrote (what its session held is unknown)
    behind_since timestamptz,              -- since when it has been catching up; NULL: caught up
    stopped_at   timestamptz               -- it stopped cleanly then (NULL: running, or it died)
);
