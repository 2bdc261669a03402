"""Writes one batch in one transaction: readings (binary COPY), states, rejections.

A unique-key conflict must not lose the batch's other work: the COPY ends the transaction, and the
whole batch is written again with its rows through INSERT ... ON CONFLICT DO NOTHING (unnest of
arrays, no DDL). A batch that holds redelivered messages takes that path directly, since conflicts
are likely. (A SAVEPOINT around the COPY would keep the transaction, for two more round trips in
every batch; the batches that conflict are few.)

Before the transaction, new device ids and metric names are admitted per source (ingest.budget);
the readings of keys beyond a source's budget become ``too_many_new_series`` rejections.

Every string of a rejection row is escaped (validate.escape): the row that records a bad message
must itself always store, whatever the message held.

Calibrations (ingest.store.calibration) are applied inside the transaction, to the numeric rows,
after the epoch of the calibrations has been read under the shared side of their lock: a rewrite of
stored readings in progress can then neither miss a new reading nor rewrite it twice.

A write attempt ends at COMMIT. ``devices.last_seen`` is a hint for operators updated afterwards by
``touch_devices()``, outside the attempt and its timeout: a slow or failed update there can neither
re-run a committed batch (doubling its rejection rows) nor delay its acknowledgement.

A connection that failed with a connection-class error (timeout, reset, closed) is terminated, never
returned to the pool: after a timeout its state is unknown, and giving it back would run the pool's
reset (a ROLLBACK of the open transaction) on a network that may drop every packet (a blackhole),
which would hang the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ingest.alerts.stage import AlertStage, NewReading, StageResult
from ingest.budget import NewKeyBudget
from ingest.catalog import Catalog, MetricRow
from ingest.model import Reading, Rejection
from ingest.process import MAX_DETAIL, Outcome, summarize
from ingest.store.calibration import EPOCH_SQL, Calibrations, load_calibrations
from ingest.store.classify import describe, is_connection_failure
from ingest.store.ids import IdCache
from ingest.validate import MAX_NAME, escape

__all__ = ["WriteResult", "Writer"]

Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

log = logging.getLogger(__name__)

_TOUCH_TIMEOUT = 5.0  # seconds the last_seen hint may hold up the next batch, at most
_READING_COLUMNS = ("time", "device_id", "metric_id", "value", "flags")
_REJECTION_COLUMNS = ("received_at", "source", "topic", "payload", "reason", "detail", "device_uid")
_REJECTION_COLUMNS_DETAILS = (*_REJECTION_COLUMNS, "details")
# The conflict path: the rows that are new come back; the others are duplicates or conflicts.
_INSERT_READINGS = """
INSERT INTO readings (time, device_id, metric_id, value, flags)
SELECT * FROM unnest($1::timestamptz[], $2::int[], $3::int[], $4::float8[], $5::int2[])
ON CONFLICT DO NOTHING
RETURNING device_id, metric_id, time
"""
_INSERT_STATES = """
INSERT INTO states (time, device_id, metric_id, value, flags)
SELECT * FROM unnest($1::timestamptz[], $2::int[], $3::int[], $4::text[], $5::int2[])
ON CONFLICT DO NOTHING
RETURNING device_id, metric_id, time
"""
# The stored values of keys that were not new (a unique-index lookup per key).
_STORED = """
SELECT s.device_id, s.metric_id, s.time, s.value
FROM unnest($1::int[], $2::int[], $3::timestamptz[]) AS k(d, m, t)
JOIN {table} AS s ON s.device_id = k.d AND s.metric_id = k.m AND s.time = k.t
"""
_SET_ATTRIBUTES = """
UPDATE devices SET attributes = devices.attributes || t.a::jsonb
FROM unnest($1::int[], $2::text[]) AS t(id, a)
WHERE devices.id = t.id
"""
# A device imported into the register has last_seen NULL until its first reading (first_seen then
# becomes that moment), and may have no source: the first source that writes it fills it in.
_TOUCH_DEVICES = """
UPDATE devices SET last_seen = GREATEST(devices.last_seen, t.ts),
    first_seen = CASE WHEN devices.last_seen IS NULL THEN LEAST(now(), t.ts) ELSE devices.first_seen END,
    source = coalesce(devices.source, t.src)
