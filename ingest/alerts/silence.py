"""Silences: what they match, what the writer's alert stage holds back, and the end-of-silence job.

What a silence matches. Each of its matchers must hold: ``rule`` equals the rule's name; ``device``,
a glob on the device id as stored (devices.uid; ``*`` any run of characters, ``?`` one, nothing else
is special), matches; and each label ``k=v`` equals the event's label ``k``. An event's labels are
the device's attributes (scalar ones, as text the way a rule's ``where`` reads them: true, 3,
hoan-kiem), overridden by the rule's ``labels``, overridden by the event's own: ``alertname`` and
``rule`` (the rule's name), ``device``, ``metric`` and ``severity`` (the labels of the Alertmanager
body). So ``--label district=hoan-kiem`` silences a district's devices, ``--label team=hydro`` a
team's rules.

When. A silence is active from starts_at (inclusive) until ends_at or expired_at, whichever is
first (exclusive), judged at the stage's clock when an event is recorded: a silence is about
notifications now, not about the readings' event time.

What is held back. The firing event of a new episode that an active silence matches, when it is
young enough to be notified at all (alerts.max_notify_age): it is recorded with notified = false
and silenced_by = the matching silence (the oldest, when several match) and gets no outbox row; the
rows the stage built for it wait in alert_held. The resolved event of a held episode follows its
firing: recorded with the same silenced_by, not notified, no outbox row, and the hold is dropped:
the receivers never heard of the episode, so they hear nothing of it, whenever the silence ends. A
resolved event whose firing event was delivered is delivered, silence or not: a receiver must not
be left with an alert that never ends. A silence added while an episode fires changes nothing for
that episode.

The end of a silence. ``release_held`` (run every RELEASE_EVERY seconds by ``release_loop``, under
pg_try_advisory_xact_lock so that one worker of many runs each round, with an injected clock) first
reads, without a lock, the candidates: the holds whose silence is no longer active or whose series no
longer fires the held episode (a hold whose silence is still active costs one index probe and no
lock, no write). It then locks only the candidates' alert_state rows, in the stage's order, with
SKIP LOCKED: a series a writer's batch holds now is left to the next round, the job never waits
for a batch, and a batch waits for the job only on a candidate's series, for the rest of the round
(a few statements). Under the lock it reads each
hold again: if the series still fires the held episode and no silence active now matches the
event's labels (the ones it was held with), the held rows go to alert_outbox as they are (the same
event id and body, a new webhook-id per row: the firing notification the silence held back, sent
once, however long it was held: the alert still fires), the event becomes notified with released_at
set, and the dispatcher is woken; if another active silence matches, the hold passes to it
(alert_held.silenced_by, what `alerts list` and `silences list` show); if the episode ended
meanwhile, the hold is dropped and nothing is sent.

After a start, the first round waits ``first_after`` seconds (FIRST_AFTER): the messages the broker
redelivers are written first, so that a held episode whose resolving reading was among them ends
held (nothing sent) rather than being released and resolved seconds apart.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from ingest.alerts.dispatch import CHANNEL
from ingest.alerts.model import Rule
from ingest.store.classify import describe

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = ["FIRST_AFTER", "LOCK_KEY", "RELEASE_EVERY", "Candidate", "Hold", "Holds", "Released", "Silence",
           "active_silences", "decide", "event_labels", "glob_pattern", "judge", "release_held", "release_loop"]

log = logging.getLogger(__name__)

LOCK_KEY = 7215160003  # pg_try_advisory_xact_lock key of the end-of-silence job
RELEASE_EVERY = 5.0  # seconds between rounds of the job: how late after its end a silence lets go
FIRST_AFTER = 30.0  # seconds from a start to the first round: the redelivered backlog is written first

Series: TypeAlias = tuple[str, int, int]  # (rule, device_id, metric_id)

_ACTIVE = """
SELECT id, rule, device, labels::text FROM silences
WHERE starts_at <= $1 AND ends_at > $1 AND (expired_at IS NULL OR expired_at > $1)
ORDER BY id
"""
_HELD_OF = """
SELECT h.rule, h.device_id, h.metric_id, h.event_id, h.silenced_by, h.starts_at
FROM alert_held h JOIN unnest($1::text[], $2::int[], $3::int[]) AS k(r, d, m)
  ON h.rule = k.r AND h.device_id = k.d AND h.metric_id = k.m
