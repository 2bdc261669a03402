"""The writer's alert stage, inside the batch's transaction (ingest.store.writer), and the judging
of series the evaluator (ingest.alerts.evaluator) does after it.

A batch, before it stores its readings (``lock``): for each series (rule, device, metric; a
per-device no_data rule: metric 0; the value rules of a series together: VALUES, device, metric,
ingest.alerts.model.ValueRules) a rule selects among its numeric readings, the alert_state row
is created if missing and locked, all in one sorted order (so that workers writing the same series
wait for each other, never deadlock), and so that no evaluator judges the series past readings this
transaction holds uncommitted. After it stored them (``run``), for the readings new in this
transaction (a redelivered duplicate is not new): a reading at or before what its series has judged
already is late (stored, counted, not judged); the others set the series' due_at (the watermark they
wait for, ingest.alerts.evaluate.due), due_to (the latest of them) and seen_at (the stage's clock).
Then every locked series that is due (due_at <= the watermark: the stage's clock minus alerts.lateness,
or less while a worker catches up a backlog, ingest.alerts.catchup) and that
this worker's version of the rule may judge (ingest.alerts.versions) is judged from the stored rows
(these included), in event-time order, up to that watermark (``judge_locked``, shared with the
evaluator). The state, the events and, for the events young enough to notify (or judged on the
present: a silence and its end), one outbox row per webhook (and one for MQTT, webhook
"mqtt:alerts", when alerts.mqtt is on) are written, except for the events an active silence holds
back (ingest.alerts.silence decides, one query for the batch: recorded with silenced_by, their rows
kept in alert_held); ``NOTIFY sensor_ingest_outbox`` wakes the dispatcher when the transaction
commits. A crash before the commit repeats none of it: it is all rolled back with the readings, and
the redelivered messages are evaluated again, unless, with several workers, the others judged
their series past them meanwhile (then they are late: the lateness bounds the whole way from a
reading's time to its commit, redelivery included). A crash after it leaves due_at set, and any
worker's evaluator judges the series.

The watermark is each worker's own clock: the workers' clocks must agree (NTP) to well within
alerts.lateness.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

from ingest.alerts.body import Annotations, StandardBody, alertmanager_body
from ingest.alerts.evaluate import Event, State, due, is_late, judge, judge_values, since
from ingest.alerts.model import VALUES, Rule
from ingest.alerts.mqtt_channel import CHANNEL_NAME as MQTT_CHANNEL
from ingest.alerts.runtime import AlertRuntime, RuleSet
from ingest.alerts.silence import Candidate, event_labels
from ingest.alerts.silence import judge as judge_silences
from ingest.alerts.versions import Versions
from ingest.model import Reading

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = ["NOTIFY_CHANNEL", "AlertStage", "Device", "Locked", "NewReading", "StageResult"]

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "sensor_ingest_outbox"
_ENSURE = """
INSERT INTO alert_state (rule, device_id, metric_id, status)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::text[]) ORDER BY 1, 2, 3
ON CONFLICT DO NOTHING
"""
_COLUMNS = "s.rule, s.device_id, s.metric_id, s.status, s.episode_start, s.last_time, s.last_value, " \
    "s.evaluated_to, s.due_at, s.version, s.seen_at, s.due_to"
_LOCK = f"""
SELECT {_COLUMNS}
FROM alert_state s JOIN unnest($1::text[], $2::int[], $3::int[]) AS k(r, d, m)
  ON s.rule = k.r AND s.device_id = k.d AND s.metric_id = k.m