FROM unnest($1::int[], $2::timestamptz[], $3::text[]) AS t(id, ts, src)
WHERE devices.id = t.id
  AND (devices.last_seen IS NULL OR devices.last_seen < t.ts OR (devices.source IS NULL AND t.src IS NOT NULL))
"""


def _kind(value: float | bool | str) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "state"
    return "number"


def _rejection_row(o: Outcome) -> tuple[object, ...]:
    assert o.rejection is not None
    device = o.rejection.device
    details = json.dumps([{"reason": p.reason, "detail": escape(p.detail[:MAX_DETAIL]),
                           **({"device": escape(p.device[:MAX_NAME])} if p.device else {})}
                          for p in (o.problems or [o.rejection])], ensure_ascii=False)
    return (o.message.received_at, None if o.source is None else escape(o.source), escape(o.message.topic),
            o.message.payload, o.rejection.reason, escape(o.rejection.detail),
            None if device is None else escape(device[:MAX_NAME]), details)


class _Stored(Exception):
    """The batch's COPY met a reading stored already: its transaction is over, to be tried again
    through the conflict path."""


class WriteResult:
    __slots__ = ("alerts", "calibrated", "conflict_path", "duplicates", "outcomes", "readings", "reasons", "rejections",
                 "states")

    def __init__(self) -> None:
        self.outcomes: Sequence[Outcome] = ()  # as written: admitted, calibrated, conflicts made problems
        self.calibrated = 0  # readings a calibration changed
        self.readings = 0  # new rows of readings (a duplicate is not new)
        self.states = 0
        self.duplicates = 0  # readings and states identical to a stored one (redelivery, a repeat)
        self.alerts: StageResult | None = None  # what the alert stage recorded in this transaction
        self.rejections = 0
        self.reasons: Counter[str] = Counter()  # rejection rows written, by reason
        self.conflict_path = False


class Writer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        ids: IdCache | None = None,
        timeout: float | None = None,
        renew_pool: Callable[[], Awaitable[asyncpg.Pool]] | None = None,
        *,
        new_devices_per_minute: int = 1000,
        new_metrics_per_minute: int = 100,
        clock: Callable[[], float] = time.monotonic,
        catalog: Catalog | None = None,
        known_only: Iterable[str] = (),
        alerts: AlertStage | None = None,
    ) -> None:
        """``timeout``: the statement timeout; it bounds acquiring a connection, and four times it
        bounds a whole write attempt, whatever the driver waits on.

        ``renew_pool``: makes a new pool. When given, a connection-class failure terminates the
        whole pool and the next write starts on a new one: the other connections went through the
        same outage (a restart, a partition) and may be dead or frozen too, and none of them can
        then hold the writer up. Without it (tests of the writer alone) the pool is kept.

        ``new_devices_per_minute`` / ``new_metrics_per_minute``: per source (ingest.budget).

        ``catalog``: the binding each new metrics row records. ``known_only``: the sources whose
        device_policy is "known": their readings of a device the devices table lacks are rejected
        (unknown_device) instead of creating it.
        """
        self.pool = pool
        self.ids = ids or IdCache()
        self.timeout = timeout
        self._limit = None if timeout is None else 4 * timeout
        self._renew_pool = renew_pool
        self._stale = False  # the pool was terminated after a failure: renew before the next write
        self._device_budget = NewKeyBudget(new_devices_per_minute)
        self._metric_budget = NewKeyBudget(new_metrics_per_minute)
        self._clock = clock
        self._catalog = catalog
        self._known_only = frozenset(known_only)
        self._alerts = alerts
        self._calibrations = Calibrations()
        self._calibration_epoch: int | None = None
        self._last_seen: dict[int, datetime] = {}  # committed, not yet in devices.last_seen
        self._new_sources: dict[int, str | None] = {}  # source of devices first seen by this writer, not yet touched
        self._sourced: set[int] = set()  # devices whose source this writer has passed to the database
        self._attributes: dict[int, dict[str, str]] = {}  # committed attributes from topic captures

    async def write(self, outcomes: Sequence[Outcome]) -> WriteResult:
        """Commit every outcome's readings and rejection in one transaction, or raise."""
        try:
            async with asyncio.timeout(self._limit):
                if self._stale:
                    assert self._renew_pool is not None
                    self.pool = await self._renew_pool()
                    self._stale = False
                return await self._write_once(outcomes)
        except Exception as exc:
            if is_connection_failure(exc) and self._renew_pool is not None and not self._stale:
                self._stale = True
                self.pool.terminate()
            raise

    async def touch_devices(self) -> None:
        """Bring devices.last_seen up to the committed readings; a hint, never worth a retry."""
        if not self._last_seen or self._stale or self.pool.is_closing():
            return
        pending, self._last_seen = self._last_seen, {}
        sources, self._new_sources = self._new_sources, {}
        ids = sorted(pending)
        try:
            bound = min(self.timeout or _TOUCH_TIMEOUT, _TOUCH_TIMEOUT)
            async with asyncio.timeout(bound), self.pool.acquire(timeout=bound) as conn:
                try:
                    await conn.execute(_TOUCH_DEVICES, ids, [pending[i] for i in ids], [sources.get(i) for i in ids])
                    self._sourced.update(sources)
                except Exception as exc:
                    if is_connection_failure(exc):
                        conn.terminate()  # see the module docstring
                    raise
        except Exception as exc:
            for d, src in sources.items():  # the source is filled in once: try again next time
                self._new_sources.setdefault(d, src)
            log.debug("devices.last_seen not updated: %s", describe(exc))

    async def write_in(self, conn: Conn,
                       outcomes: Sequence[Outcome], *, record_rejections: bool = True) -> WriteResult:
        """Write ``outcomes`` inside the caller's transaction on ``conn`` (`sensor-ingest replay`: the
        readings and the mark on the replayed rows commit together). ``record_rejections`` false: no
        rejection row is written; ``WriteResult.outcomes`` tells what was refused and why.

        New devices and metrics are created in savepoints of the caller's transaction here, so their
        cached ids are forgotten if the write fails: the caller rolls back."""
        try:
            return await self._write(conn, outcomes, record_rejections)
        except BaseException:
            self.ids = IdCache()
            self._attributes.clear()
            raise

    async def _write_once(self, outcomes: Sequence[Outcome]) -> WriteResult:
        async with self.pool.acquire(timeout=self.timeout) as conn:
            try:
                return await self._write(conn, outcomes)
            except Exception as exc:
                if is_connection_failure(exc):
                    # asyncpg may already have aborted the connection and taken it back (its own
                    # cancel request timed out): terminating again would only mask the real error.
                    with contextlib.suppress(asyncpg.InterfaceError):
                        conn.terminate()
                raise

    async def _write(self, conn: Conn,
                     outcomes: Sequence[Outcome], record_rejections: bool = True) -> WriteResult:
        if any(o.readings for o in outcomes):
            outcomes = await self._admit(conn, outcomes)
        try:
            return await self._transact(conn, outcomes, record_rejections, copy=True)
        except _Stored:
            # A reading of the batch is stored already (a device that sends one again in a new
            # message): the COPY ended the transaction. Again, through INSERT ... ON CONFLICT; the
            # first try cost nothing but itself, and spared every batch a savepoint's two round trips.
            return await self._transact(conn, outcomes, record_rejections, copy=False)

    async def _transact(self, conn: Conn, outcomes: Sequence[Outcome], record_rejections: bool, *,
                        copy: bool) -> WriteResult:
        """The batch's transaction (``outcomes`` admitted). ``copy``: the readings by COPY, raising
        _Stored if one is stored already (then the transaction is rolled back)."""
        result = WriteResult()
        dev, met = self.ids.devices, self.ids.metrics
        rows: list[tuple[datetime, int, int, float, int]] = []
        texts: list[tuple[datetime, int, int, str, int]] = []
        row_of: list[tuple[int, Reading]] = []  # (outcome index, reading) of each row, for conflicts
        text_of: list[tuple[int, Reading]] = []
        last_seen: dict[int, datetime] = {}
        first_source: dict[int, str | None] = {}
        sourced = self._sourced
        for i, o in enumerate(outcomes):
            for r in o.readings:
                d = dev[r.device]
                v = r.value
                if isinstance(v, str):
                    texts.append((r.time, d, met[r.metric], v, r.flags))
                    text_of.append((i, r))
                else:
                    rows.append((r.time, d, met[r.metric], float(v), r.flags))
                    row_of.append((i, r))
                seen = last_seen.get(d)
                if seen is None:
                    last_seen[d] = r.time
                    if d not in sourced:
                        first_source.setdefault(d, o.source)
                elif seen < r.time:
                    last_seen[d] = r.time
        conflicts = not copy or any(o.message.redelivered for o in outcomes)
        attributes = self._changed_attributes(outcomes)
        async with conn.transaction():
            if attributes:
                ids = sorted(attributes)  # one lock order for every worker
                await conn.execute(_SET_ATTRIBUTES, ids,
                                   [json.dumps(attributes[i], ensure_ascii=False) for i in ids])
            clashes: dict[int, list[tuple[Reading, Rejection]]] = {}
            new_rows = new_texts = 0
            if rows:
                # Under the calibration lock's shared side until commit (ingest.store.calibration).
                epoch = await conn.fetchval(EPOCH_SQL)
                if epoch != self._calibration_epoch:
                    self._calibrations = await load_calibrations(conn)
                    self._calibration_epoch = epoch
                if self._calibrations:
                    result.calibrated = self._calibrate(rows, row_of, clashes)
            prepared = None
            candidates: list[NewReading] = []
            at: list[int] = []  # the row of each candidate
            if rows and self._alerts is not None:
                # The series' alert_state rows are locked before the readings are stored, so that no
                # evaluator judges a series past readings this transaction holds uncommitted.
                wants = self._alerts.wants
                wanting: dict[int, bool] = {}  # metric id -> whether a rule wants it
                for n, row in enumerate(rows):
                    w = wanting.get(row[2])
                    if w is None:
                        w = wanting[row[2]] = wants(row_of[n][1].metric)
                    if w:
                        candidates.append(NewReading(row_of[n][1], row[1], row[2]))
                        at.append(n)
                if candidates:
                    prepared = await self._alerts.lock(conn, candidates)
            if rows:
                try:
                    result.conflict_path, fresh = await self._store(
                        conn, "readings", rows, row_of, conflicts, result, clashes)
                except _Stored:
                    if prepared is not None:
                        assert self._alerts is not None
                        self._alerts.rolled_back(prepared)
                    raise
                new_rows = len(rows) if fresh is None else len(fresh)
                if self._alerts is not None and prepared is not None:
                    # Only readings new in this transaction are evaluated: a redelivered duplicate
                    # must not fire again.
                    if fresh is None:
                        wanted = candidates  # every row was new
                    else:
                        new = set(fresh)
                        wanted = [c for n, c in zip(at, candidates, strict=True) if n in new]
                    if wanted:
                        result.alerts = await self._alerts.run(conn, wanted, prepared)
            if texts:
                _, fresh = await self._store(conn, "states", texts, text_of, True, result, clashes)
                new_texts = len(texts) if fresh is None else len(fresh)
            if clashes:
                outcomes = [o if i not in clashes else _with_conflicts(o, clashes[i]) for i, o in enumerate(outcomes)]
            rejections = ([_rejection_row(o) for o in outcomes if o.rejection is not None] if record_rejections
                          else [])
            if rejections:
                await conn.copy_records_to_table(
                    "rejected_messages", records=rejections, columns=_REJECTION_COLUMNS_DETAILS
                )
        result.readings, result.states, result.rejections = new_rows, new_texts, len(rejections)
        result.outcomes = outcomes
        if record_rejections:
            result.reasons.update(o.rejection.reason for o in outcomes if o.rejection is not None)
        for d, attrs in attributes.items():
            self._attributes[d] = {**self._attributes.get(d, {}), **attrs}
        pending = self._last_seen
        for d, ts in last_seen.items():
            if d not in pending or pending[d] < ts:
                pending[d] = ts
        for d, src in first_source.items():
            self._new_sources.setdefault(d, src)
        return result

    def _calibrate(self, rows: list[tuple[datetime, int, int, float, int]], owners: list[tuple[int, Reading]],
                   clashes: dict[int, list[tuple[Reading, Rejection]]]) -> int:
        """Apply the calibrations to the numeric rows in place (and to their readings, which the alert
        stage and conflict details read). Every row of a calibrated series is, a boolean stored as 1/0
        in a number metric too, as the rewrite of stored readings does. A value the calibration takes
        past the largest double is a problem of its message (not_finite), and leaves ``rows``.
        Returns how many changed."""
        cal = self._calibrations
        changed = 0
        overflow: list[int] = []
        for n, (t, d, m, v, f) in enumerate(rows):
            factor = cal.factor(d, m, t)
            if factor is None:
                continue
            i, r = owners[n]
            scale, offset = factor
            value = v * scale + offset
            if not math.isfinite(value):
                overflow.append(n)
                clashes.setdefault(i, []).append((r, Rejection(
                    "not_finite", f"{r.metric}: value {v:g} calibrated (x {scale:g} + {offset:g}) is not a finite "
                    "number", r.device)))
            elif value != v:
                rows[n] = (t, d, m, value, f)
                owners[n] = (i, replace(r, value=value))
                changed += 1
        for n in reversed(overflow):
            del rows[n], owners[n]
        return changed

    async def _store(self, conn: Conn, table: str, rows: list[tuple[Any, ...]],
                     owners: list[tuple[int, Reading]], conflict_path: bool, result: WriteResult,
                     clashes: dict[int, list[tuple[Reading, Rejection]]]) -> tuple[bool, list[int] | None]:
        """Insert ``rows``; returns (whether the conflict path ran, the indexes of the rows that were new,
        None when all were). A row whose
        key is stored already (or earlier in the batch) with the same value is a duplicate, counted;
        with another value, a conflict: a problem of its message (the stored value is kept)."""
        if not conflict_path:
            try:
                await conn.copy_records_to_table(table, records=rows, columns=_READING_COLUMNS)
            except asyncpg.UniqueViolationError as exc:
                raise _Stored from exc
            return False, None
        sql = _INSERT_READINGS if table == "readings" else _INSERT_STATES
        inserted = {(d, m, t) for d, m, t in await conn.fetch(sql, *map(list, zip(*rows, strict=True)))}
        if len(inserted) == len(rows):
            return True, None
        taken: set[tuple[int, int, datetime]] = set()
        again: list[int] = []
        fresh: list[int] = []
        for n, (t, d, m, _, _) in enumerate(rows):
            key = (d, m, t)
            if key in inserted and key not in taken:
                taken.add(key)
                fresh.append(n)
            else:
                again.append(n)
        keys = sorted({(rows[n][1], rows[n][2], rows[n][0]) for n in again})
        stored = {(d, m, t): v for d, m, t, v in await conn.fetch(
            _STORED.format(table=table), *map(list, zip(*keys, strict=True)))}
        gone = [rows[n] for n in again if (rows[n][1], rows[n][2], rows[n][0]) not in stored]
        if gone:
            # Stored a moment ago, gone now (a retention job dropped its chunk): not a conflict. Raised
            # as a failure of the batch, which the pipeline narrows and stores, never drops.
            raise RuntimeError(f"{len(gone)} {table} row(s) conflicted on insert but are no longer stored")
        for n in again:
            t, d, m, v, _ = rows[n]
            old = stored[(d, m, t)]
            if old == v or (table == "readings" and self._calibrations.factor(d, m, t) is not None
                            and math.isclose(old, v, rel_tol=1e-9, abs_tol=1e-9 * max(1.0, abs(old), abs(v)))):
                # In a calibrated series, the same value to 9 digits: a stored reading rewritten by a
                # correction (another formula, other rounding) stays a duplicate.
                result.duplicates += 1
                continue
            i, r = owners[n]
            clashes.setdefault(i, []).append((r, Rejection(
                "conflict", f"{r.metric} at {r.time.isoformat()}: the value {_shown(r.value)} differs from the "
                f"stored {_shown(old)}; the stored (first) value is kept", r.device)))
        return True, fresh

    def _changed_attributes(self, outcomes: Sequence[Outcome]) -> dict[int, dict[str, str]]:
        """Topic-capture attributes that differ from what this writer last committed, per device id
        (known devices only: after _admit). Usually empty: captures rarely change."""
        changed: dict[int, dict[str, str]] = {}
        dev = self.ids.devices
        for o in outcomes:
            if not o.attributes:
                continue
            for d in {dev[r.device] for r in o.readings}:
                known = self._attributes.get(d, {})
                diff = {k: e for k, v in o.attributes.items() if known.get(k) != (e := escape(v))}
                if diff:
                    changed.setdefault(d, {}).update(diff)
        return changed

    async def _admit(self, conn: Conn, outcomes: Sequence[Outcome]) -> list[Outcome]:
        """Create the ids of new devices and metrics within each source's budget; the readings of
        keys beyond it become rejections of their message."""
        new = await self.ids.new_devices(conn, (r.device for o in outcomes for r in o.readings))
        if new and self._known_only:
            outcomes = [_unknown(o, new) if o.source in self._known_only else o for o in outcomes]
            new = {r.device for o in outcomes for r in o.readings if r.device in new}
        if new:
            denied = self._spend(new, outcomes, lambda r: r.device, self._device_budget)
            first_source: dict[str, str | None] = {}
            for o in outcomes:
                for r in o.readings:
                    first_source.setdefault(r.device, o.source)
            await self.ids.create_devices(conn, new - denied, first_source)
            if denied:
                outcomes = [_without(o, lambda r: r.device in denied, "device", "ingest.max_new_devices_per_minute",
                                     self._device_budget.limit) for o in outcomes]
        new = await self.ids.new_metrics(conn, (r.metric for o in outcomes for r in o.readings))
        if new:
            denied = self._spend(new, outcomes, lambda r: r.metric, self._metric_budget)
            first: dict[str, MetricRow] = {}
            catalog = self._catalog
            for o in outcomes:
                for r in o.readings:
                    if r.metric in new and r.metric not in denied and r.metric not in first:
                        first[r.metric] = (MetricRow(r.unit, _kind(r.value)) if catalog is None
                                           else catalog.row(r.metric, r.unit, _kind(r.value)))
            await self.ids.create_metrics(conn, first)
            if denied:
                outcomes = [_without(o, lambda r: r.metric in denied, "metric", "ingest.max_new_metrics_per_minute",
                                     self._metric_budget.limit) for o in outcomes]
        return list(outcomes)

    def _spend(self, new: set[str], outcomes: Iterable[Outcome], key: Callable[[Reading], str],
               budget: NewKeyBudget) -> set[str]:
        """Admit new keys in order of first appearance, each against its message's source."""
        now = self._clock()
        decided: set[str] = set()
        denied: set[str] = set()
        for o in outcomes:
            for r in o.readings:
                k = key(r)
                if k in new and k not in decided:
                    decided.add(k)
                    if not budget.admit(o.source or "-", now):
                        denied.add(k)
        return denied