"""
_UNHOLD = "DELETE FROM alert_held WHERE event_id = ANY($1::bigint[])"
_HOLD = """
INSERT INTO alert_held (rule, device_id, metric_id, event_id, starts_at, silenced_by, labels, outbox)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::bigint[], $5::timestamptz[], $6::bigint[], $7::jsonb[],
                     $8::jsonb[])
ON CONFLICT (rule, device_id, metric_id) DO UPDATE SET
    event_id = EXCLUDED.event_id, starts_at = EXCLUDED.starts_at, silenced_by = EXCLUDED.silenced_by,
    labels = EXCLUDED.labels, outbox = EXCLUDED.outbox
"""
# The job's candidates, read without a lock: the holds whose silence is no longer active at $1 or whose
# series no longer fires the held episode. A hold under an active silence is one primary-key probe.
_CANDIDATES = """
SELECT h.rule, h.device_id, h.metric_id
FROM alert_held h JOIN alert_state s ON s.rule = h.rule AND s.device_id = h.device_id AND s.metric_id = h.metric_id
WHERE s.status IS DISTINCT FROM 'firing' OR s.episode_start IS DISTINCT FROM h.starts_at
   OR NOT EXISTS (SELECT 1 FROM silences x WHERE x.id = h.silenced_by AND x.starts_at <= $1 AND x.ends_at > $1
                  AND (x.expired_at IS NULL OR x.expired_at > $1))
"""
# Only the candidates' alert_state rows, locked in the stage's order; a row a batch holds is skipped.
_LOCK = """
SELECT s.rule, s.device_id, s.metric_id, s.status, s.episode_start
FROM alert_state s JOIN unnest($1::text[], $2::int[], $3::int[]) AS k(r, d, m)
  ON s.rule = k.r AND s.device_id = k.d AND s.metric_id = k.m
ORDER BY s.rule, s.device_id, s.metric_id
FOR UPDATE OF s SKIP LOCKED
"""
# Their holds again, under the locks (the stage writes alert_held only under the same row locks).
_LOCKED_HELD = """
SELECT h.rule, h.device_id, h.metric_id, h.event_id, h.starts_at, h.silenced_by, h.labels::text
FROM alert_held h JOIN unnest($1::text[], $2::int[], $3::int[]) AS k(r, d, m)
  ON h.rule = k.r AND h.device_id = k.d AND h.metric_id = k.m
"""
_MOVE = """
UPDATE alert_held h SET silenced_by = t.silence
FROM unnest($1::bigint[], $2::bigint[]) AS t(event_id, silence) WHERE h.event_id = t.event_id
"""
_ENQUEUE = """
INSERT INTO alert_outbox (event_id, webhook, series, body)
SELECT h.event_id, o.value ->> 0, o.value ->> 1, o.value -> 2
FROM alert_held h CROSS JOIN LATERAL jsonb_array_elements(h.outbox) WITH ORDINALITY AS o(value, n)
WHERE h.event_id = ANY($1::bigint[])
ORDER BY h.rule, h.device_id, h.metric_id, o.n
"""
_NOTIFIED = "UPDATE alert_events SET notified = true, released_at = $2 WHERE id = ANY($1::bigint[])"


# --- the pure part ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def glob_pattern(glob: str) -> re.Pattern[str]:
    """A device glob: ``*`` any run of characters, ``?`` one character, everything else itself."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Silence:
    id: int
    rule: str | None = None
    device: str | None = None  # a glob on devices.uid
    labels: tuple[tuple[str, str], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """``labels``: an event's, from event_labels (which carry its rule and device)."""
        if self.rule is not None and labels.get("rule") != self.rule:
            return False
        if self.device is not None and not glob_pattern(self.device).fullmatch(labels.get("device", "")):
            return False
        return all(labels.get(k) == v for k, v in self.labels)


def _text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, str | int | float) else None


def event_labels(rule: Rule, device: str, attributes: Mapping[str, object] | None) -> dict[str, str]:
    """The labels a silence is matched against (see the module's docstring for the precedence)."""
    labels = {k: t for k, v in (attributes or {}).items() if (t := _text(v)) is not None}
    labels.update(rule.labels)
    labels.update(alertname=rule.name, rule=rule.name, device=device, metric=rule.metric or "*",
                  severity=rule.severity)
    return labels


