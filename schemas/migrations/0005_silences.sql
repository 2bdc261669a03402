-- Issue #16: silences and acknowledgements, stored in the database (`sensor-ingest silences ...`,
-- `sensor-ingest alerts ack`; ingest/alerts/silence.py, ingest/alerts/silence_cli.py).
--
-- A silence holds back the firing notification of a new episode whose event it matches while it is
-- active: the event is recorded (alert_events.silenced_by) with no outbox row, and its would-be
-- outbox rows wait in alert_held. When no active silence matches the series any more and it still
-- fires that episode, the end-of-silence job moves them to alert_outbox (the same event, the same
-- bodies); a held episode that resolved meanwhile sends nothing. When the silence ends and another
-- active silence matches, the hold passes to it (alert_held.silenced_by).

CREATE TABLE silences (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule        text,                                  -- the rule's name; NULL: any rule
    device      text,                                  -- a glob on devices.uid (* and ?); NULL: any device
    labels      jsonb       NOT NULL DEFAULT '{}',     -- {"k": "v", ...}: each must equal the event's label k
    starts_at   timestamptz NOT NULL DEFAULT now(),
    ends_at     timestamptz NOT NULL,                  -- --until
    comment     text        NOT NULL,
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expired_at  timestamptz,                           -- `silences expire`: ended early, at this time
    CONSTRAINT silences_matcher CHECK (rule IS NOT NULL OR device IS NOT NULL OR labels <> '{}'::jsonb),
    CONSTRAINT silences_labels CHECK (jsonb_typeof(labels) = 'object'),
    CONSTRAINT silences_span CHECK (ends_at > starts_at),
    CONSTRAINT silences_comment CHECK (comment <> '')
);
-- The stage reads the silences active at its clock once per batch with a young firing event.
CREATE INDEX silences_ends ON silences (ends_at);

-- The silence that held an event back (NULL: none). A held firing event gets notified = true and
-- released_at when the end-of-silence job enqueues it; a resolved event of a held episode keeps
-- notified = false (its firing was never sent).
ALTER TABLE alert_events
    ADD COLUMN silenced_by bigint REFERENCES silences (id),
    ADD COLUMN released_at timestamptz;
-- For `silences list` (the events each silence held back) and the foreign key. Built without
-- CONCURRENTLY (a migration runs in one transaction): it blocks writes to alert_events, so the alert
-- stage of a running service, while it scans the table (every row is NULL here: the index is empty,
-- the scan is the cost); on a large alert_events run `sensor-ingest migrate` in a quiet moment.
CREATE INDEX alert_events_silenced ON alert_events (silenced_by) WHERE silenced_by IS NOT NULL;

-- A firing notification held back: at most one per series, the firing event of its current episode.
-- ``outbox`` holds the rows the stage built for it, [[webhook, series, body], ...], so that the job
-- enqueues exactly what would have been sent. Written by the stage and by the job only under the row
-- lock of the series' alert_state row (the job locks only the rows it may change, in the stage's order,
-- skipping those a batch holds).
CREATE TABLE alert_held (
    rule        text        NOT NULL,
    device_id   integer     NOT NULL,
    metric_id   integer     NOT NULL,
    event_id    bigint      NOT NULL REFERENCES alert_events (id),
    starts_at   timestamptz NOT NULL,   -- the episode's start: held while alert_state fires this episode
    silenced_by bigint      NOT NULL REFERENCES silences (id),
    labels      jsonb       NOT NULL,   -- the event's labels, which later silences are matched against
    outbox      jsonb       NOT NULL,
    PRIMARY KEY (rule, device_id, metric_id)
);
-- The stage and the job delete holds by event id; each event is held at most once.
CREATE UNIQUE INDEX alert_held_event ON alert_held (event_id);
-- What each silence holds now (`silences list`), and the foreign key to silences.
CREATE INDEX alert_held_silence ON alert_held (silenced_by);

-- Acknowledgements: one per episode of a series (a second ack of the same episode replaces the
-- first). An ack is in force while the series fires the episode it names (alert_state.episode_start
-- = episode_start); the next episode is not acknowledged. They change no delivery: a note for the
-- other operators, kept as history.
CREATE TABLE alert_acks (
    rule          text        NOT NULL,
    device_id     integer     NOT NULL,
    metric_id     integer     NOT NULL,
    episode_start timestamptz NOT NULL,
    acked_by      text        NOT NULL,
    comment       text        NOT NULL,
    acked_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule, device_id, metric_id, episode_start),
    CONSTRAINT alert_acks_comment CHECK (comment <> '')
);