def _without(o: Outcome, denied: Callable[[Reading], bool], what: str, key: str, limit: int) -> Outcome:
    """``o`` without its readings of denied new keys, which become one more problem of the message."""
    dropped = [r for r in o.readings if denied(r)]
    if not dropped:
        return o
    names = sorted({r.device if what == "device" else r.metric for r in dropped})
    shown = ", ".join(repr(n[:64]) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    problem = Rejection(
        "too_many_new_series",
        f"{len(dropped)} reading(s) of new {what} {shown} not stored: source {o.source!r} already created "
        f"{limit} new {what}s this minute ({key} = {limit})",
        dropped[0].device,
    )
    problems = [*o.problems, problem]
    return Outcome(o.message, o.source, [r for r in o.readings if not denied(r)], summarize(problems), o.ignored,
                   problems, o.attributes)


def _shown(v: object) -> str:
    return repr(v[:64]) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else repr(v)


def _with_conflicts(o: Outcome, conflicts: list[tuple[Reading, Rejection]]) -> Outcome:
    """``o`` with its readings that conflict with stored values turned into problems of its row."""
    problems = [*o.problems, *(p for _, p in conflicts)]
    # By key: the reading of a conflict may be its calibrated copy (Writer._calibrate).
    clashed = {(r.device, r.metric, r.time) for r, _ in conflicts}
    return replace(o, readings=[r for r in o.readings if (r.device, r.metric, r.time) not in clashed],
                   rejection=summarize(problems),
                   problems=problems)


def _unknown(o: Outcome, new: set[str]) -> Outcome:
    """``o`` (of a source with device_policy = "known") without its readings of devices the register
    lacks, which become one more problem of the message."""
    dropped = sorted({r.device for r in o.readings if r.device in new})
    if not dropped:
        return o
    shown = ", ".join(repr(d[:64]) for d in dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
    problem = Rejection(
        "unknown_device", f"device {shown} is not in the device register and source {o.source!r} has device_policy "
        '= "known": add the device to the register (the devices table), or set device_policy = "register"',
        escape(dropped[0][:MAX_NAME]))
    problems = [*o.problems, problem]
    return replace(o, readings=[r for r in o.readings if r.device not in new], rejection=summarize(problems),
                   problems=problems)