@dataclass(frozen=True, slots=True)
class Candidate:
    """An event the stage is about to record."""

    series: Series
    status: Literal["firing", "resolved"]
    starts_at: datetime  # the episode's start
    young: bool  # within alerts.max_notify_age: it would be notified
    labels: Callable[[], dict[str, str]]  # computed only when a silence is active


@dataclass(frozen=True, slots=True)
class Hold:
    """A series' held firing event, as alert_held has it."""

    event_id: int
    silence: int
    starts_at: datetime


def decide(events: Sequence[Candidate], silences: Sequence[Silence],
           held: Mapping[Series, Hold]) -> tuple[list[int | None], dict[Series, int], list[int]]:
    """Which events a silence holds back. ``events``: in order within each series; ``held``: the
    holds stored before them. Returns (the silence holding back each event, or None; the series now
    held -> the index in ``events`` of its held firing event; the stored holds to drop, by event id)."""
    # series -> (episode start, silence, the stored hold or the index of a firing event of this batch)
    current: dict[Series, tuple[datetime, int, Hold | int]] = {s: (h.starts_at, h.silence, h) for s, h in held.items()}
    by: list[int | None] = []
    for i, ev in enumerate(events):
        hold = current.pop(ev.series, None)  # a firing event starts a new episode; a resolved one ends it
        sid = None
        if ev.status == "firing":
            if ev.young and silences:
                labels = ev.labels()
                sid = next((s.id for s in silences if s.matches(labels)), None)
            if sid is not None:
                current[ev.series] = (ev.starts_at, sid, i)
        elif hold is not None and hold[0] == ev.starts_at:
            sid = hold[1]
        by.append(sid)
    now_held = {s: ref for s, (_, _, ref) in current.items() if isinstance(ref, int)}
    dropped = [h.event_id for s, h in held.items() if s not in current or current[s][2] is not h]
    return by, now_held, dropped


# --- the stage's queries ---------------------------------------------------------------------------


def _silence(row: Any) -> Silence:
    labels = json.loads(row[3]) if row[3] else {}
    return Silence(row[0], row[1], row[2], tuple(sorted((str(k), str(v)) for k, v in labels.items())))


async def active_silences(conn: Conn, now: datetime) -> list[Silence]:
    return [_silence(r) for r in await conn.fetch(_ACTIVE, now)]


class Holds:
    """The stage's verdict for one batch's events (``judge``), then its writes (``save``)."""

    __slots__ = ("_events", "_labels", "by", "dropped", "held")

    def __init__(self, events: Sequence[Candidate], by: list[int | None], held: dict[Series, int],
                 dropped: list[int]) -> None:
        self._events = events
        self.by = by  # the silence holding back each event (None: not held)
        self.held = held
        self.dropped = dropped

    def held_events(self, event_ids: Sequence[int]) -> set[int]:
        """The ids of the firing events held back (``event_ids``: the recorded events, in order)."""
        return {event_ids[i] for i in self.held.values()}

    async def save(self, conn: Conn, event_ids: Sequence[int], outbox: Sequence[tuple[int, str, str, str]]) -> None:
        """Store the holds: ``outbox``: the rows built for the held events (event_id, webhook, series, body)."""
        if self.dropped:
            await conn.execute(_UNHOLD, self.dropped)
        if not self.held:
            return
        rows: dict[int, list[Any]] = {}
        for event_id, webhook, key, body in outbox:
            rows.setdefault(event_id, []).append([webhook, key, json.loads(body)])
        hold = []
        for series, i in sorted(self.held.items()):
            ev, event_id = self._events[i], event_ids[i]
            silence = self.by[i]
            assert silence is not None
            hold.append((*series, event_id, ev.starts_at, silence, json.dumps(ev.labels(), ensure_ascii=False),
                         json.dumps(rows.get(event_id, []), ensure_ascii=False)))
        await conn.execute(_HOLD, *[list(c) for c in zip(*hold, strict=True)])