ORDER BY s.rule, s.device_id, s.metric_id
FOR UPDATE OF s
"""
# One statement saves the locked series: those judged whole ($1 to $12), the others only as far as a
# batch changes them ($13 to $18: when their readings last came, and what of them is due). Most of a
# batch's series are not judged (not due yet, or judging is held while a worker catches up), and
# half the columns are half the encoding.
_SAVE = """
WITH judged AS (
    UPDATE alert_state AS s SET status = t.status, episode_start = t.start, last_time = t.last_time,
        last_value = t.last_value, evaluated_to = t.evaluated_to, due_at = t.due_at, version = t.version,
        seen_at = t.seen_at, due_to = t.due_to, updated_at = now()
    FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::timestamptz[], $6::timestamptz[], $7::float8[],
                $8::timestamptz[], $9::timestamptz[], $10::text[], $11::timestamptz[], $12::timestamptz[])
        AS t(rule, device_id, metric_id, status, start, last_time, last_value, evaluated_to, due_at, version,
             seen_at, due_to)
    WHERE s.rule = t.rule AND s.device_id = t.device_id AND s.metric_id = t.metric_id
), touched AS (
    UPDATE alert_state AS s SET seen_at = t.seen_at, due_at = t.due_at, due_to = t.due_to, updated_at = now()
    FROM unnest($13::text[], $14::int[], $15::int[], $16::timestamptz[], $17::timestamptz[], $18::timestamptz[])
        AS t(rule, device_id, metric_id, seen_at, due_at, due_to)
    WHERE s.rule = t.rule AND s.device_id = t.device_id AND s.metric_id = t.metric_id
)
SELECT 1
"""
_FORGET = """
DELETE FROM alert_state s USING unnest($1::text[], $2::int[], $3::int[]) AS k(r, d, m)
WHERE s.rule = k.r AND s.device_id = k.d AND s.metric_id = k.m AND s.status = 'ok'
"""
# The stored rows of each series from its lower bound on (readings_key: one index range per series).
_ROWS = """
SELECT k.i, r.time, r.value
FROM unnest($1::int[], $2::int[], $3::timestamptz[]) WITH ORDINALITY AS k(d, m, lo, i)
CROSS JOIN LATERAL (SELECT time, value FROM readings
                    WHERE device_id = k.d AND metric_id = k.m AND time >= k.lo ORDER BY time) r
ORDER BY k.i, r.time
"""
# The rows of a series' value rules that are not ok, under lock (the series' VALUES row is locked
# already, and only whoever holds it locks these: no wait on another batch, no deadlock).
_OPEN = f"""
SELECT {_COLUMNS}
FROM alert_state s JOIN unnest($1::int[], $2::int[]) AS k(d, m) ON s.device_id = k.d AND s.metric_id = k.m
WHERE s.status <> 'ok' AND s.rule = ANY($3::text[])
ORDER BY s.rule, s.device_id, s.metric_id
FOR UPDATE OF s
"""
# A value rule's own row: written when its state leaves ok, while it is not ok, and when it is ok again.
_PUT = """
INSERT INTO alert_state AS s (rule, device_id, metric_id, status, episode_start, last_time, last_value, version)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                     $7::float8[], $8::text[]) ORDER BY 1, 2, 3
ON CONFLICT (rule, device_id, metric_id) DO UPDATE SET status = EXCLUDED.status,
    episode_start = EXCLUDED.episode_start, last_time = EXCLUDED.last_time, last_value = EXCLUDED.last_value,
    version = EXCLUDED.version, due_at = NULL, due_to = NULL, updated_at = now()
"""
_ENSURED_MAX = 1_000_000  # series remembered as having a row (about 100 MB at most); then forgotten
_METRIC_NAMES = "SELECT id, name FROM metrics WHERE id = ANY($1::int[])"
_EVENTS = """
INSERT INTO alert_events (rule, device_id, metric_id, status, event_time, starts_at, value, threshold, severity,
                          notified, silenced_by)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                     $7::float8[], $8::float8[], $9::text[], $10::bool[], $11::bigint[])