async def judge(conn: Conn, now: datetime, events: Sequence[Candidate]) -> Holds:
    """The silences' verdict on the events of one batch, in the batch's transaction (the series'
    rows are locked): one query for the silences active at ``now`` when there is a young firing
    event, one for the stored holds of the series with a resolved event."""
    silences = await active_silences(conn, now) if any(e.young and e.status == "firing" for e in events) else []
    ended = sorted({e.series for e in events if e.status == "resolved"})
    held: dict[Series, Hold] = {}
    if ended:
        held = {(r, d, m): Hold(e, s, t) for r, d, m, e, s, t in
                await conn.fetch(_HELD_OF, *[list(c) for c in zip(*ended, strict=True)])}
    return Holds(events, *decide(events, silences, held))


# --- the end-of-silence job ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Released:
    events: int  # held firing events enqueued: their silences ended while they still fire
    outbox: int  # outbox rows enqueued for them
    dropped: int  # holds of episodes that had ended: nothing sent
    moved: int  # holds whose silence ended, passed to another active silence that matches them
    busy: int = 0  # candidates whose series a writer's batch held: left to the next round


def _columns(series: Sequence[Series]) -> list[list[Any]]:
    return [list(c) for c in zip(*series, strict=True)]


async def release_held(conn: Conn, now: datetime) -> Released | None:
    """One round of the job (see the module's docstring); None when another worker holds its lock."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_KEY):
            return None
        candidates: list[Series] = sorted((r, d, m) for r, d, m in await conn.fetch(_CANDIDATES, now))
        if not candidates:
            return Released(0, 0, 0, 0)
        locked = {(r, d, m): (status, start) for r, d, m, status, start in
                  await conn.fetch(_LOCK, *_columns(candidates))}
        silences = await active_silences(conn, now)
        release: list[int] = []
        dropped: list[int] = []
        moved: list[tuple[int, int]] = []
        for r, d, m, event_id, starts_at, silenced_by, labels in (
                await conn.fetch(_LOCKED_HELD, *_columns(sorted(locked))) if locked else []):
            status, episode_start = locked[(r, d, m)]
            if status != "firing" or episode_start != starts_at:
                dropped.append(event_id)
                continue
            matched = json.loads(labels)
            sid = next((s.id for s in silences if s.matches(matched)), None)
            if sid is None:
                release.append(event_id)
            elif sid != silenced_by:
                moved.append((event_id, sid))
        queued = 0
        if release:
            status_line = await conn.execute(_ENQUEUE, release)
            queued = int(status_line.rsplit(" ", 1)[1])
            await conn.execute(_NOTIFIED, release, now)
        if release or dropped:
            await conn.execute(_UNHOLD, release + dropped)
        if moved:
            await conn.execute(_MOVE, *[list(c) for c in zip(*moved, strict=True)])
        if queued:
            await conn.execute(f"NOTIFY {CHANNEL}")
    return Released(len(release), queued, len(dropped), len(moved), len(candidates) - len(locked))


def _now() -> datetime:
    return datetime.now(UTC)


async def release_loop(pool: Callable[[], asyncpg.Pool], every: float = RELEASE_EVERY,
                       clock: Callable[[], datetime] = _now, first_after: float = FIRST_AFTER,
                       sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                       held: Callable[[], bool] = lambda: False) -> None:
    """Run the job every ``every`` seconds, the first round ``first_after`` seconds after the start,
    until cancelled. ``pool()``: the writer's current pool. A failed round is logged and tried again
    at the next. ``held()``: judging waits for a worker that drains a backlog (ingest.alerts.catchup):
    no round runs then, since an episode that looks firing may have resolved in what is not judged
    yet. ``clock`` and ``sleep``: seams for the tests."""
    failing = False
    await sleep(first_after)
    while True:
        try:
            p = pool()
            if not held() and not p.is_closing():
                async with p.acquire(timeout=30) as conn:
                    done = await asyncio.wait_for(release_held(conn, clock()), 60)
                if done is not None and (done.events or done.dropped):
                    log.info("silences: %d held firing notification(s) sent as their silences ended (%d outbox "
                             "row(s)); %d held episode(s) had resolved meanwhile: nothing sent", done.events,
                             done.outbox, done.dropped)
                if done is not None and done.moved:
                    log.info("silences: %d held alert(s) stay held by another active silence that matches them",
                             done.moved)
            if failing:
                log.info("silences: the end-of-silence job runs again")
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not failing:
                log.warning("silences: the end-of-silence job failed (%s); retrying every %.0fs", describe(exc), every)
            failing = True
        await sleep(every)