RETURNING id, rule, device_id, metric_id, status, event_time
"""
_OUTBOX = """
INSERT INTO alert_outbox (event_id, webhook, series, body)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::jsonb[])
"""
_DEVICES = "SELECT id, uid, attributes, expected_interval, source FROM devices WHERE id = ANY($1::int[])"
_METRICS = "SELECT id, name, unit FROM metrics WHERE id = ANY($1::int[])"


@dataclass(frozen=True, slots=True)
class NewReading:
    reading: Reading
    device_id: int
    metric_id: int


class StageResult:
    __slots__ = ("deferred", "dropped", "events", "judged", "late", "notified", "outbox", "silenced", "stuck",
                 "uncovered")

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()  # (rule, status)
        self.notified = 0
        self.outbox = 0
        self.silenced = 0  # events held back by a silence (ingest.alerts.silence): recorded, not notified
        self.late = 0  # readings older than their series' last evaluated time: not evaluated
        self.deferred = 0  # series left to a worker holding the version of the rule that judged them
        self.uncovered = 0  # windows not judged for too little data
        self.judged = 0  # series judged
        self.dropped = 0  # series no longer their rule's (a reload, a device's attributes): not judged
        self.stuck = 0  # series judged that are still due after it (no progress)


def series_key(rule: str, device_id: int, metric_id: int) -> str:
    return f"{rule}\x1f{device_id}\x1f{metric_id}"


def _default_summary(rule: Rule, f: dict[str, Any], status: str) -> str:
    """What the event says when its rule has no summary of its own, in the words of its kind."""
    unit = f" {f['unit']}" if f["unit"] else ""
    where = f"{f['device']} {f['metric']}" if f["metric"] != "*" else f"{f['device']}"
    if rule.signal == "no_data":
        if status == "firing":
            return f"{rule.name}: no reading from {where} for {f['value']:g} s (threshold {f['threshold']:g} s)"
        return f"{rule.name}: {where} reports again after {f['value']:g} s of silence"
    now = "is" if status == "firing" else "is back to"
    if rule.signal == "rate":
        return f"{rule.name}: the rate of change of {where} over {rule.over:g} s {now} {f['value']:.4g}{unit} " \
               f"(threshold {f['threshold']:g}{unit})"
    if rule.signal == "window":
        return f"{rule.name}: the {rule.agg} of {where} over {rule.over:g} s ({rule.align}) {now} " \
               f"{f['value']:.4g}{unit} (threshold {f['threshold']:g}{unit})"
    return f"{rule.name}: {where} is {f['value']} (threshold {f['threshold']})"


def _summary(rule: Rule, fields: dict[str, Any], status: str = "firing") -> str:
    try:
        return rule.summary.format_map(fields) if rule.summary else _default_summary(rule, fields, status)
    except (KeyError, ValueError, IndexError, TypeError):  # validated at load; a last guard, never a failed batch
        return rule.summary


@dataclass(frozen=True, slots=True)
class Device:
    uid: str
    attributes: dict[str, Any]
    interval: float | None  # the expected interval: the register's, else its source's (window coverage)


Key: TypeAlias = tuple[str, int, int]


@dataclass(slots=True)
class Locked:
    """A series under its row lock, as read."""

    state: State
    due_at: datetime | None
    version: str | None
    seen_at: datetime | None = None  # when a reading of it last arrived (the stage's clock)
    due_to: datetime | None = None  # the latest reading waiting


@dataclass(frozen=True, slots=True)
class Prepared:
    """What AlertStage.lock took for a batch: its rule set, the series' rules and devices, the rows."""

    active: RuleSet
    rules: dict[str, Rule]
    devices: dict[int, Device]
    locked: dict[Key, Locked]
    names: dict[int, str]  # metric id -> name, of the batch's readings
    created: tuple[Key, ...] = ()  # rows this transaction inserted (gone again if it rolls back)



class AlertStage:
    def __init__(self, runtime: AlertRuntime, clock: Callable[[], datetime] = lambda: datetime.now(UTC), *,
                 intervals: Mapping[str, float] | None = None, versions: Versions | None = None) -> None:
        """``intervals``: source name -> its declared expected_interval (window coverage of the devices
        the register gives none); ``versions``: the live workers' rule versions (None: one worker)."""
        self.runtime = runtime
        self.clock = clock
        self.intervals = dict(intervals or {})
        self.versions = versions
        self._unknown_logged: set[tuple[str, int]] = set()
        # Series whose alert_state row this process created or saw: not inserted again by every batch
        # (with 20 rules on a metric, a batch of 1,000 readings would insert 20,000 rows that exist).
        # A row another worker deleted meanwhile (an 'ok' state its rule no longer owns) is found
        # missing by the lock and created then.
        self._ensured: set[Key] = set()
        # Nothing is judged past this while a worker drains a backlog (ingest.alerts.catchup: EPOCH
        # then, so nothing at all). None: no one is behind.
        self.floor: Callable[[], datetime | None] = lambda: None

    def wants(self, metric: str) -> bool:
        return bool(self.runtime.rules_for(metric))

    def watermark(self, active: RuleSet, now: datetime) -> datetime:
        """Series are judged up to this: the clock minus alerts.lateness, or less while a worker catches
        up (the floor minus it, ingest.alerts.catchup)."""
        to = now - timedelta(seconds=active.lateness)
        floor = self.floor()
        if floor is not None and floor - timedelta(seconds=active.lateness) < to:
            return floor - timedelta(seconds=active.lateness)
        return to

    async def lock(self, conn: Conn, readings: Sequence[NewReading]) -> Prepared | None:
        """Before the batch stores its readings: create and lock the alert_state rows of every series
        they belong to (sorted order), so that no evaluator judges a series past readings this
        transaction is about to store and has not committed. None: no rule wants any of them."""
        # One rule set for the whole batch: a reload during an await below must not pair the new set's
        # rules with the old set's webhooks (an event notified with no outbox row).
        active = self.runtime.active
        rules_for = functools.cache(active.for_metric)
        candidates = [n for n in readings if not isinstance(n.reading.value, str) and rules_for(n.reading.metric)]
        if not candidates:
            return None
        devices = await self.devices(conn, {n.device_id for n in candidates})
        keys: set[Key] = set()
        rules: dict[str, Rule] = {}
        names: dict[int, str] = {}
        values, others = active.values, functools.cache(_others(active))
        for n in candidates:
            dev = devices.get(n.device_id) or Device(n.reading.device, {}, None)
            metric = names[n.metric_id] = n.reading.metric
            if values.members(metric, dev.uid, dev.attributes):
                # A value rule's series: the one row its value rules share (ingest.alerts.model.ValueRules).
                keys.add((VALUES, n.device_id, n.metric_id))
            for rule in others(metric):
                if rule.selects(dev.uid, dev.attributes):
                    rules[rule.name] = rule
                    keys.add((rule.name, n.device_id, 0 if rule.per_device else n.metric_id))
        if not keys:
            return None
        ordered = sorted(keys)
        ensured = self._ensured
        created = [k for k in ordered if k not in ensured]
        await self._ensure(conn, created)
        cols = [list(c) for c in zip(*ordered, strict=True)]
        locked = {(r["rule"], r["device_id"], r["metric_id"]): _locked(r) for r in await conn.fetch(_LOCK, *cols)}
        if len(locked) < len(ordered):
            # Rows deleted since this process saw them (by another worker: see _ensured). Locked
            # after the others, out of the sorted order: a deadlock with another batch is possible
            # here, and is retried like any (SQLSTATE 40P01).
            missing = [k for k in ordered if k not in locked]
            await self._ensure(conn, missing)
            created += missing
            cols = [list(c) for c in zip(*missing, strict=True)]
            locked.update({(r["rule"], r["device_id"], r["metric_id"]): _locked(r)
                           for r in await conn.fetch(_LOCK, *cols)})
        return Prepared(active, rules, devices, locked, names, tuple(created))

    def rolled_back(self, prepared: Prepared) -> None:
        """The transaction ``prepared`` was taken in rolled back (a batch written again): the rows it
        created are gone, so that the next lock creates them again in sorted order, not after the
        others."""
        self._ensured.difference_update(prepared.created)

    async def _ensure(self, conn: Conn, keys: list[Key]) -> None:
        """Create the alert_state rows of ``keys`` that do not exist (sorted order)."""
        if not keys:
            return
        await conn.execute(_ENSURE, *[list(c) for c in zip(*keys, strict=True)], ["ok"] * len(keys))
        if len(self._ensured) + len(keys) > _ENSURED_MAX:
            self._ensured.clear()
        # Remembered once the transaction commits would be exact; remembered now, a rollback leaves
        # keys remembered whose rows do not exist: the lock finds them missing and creates them.
        self._ensured.update(keys)

    async def run(self, conn: Conn, new: Sequence[NewReading], prepared: Prepared | None = None) -> StageResult:
        """After the batch stored its readings: ``new``, those new in this transaction (a redelivered
        duplicate is not new), set their series' due_at, and what is due is judged. ``prepared``: what
        ``lock`` took before the readings were stored (None: it is taken now)."""
        result = StageResult()
        if prepared is None:
            prepared = await self.lock(conn, new)
            if prepared is None:
                return result
        active, rules, devices, locked = prepared.active, prepared.rules, prepared.devices, prepared.locked
        values, others = active.values, functools.cache(_others(active))
        times: dict[Key, list[datetime]] = {}
        judged_by: dict[Key, Rule] = {}  # a rule of the series (for VALUES: any of its value rules)
        for n in new:
            if isinstance(n.reading.value, str):
                continue
            dev = devices.get(n.device_id) or Device(n.reading.device, {}, None)
            metric = n.reading.metric
            judging = values.members(metric, dev.uid, dev.attributes)
            if judging and (key := (VALUES, n.device_id, n.metric_id)) in locked:
                times.setdefault(key, []).append(n.reading.time)
                judged_by[key] = judging[0]
            for rule in others(metric):
                key = (rule.name, n.device_id, 0 if rule.per_device else n.metric_id)
                if key in locked and rule.selects(dev.uid, dev.attributes):
                    times.setdefault(key, []).append(n.reading.time)
                    judged_by[key] = rule
        if not times:
            return result
        keys = sorted(times)
        arrived = self.clock()
        for key in keys:
            rule = judged_by[key]
            row = locked[key]
            row.seen_at = arrived
            waiting = [t for t in times[key] if not is_late(rule, row.state, t)]
            if not rule.per_device:  # a device's readings of several metrics at one time are not late
                result.late += len(times[key]) - len(waiting)
            if waiting:
                first = min(due(rule, t) for t in waiting)
                row.due_at = first if row.due_at is None or first < row.due_at else row.due_at
                last = max(waiting)
                row.due_to = last if row.due_to is None or last > row.due_to else row.due_to
        # Their series were built from the rule's own metric and selection: no ownership to check.
        await self.judge_locked(conn, active, rules, {k: locked[k] for k in keys}, devices, result, owned=True,
                                names=prepared.names)
        return result

    async def devices(self, conn: Conn, ids: set[int]) -> dict[int, Device]:
        return {i: Device(uid, _attrs(a), own if own is not None else self.intervals.get(src or ""))
                for i, uid, a, own, src in await conn.fetch(_DEVICES, sorted(ids))}

    async def judge_locked(self, conn: Conn, active: RuleSet, rules: Mapping[str, Rule], locked: dict[Key, Locked],
                           devices: dict[int, Device], result: StageResult, *, silent: bool = False,
                           owned: bool = False, names: Mapping[int, str] | None = None) -> None:
        """Judge the locked series that are due and this worker may judge, save every locked series'
        state and due_at, and record the events. ``silent``: the no-data job (judge silences too).
        ``owned``: the caller knows every series is still its rule's (else the metric of each is read
        and checked against the rule's: a reload can change a rule's metric or per). ``names``: metric
        id -> name, as far as the caller knows them (the rest are read).

        A VALUES row (ingest.alerts.model.ValueRules) is judged by the value rules that select its
        series, all at once (ingest.alerts.evaluate.judge_values), from the rows of those of them that
        are not ok, locked now; a rule whose state moves, or is not ok, gets its own row written."""
        now = self.clock()
        to = self.watermark(active, now)
        values = active.values
        judged: list[Key] = []
        gone: list[Key] = []
        members: dict[Key, tuple[Rule, ...]] = {}
        metric_names: dict[int, str] = dict(names or {})
        ids = sorted({k[2] for k in locked if k[2] and k[2] not in metric_names and (not owned or k[0] == VALUES)})
        if ids:
            metric_names.update({i: name for i, name in await conn.fetch(_METRIC_NAMES, ids)})
        for key, row in locked.items():
            if not (silent or (row.due_at is not None and row.due_at <= to)):
                continue
            if key[0] == VALUES:
                if self.versions is not None and not self.versions.decide(values, row.version):
                    result.deferred += 1
                    continue
                dev = devices.get(key[1])
                metric = metric_names.get(key[2], "")
                judging = values.on(metric) if dev is None else values.members(metric, dev.uid, dev.attributes)
                if not judging:  # no value rule selects the series any more (a reload, the device's attributes)
                    row.due_at = row.due_to = None
                    result.dropped += 1
                    gone.append(key)
                    continue
                members[key] = judging
                judged.append(key)
                continue
            rule = rules[key[0]]
            if self.versions is not None and not self.versions.decide(rule, row.version):
                result.deferred += 1
                continue
            dev = devices.get(key[1])
            mine = (key[2] == 0) if rule.per_device else (owned or metric_names.get(key[2]) == rule.metric)
            if not mine or (dev is not None and not rule.selects(dev.uid, dev.attributes)):
                # A reload narrowed the rule or changed its metric or per, or the device's attributes
                # changed: the series is no longer the rule's. Its readings are not judged; a state with
                # nothing open goes.
                row.due_at = row.due_to = None
                result.dropped += 1
                if row.state.status == "ok":
                    gone.append(key)
                continue
            judged.append(key)
        result.judged += len(judged)
        rows = await self._rows(conn, rules, {k: locked[k] for k in judged}, silent)
        fired: list[tuple[Key, Event]] = []
        by_name: dict[str, Rule] = dict(rules)
        if members:
            by_name.update((r.name, r) for r in values.rules)
            fired += await self._judge_values(conn, locked, members, rows, to, values.version)
        for key in judged:
            if key[0] == VALUES:
                continue
            rule, row = rules[key[0]], locked[key]
            dev = devices.get(key[1]) or Device(str(key[1]), {}, None)
            quiet = row.seen_at is None or row.seen_at <= now - timedelta(seconds=active.lateness)
            out = judge(rule, row.state, rows.get(key, []), to, interval=dev.interval, silent=silent, quiet=quiet)
            if out.unknown_interval and (rule.name, key[1]) not in self._unknown_logged:
                self._unknown_logged.add((rule.name, key[1]))
                log.warning("rule %s: device %s has no expected interval (register it with `sensor-ingest devices "
                            "import`, or set expected_interval on its source), so its windows cannot be judged for "
                            "coverage %g and are not judged", rule.name, dev.uid, rule.coverage)
            result.uncovered += out.uncovered
            row.state, row.due_at, row.version = out.state, out.due, rule.version
            if out.due is None:
                row.due_to = None
            if row.due_at is not None and row.due_at <= to:
                # Still due: a clock window waiting for its readings to stop arriving (``quiet``). A
                # claim holding only such series makes no progress: the round ends; they are tried at
                # the next tick, for at most alerts.lateness.
                result.stuck += 1
            fired += [(key, e) for e in out.events]
        full = set(judged)
        saved = [(*k, r.state.status, r.state.episode_start, r.state.last_time, r.state.last_value,
                  r.state.evaluated_to, r.due_at, r.version, r.seen_at, r.due_to)
                 for k, r in locked.items() if k in full]
        touched = [(*k, r.seen_at, r.due_at, r.due_to) for k, r in locked.items() if k not in full and k not in gone]
        if saved or touched:
            await conn.execute(_SAVE, *_columns(saved, 12), *_columns(touched, 6))
        if gone:
            await conn.execute(_FORGET, *[list(c) for c in zip(*gone, strict=True)])
            self._ensured.difference_update(gone)
        if fired:
            await self._record(conn, active, by_name, devices, fired, now, result)

    async def _judge_values(self, conn: Conn, locked: dict[Key, Locked], members: dict[Key, tuple[Rule, ...]],
                            rows: Mapping[Key, list[tuple[datetime, float]]], to: datetime,
                            version: str) -> list[tuple[Key, Event]]:
        """Judge the VALUES rows of ``members`` (key -> the value rules that judge it) by all of their
        rules at once: the rows of the rules that are not ok are locked and read, the VALUES rows'
        state and due_at set (saved with the other locked rows by the caller), and the rows of the
        rules whose state moved or is not ok written. The events, keyed by their rule's series."""
        keys = sorted(members)
        names = sorted({r.name for k in keys for r in members[k]})
        open_: dict[tuple[int, int], dict[str, State]] = {}  # series -> rule -> its state (not ok)
        for r in await conn.fetch(_OPEN, [k[1] for k in keys], [k[2] for k in keys], names):
            open_.setdefault((r["device_id"], r["metric_id"]), {})[r["rule"]] = _locked(r).state
        put: list[tuple[str, int, int, str, datetime | None, datetime | None, float | None, str]] = []
        fired: list[tuple[Key, Event]] = []
        for key in keys:
            row, judging = locked[key], members[key]
            _, d, m = key
            opened = open_.get((d, m))
            states = {r.name: st for r in judging if (st := opened.get(r.name)) is not None} if opened else {}
            out = judge_values(judging, states, row.state.last_time, row.state.last_value, rows.get(key, []), to)
            row.state = State("ok", None, out.last_time, out.last_value)
            row.due_at, row.version = out.due, version
            if out.due is None:
                row.due_to = None
            if out.changed:
                of = {r.name: r.version for r in judging}
                put += [(name, d, m, st.status, st.episode_start, st.last_time, st.last_value, of[name])
                        for name, st in sorted(out.changed.items())]
            fired += [((r.name, d, m), e) for r, e in out.events]
        if put:
            await conn.execute(_PUT, *[list(c) for c in zip(*put, strict=True)])
        return fired

    async def _rows(self, conn: Conn, rules: Mapping[str, Rule], locked: dict[Key, Locked],
                    silent: bool) -> dict[Key, list[tuple[datetime, float]]]:
        """The stored rows each series' judgement needs, from ``since`` on, in time order."""
        per_series: list[tuple[Key, datetime]] = []
        out: dict[Key, list[tuple[datetime, float]]] = {}
        for key, row in locked.items():
            if key[0] == VALUES:  # the value rules of the series: from the last reading judged on
                if row.due_at is None:
                    raise AssertionError(f"{key} judged with nothing due")
                per_series.append((key, row.state.last_time if row.state.last_time is not None else row.due_at))
                continue
            rule = rules[key[0]]
            if row.due_at is None:
                if silent:  # the no-data job on a series with nothing waiting: no rows to read
                    continue
                raise AssertionError(f"{key} judged with nothing due")
            if rule.per_device:
                # A device's silence needs only its earliest and latest waiting reading times: the
                # first ends a firing episode, the latest is its last reading once the watermark passes
                # it (rows between change nothing). Reading them back would scan every metric of the
                # device in the index (device, metric, time).
                times = sorted({row.due_at, row.due_to or row.due_at})
                out[key] = [(t, 0.0) for t in times]
                continue
            per_series.append((key, since(rule, row.state, row.due_at)))
        if per_series:
            # One read per stored series (device, metric) from the earliest bound its rules need, not one
            # per rule: 20 rules on a metric read its rows once.
            lows: dict[tuple[int, int], datetime] = {}
            for key, lo in per_series:
                series = (key[1], key[2])
                if series not in lows or lo < lows[series]:
                    lows[series] = lo
            order = list(lows)
            stored: dict[tuple[int, int], list[tuple[datetime, float]]] = {}
            for i, t, v in await conn.fetch(_ROWS, [d for d, _ in order], [m for _, m in order],
                                            [lows[s] for s in order]):
                stored.setdefault(order[i - 1], []).append((t, v))
            for key, lo in per_series:
                rows = stored.get((key[1], key[2]), [])
                if rows and rows[0][0] < lo:
                    rows = [r for r in rows if r[0] >= lo]
                if rows:
                    out[key] = rows
        return out

    async def _record(self, conn: Conn, active: RuleSet, rules: Mapping[str, Rule], devices: dict[int, Device],
                      fired: list[tuple[Key, Event]], now: datetime, result: StageResult) -> None:
        horizon = now - timedelta(seconds=active.max_notify_age)

        def device(d: int) -> tuple[str, dict[str, Any]]:
            dev = devices.get(d)
            return (dev.uid, dev.attributes) if dev is not None else (str(d), {})

        def young(e: Event) -> bool:
            return e.current or e.event_time >= horizon

        holds = await judge_silences(conn, now, [Candidate(k, e.status, e.starts_at, young(e), functools.partial(
            event_labels, rules[k[0]], *device(k[1]))) for k, e in fired])
        rows = [(k[0], k[1], k[2], e.status, e.event_time, e.starts_at, e.value, e.threshold, rules[k[0]].severity,
                 young(e) and by is None, by) for (k, e), by in zip(fired, holds.by, strict=True)]
        ids = {(r, d, m, s, t): i for i, r, d, m, s, t in
               await conn.fetch(_EVENTS, *[list(c) for c in zip(*rows, strict=True)])}
        event_ids = [ids[(k[0], k[1], k[2], e.status, e.event_time)] for k, e in fired]
        held = holds.held_events(event_ids)
        units = {i: (name, unit) for i, name, unit in await conn.fetch(_METRICS, sorted({k[2] for k, _ in fired}))}
        units[0] = ("*", None)  # a per-device no_data rule: any metric
        outbox: list[tuple[int, str, str, str]] = []
        # The rows of events a silence holds never go to the outbox here, even when the same batch ends
        # their episode: those of a firing still held at the end of the batch wait in alert_held.
        held_rows: list[tuple[int, str, str, str]] = []
        for (key, e), row in zip(fired, rows, strict=True):
            rule = rules[key[0]]
            result.events[(rule.name, e.status)] += 1
            if row[-1] is not None:  # held back by a silence: a firing event's rows wait in alert_held
                result.silenced += 1
                if e.status == "resolved":
                    continue  # the end of an episode whose firing was never sent: nothing to send
            elif not row[-2]:
                log.info("alert %s on device %s: %s event at %s is older than alerts.max_notify_age; recorded, "
                         "not notified", rule.name, device(key[1])[0], e.status, e.event_time.isoformat())
                continue
            else:
                result.notified += 1
            event_id = ids[(key[0], key[1], key[2], e.status, e.event_time)]
            uid, attrs = device(key[1])
            metric, unit = units.get(key[2], (str(key[2]), None))
            if rule.signal == "no_data":  # the value is the silence in seconds
                unit = "s"
            elif rule.signal == "rate":  # the value is a change per minute
                unit = f"{unit}/min" if unit else "1/min"
            fields = {"device": uid, "metric": metric, "value": e.value, "threshold": e.threshold, "rule": rule.name,
                      "severity": rule.severity, "unit": unit or ""}
            event = StandardBody(
                id=f"evt_{event_id}", status=e.status, rule=rule.name, severity=rule.severity, device=uid,
                metric=metric, value=e.value, unit=unit, threshold=e.threshold, starts_at=e.starts_at,
                ends_at=e.event_time if e.status == "resolved" else None, event_time=e.event_time,
                labels=dict(rule.labels), annotations=Annotations(summary=_summary(rule, fields, e.status)),
                device_attributes=attrs,
            )
            standard: str | None = None  # rendered once, for the first standard webhook that needs it
            target = held_rows if row[-1] is not None else outbox
            for hook in rule.webhooks:
                webhook = active.webhooks.get(hook)
                if webhook is None:
                    continue
                if webhook.body == "alertmanager":  # per webhook: its name is the payload's receiver
                    # the rule's kind in words when it is not a plain threshold (the default summary's)
                    said = None if rule.signal == "value" else _default_summary(rule, fields, e.status)
                    body = alertmanager_body(event, webhook.name, webhook.external_url, said).model_dump_json()
                else:
                    body = standard = standard or event.model_dump_json()
                target.append((event_id, hook, series_key(*key), body))
            if active.mqtt:  # also over MQTT (ingest.alerts.mqtt_channel); held and released like the others
                target.append((event_id, MQTT_CHANNEL, series_key(*key), standard or event.model_dump_json()))
        await holds.save(conn, event_ids, [o for o in held_rows if o[0] in held])
        if outbox:
            await conn.execute(_OUTBOX, *[list(c) for c in zip(*outbox, strict=True)])
            await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
            result.outbox += len(outbox)


def _others(active: RuleSet) -> Callable[[str], tuple[Rule, ...]]:
    """metric -> the rules a reading of it feeds that are not value rules (those are judged together)."""
    return lambda metric: tuple(r for r in active.for_metric(metric) if r.signal != "value")


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows of ``width`` values as that many columns (empty columns for no rows)."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


def _locked(r: asyncpg.Record) -> Locked:
    return Locked(State(r["status"], r["episode_start"], r["last_time"], r["last_value"], r["evaluated_to"]),
                  r["due_at"], r["version"], r["seen_at"], r["due_to"])


def _attrs(raw: object) -> dict[str, Any]:
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return raw if isinstance(raw, dict) else {}
