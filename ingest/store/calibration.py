"""Calibrations: an affine correction per device and metric from an effective time on.

Stored value = value x scale + offset, applied by the writer to numeric readings (after the catalog's
unit conversion; its range checks judge the value as measured). A calibration's span runs from its
effective time to the next calibration of the series.

Adding or correcting a calibration for a past time changes the readings of its span that are stored
already. They are rewritten from the calibration they were stored with (``from_scale``,
``from_offset``) to the new one in bounded transactions (``rewrite_step``), each moving the row's
``rewrite_cursor`` forward; the last takes all that is left and clears it. The rule for a reading at t
of a calibration whose cursor is set: before the cursor, the new calibration; at or after it, the
previous one (it will be rewritten). The writer applies the same rule to new readings.

Why each reading is rewritten exactly once, whatever ingest does meanwhile: every change to the table
(``set_calibration``, each ``rewrite_step``) holds an advisory lock exclusively and bumps
``calibration_epoch``; each write transaction of the writer takes the same lock shared and reads the
epoch after it is granted (``sensor_ingest_calibration_epoch()``), so it either commits before a step
starts, having applied the rule with the cursor that step starts from (its readings before the cursor
carry the new calibration and no step touches them; those at or after it carry the previous one and
this step or a later one rewrites them), or it starts after the step has committed and applies the
cursor the step left. Readings are unique per (device, metric, time), so a span's readings at or after
the cursor are a well-ordered set that the steps cut into consecutive, disjoint pieces.

The rewrite computes ``(value - from_offset) / from_scale * scale + offset``: from the identity (a first
calibration) this is exactly ``raw * scale + offset``, what the writer stores; from another calibration
(a correction) it may differ from it in the last bits of the double (near zero, an absolute error: the
writer takes a redelivered value of a calibrated series within 1e-9 of the stored one as a duplicate).

A calibration that would take a stored reading of its span past the largest double is refused when it
is set (PostgreSQL would refuse the rewrite's UPDATE, and no step could ever go on): the formula is
monotonic in the value, so checking the span's least and greatest stored values is enough. A reading
stored after that (at or after the cursor, with the previous calibration) can still make a step fail:
``rewrite_step`` then says which reading and what to do. While nothing of a calibration's span is
rewritten yet (its cursor is still at its effective time) it can be corrected, which only changes what
the rewrite converts to; once part of the span is rewritten, readings on either side of the cursor carry
different calibrations and a correction must wait for the rewrite to finish.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = ["LOCK_KEY", "Calibration", "CalibrationError", "Calibrations", "Change", "Factor", "load_calibrations",
           "out_of_range", "pending_readings", "rewrite_step", "rewrite_value", "series_calibrations",
           "set_calibration"]

Change: TypeAlias = Literal["added", "corrected", "unchanged"]  # what set_calibration did
Factor: TypeAlias = tuple[float, float]  # (scale, offset)

LOCK_KEY = 7215150001  # the advisory lock of schemas/migrations/0004_register.sql
EPOCH_SQL = "SELECT sensor_ingest_calibration_epoch()"
_COLUMNS = ("id, device_id, metric_id, effective_from, scale, offset_value, from_scale, from_offset, rewrite_cursor,"
            " rewritten, comment")
_BUMP = "UPDATE calibration_epoch SET epoch = epoch + 1"
# Where a calibration's span ends: the next calibration of its series; NULL: open-ended.
_NEXT = ("SELECT min(effective_from) FROM calibrations WHERE device_id = $1 AND metric_id = $2 "
         "AND effective_from > $3")
_IN_SPAN = "device_id = $1 AND metric_id = $2 AND time >= $3 AND ($4::timestamptz IS NULL OR time < $4)"
_EXTREMES = f"SELECT min(value) AS lo, max(value) AS hi FROM readings WHERE {_IN_SPAN}"
_TIME_OF = f"SELECT min(time) FROM readings WHERE {_IN_SPAN} AND value = $5"


class CalibrationError(ValueError):
    """A calibration that cannot be set now; the message says why and what to do. ``pending``: the
    calibration of the series whose rewrite must be finished first, when that is the reason."""

    def __init__(self, message: str, pending: Calibration | None = None) -> None:
        super().__init__(message)
        self.pending = pending


@dataclass(frozen=True, slots=True)
class Calibration:
    id: int
    device_id: int
    metric_id: int
    effective_from: datetime
    scale: float
    offset: float
    from_scale: float = 1.0
    from_offset: float = 0.0
    rewrite_cursor: datetime | None = None  # None: every reading of its span carries this calibration
    rewritten: int = 0
    comment: str | None = None

    def factor_at(self, t: datetime) -> tuple[float, float]:
        """(scale, offset) a reading of this calibration's span at ``t`` is stored with."""
        if self.rewrite_cursor is not None and t >= self.rewrite_cursor:
            return self.from_scale, self.from_offset
        return self.scale, self.offset

    @classmethod
    def of(cls, row: asyncpg.Record) -> Calibration:
        return cls(row["id"], row["device_id"], row["metric_id"], row["effective_from"], row["scale"],
                   row["offset_value"], row["from_scale"], row["from_offset"], row["rewrite_cursor"],
                   row["rewritten"], row["comment"])


class Calibrations:
    """Every calibration, by series, for the writer's lookups."""

    __slots__ = ("_series",)

    def __init__(self, calibrations: Iterable[Calibration] = ()) -> None:
        series: dict[tuple[int, int], list[Calibration]] = {}
        for c in sorted(calibrations, key=lambda c: (c.device_id, c.metric_id, c.effective_from)):
            series.setdefault((c.device_id, c.metric_id), []).append(c)
        self._series = {k: ([c.effective_from for c in v], v) for k, v in series.items()}

    def __bool__(self) -> bool:
        return bool(self._series)

    def factor(self, device_id: int, metric_id: int, t: datetime) -> tuple[float, float] | None:
        """(scale, offset) for a new reading, or None (no calibration applies: stored as it is)."""
        found = self._series.get((device_id, metric_id))
        if found is None:
            return None
        times, cals = found
        i = bisect_right(times, t) - 1
        return None if i < 0 else cals[i].factor_at(t)


async def load_calibrations(conn: Conn) -> Calibrations:
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM calibrations")
    return Calibrations([Calibration.of(r) for r in rows])


async def series_calibrations(conn: Conn, device_id: int, metric_id: int) -> list[Calibration]:
    """The calibrations of one series, in effective_from order."""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM calibrations WHERE device_id = $1 AND metric_id = $2 "
                            "ORDER BY effective_from", device_id, metric_id)
    return [Calibration.of(r) for r in rows]


async def pending_readings(conn: Conn, c: Calibration) -> int:
    """How many stored readings of ``c``'s span still carry the calibration they were stored with (at
    or after its cursor); 0 when it is applied. A count of a moment: live ingest may add some."""
    if c.rewrite_cursor is None:
        return 0
    end = await conn.fetchval(_NEXT, c.device_id, c.metric_id, c.effective_from)
    n = await conn.fetchval(
        "SELECT count(*) FROM readings WHERE device_id = $1 AND metric_id = $2 AND time >= $3 "
        "AND ($4::timestamptz IS NULL OR time < $4)", c.device_id, c.metric_id, c.rewrite_cursor, end)
    return int(n)


def rewrite_value(value: float, frm: Factor, to: Factor) -> float:
    """A stored ``value`` that carries ``frm``, rewritten to ``to``: rewrite_step's formula in the same
    double arithmetic (PostgreSQL's float8 rounds as Python's float does). Not finite: past the
    largest double, where PostgreSQL refuses the UPDATE (22003) instead."""
    return (value - frm[1]) / frm[0] * to[0] + to[1]


def out_of_range(lo: float, hi: float, frm: Factor, to: Factor) -> float | None:
    """Of a span's least and greatest stored values, one that rewriting from ``frm`` to ``to`` takes past
    the largest double; None: no stored value between them can go there either, since every operation
    of the formula (rounding included) is monotonic in the value, so each intermediate result lies
    between those of the two extremes."""
    for v in (lo, hi):
        if not math.isfinite(rewrite_value(v, frm, to)):
            return v
    return None


def _shown(f: Factor) -> str:
    return f"scale {f[0]:g} offset {f[1]:g}"


def _span_end(rows: list[asyncpg.Record], effective_from: datetime) -> datetime | None:
    later = [r["effective_from"] for r in rows if r["effective_from"] > effective_from]
    return min(later) if later else None


async def _extremes(conn: Conn, device_id: int, metric_id: int, start: datetime,
                    end: datetime | None) -> tuple[float, float] | None:
    """The least and greatest stored values of the series in [start, end); None: nothing is stored there.
    One scan of that range."""
    row = await conn.fetchrow(_EXTREMES, device_id, metric_id, start, end)
    return None if row is None or row["lo"] is None else (row["lo"], row["hi"])


async def _reading(conn: Conn, device_id: int, metric_id: int, start: datetime, end: datetime | None,
                   value: float) -> str:
    """"the stored reading V at T", for a message."""
    t = await conn.fetchval(_TIME_OF, device_id, metric_id, start, end, value)
    return f"the stored reading {value:g}" + ("" if t is None else f" at {t.isoformat()}")


async def set_calibration(conn: Conn, device_id: int, metric_id: int, effective_from: datetime,
                          scale: float | None, offset: float | None,
                          comment: str | None = None) -> tuple[Calibration, Change, Factor | None]:
    """Add the calibration of (device, metric) from ``effective_from``, or correct the one from that time.

    ``scale`` or ``offset`` None: the stored one of the calibration from exactly that time, so that a
    correction of one parameter keeps the other; for a new calibration, 1 or 0.

    Returns it, what was done ("unchanged": the same scale and offset were there, also while their
    rewrite is under way; a new comment is still recorded) and the (scale, offset) it had before (None:
    added). When stored readings of its span carry another calibration, its ``rewrite_cursor`` is set to
    ``effective_from``: ``rewrite_step`` then rewrites them.

    Refused (CalibrationError): while a calibration of the series is still being rewritten (``pending``
    names it), except the correction of that very calibration while nothing of its span is rewritten
    yet; when the rewrite would take a stored reading of the span past the largest double; for a metric
    whose readings are not numbers."""
    if (scale is not None and (not math.isfinite(scale) or scale == 0)) or (
            offset is not None and not math.isfinite(offset)):
        raise CalibrationError(f"scale {scale!r} and offset {offset!r}: both must be finite numbers, scale not 0")
    if effective_from.tzinfo is None:
        raise CalibrationError("the effective time needs a UTC offset")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        kind = await conn.fetchval("SELECT kind FROM metrics WHERE id = $1", metric_id)
        if kind is None:
            raise CalibrationError(f"no metric with id {metric_id}")
        if kind != "number":
            raise CalibrationError(f"the metric's readings are of kind {kind!r}: only numbers are calibrated")
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM calibrations WHERE device_id = $1 AND metric_id = $2 "
                                "ORDER BY effective_from FOR UPDATE", device_id, metric_id)
        same = next((Calibration.of(r) for r in rows if r["effective_from"] == effective_from), None)
        old = None if same is None else (same.scale, same.offset)
        new = (scale if scale is not None else 1.0 if old is None else old[0],
               offset if offset is not None else 0.0 if old is None else old[1])
        if same is not None and old == new:
            # Nothing to change, also while a rewrite is under way: the same command run again after an
            # interruption is then a no-op here and its caller's rewrite resumes.
            if comment is not None and comment != same.comment:
                row = await conn.fetchrow(
                    f"UPDATE calibrations SET comment = $2, updated_at = now() WHERE id = $1 RETURNING {_COLUMNS}",
                    same.id, comment)
                assert row is not None
                same = Calibration.of(row)
                await conn.execute(_BUMP)
            return same, "unchanged", old
        busy = [Calibration.of(r) for r in rows if r["rewrite_cursor"] is not None]
        # Its rewrite not begun: every stored reading of its span still carries from_*, so a correction
        # only changes what the rewrite converts them to (the way out of a rewrite refused by a typo).
        unbegun = same is not None and same.rewrite_cursor == effective_from
        if busy and not (unbegun and len(busy) == 1):
            b = busy[0]
            assert b.rewrite_cursor is not None
            raise CalibrationError(
                f"the calibration from {b.effective_from.isoformat()} of this series is still being applied to "
                f"its stored readings (from {b.rewrite_cursor.isoformat()} on): finish it first with "
                "`sensor-ingest devices recalibrate DEVICE METRIC`", pending=b)
        if same is not None:
            was = (same.from_scale, same.from_offset) if unbegun else (same.scale, same.offset)
        else:
            before = [r for r in rows if r["effective_from"] < effective_from]
            was = (before[-1]["scale"], before[-1]["offset_value"]) if before else (1.0, 0.0)
        end = _span_end(rows, effective_from)
        cursor = None
        extremes = None if was == new else await _extremes(conn, device_id, metric_id, effective_from, end)
        if extremes is not None:
            bad = out_of_range(*extremes, was, new)
            if bad is not None:
                reading = await _reading(conn, device_id, metric_id, effective_from, end, bad)
                raise CalibrationError(f"{_shown(new)} would take {reading} (stored with {_shown(was)}) past the "
                                       "largest double (about 1.8e308): check the scale and offset")
            cursor = effective_from
        row = await conn.fetchrow(
            f"""INSERT INTO calibrations (device_id, metric_id, effective_from, scale, offset_value, comment,
                                          from_scale, from_offset, rewrite_cursor)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                ON CONFLICT (device_id, metric_id, effective_from) DO UPDATE SET
                    scale = EXCLUDED.scale, offset_value = EXCLUDED.offset_value,
                    comment = coalesce(EXCLUDED.comment, calibrations.comment),
                    from_scale = EXCLUDED.from_scale, from_offset = EXCLUDED.from_offset,
                    rewrite_cursor = EXCLUDED.rewrite_cursor, rewritten = 0, updated_at = now()
                RETURNING {_COLUMNS}""",
            device_id, metric_id, effective_from, new[0], new[1], comment, was[0], was[1], cursor)
        await conn.execute(_BUMP)
        assert row is not None
        return Calibration.of(row), "added" if same is None else "corrected", old


async def rewrite_step(conn: Conn, calibration_id: int, max_rows: int) -> tuple[int, bool]:
    """Rewrite at most ``max_rows`` stored readings of a calibration's span from the calibration
    they carry to it, in one transaction. Returns (readings rewritten, whether it is now done). Running
    it on a calibration that is done rewrites nothing. A stored reading that the rewrite would take past
    the largest double rolls the step back: CalibrationError, saying which one and what to do."""
    import asyncpg

    if max_rows < 1:
        raise ValueError(f"max_rows {max_rows}: at least 1, or the cursor would never move")
    c: Calibration | None = None
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM calibrations WHERE id = $1 FOR UPDATE",
                                      calibration_id)
            if row is None:
                raise CalibrationError(f"no calibration with id {calibration_id}")
            c = Calibration.of(row)
            if c.rewrite_cursor is None:
                return 0, True
            end = await conn.fetchval(_NEXT, c.device_id, c.metric_id, c.effective_from)
            # The time of the first reading past this step's share; none: this step takes all that is left.
            stop = await conn.fetchval(
                f"SELECT time FROM readings WHERE {_IN_SPAN} ORDER BY time OFFSET $5 LIMIT 1",
                c.device_id, c.metric_id, c.rewrite_cursor, end, max_rows)
            status = await conn.execute(
                f"UPDATE readings SET value = (value - $6) / $5 * $7 + $8 WHERE {_IN_SPAN}",
                c.device_id, c.metric_id, c.rewrite_cursor, stop if stop is not None else end,
                c.from_scale, c.from_offset, c.scale, c.offset)
            n = int(status.split()[-1])
            await conn.execute("UPDATE calibrations SET rewrite_cursor = $2, rewritten = rewritten + $3, "
                               "updated_at = now() WHERE id = $1", c.id, stop, n)
            await conn.execute(_BUMP)
            return n, stop is None
    except asyncpg.DataError as exc:
        if c is None:
            raise
        raise await _unrewritable(conn, c, exc) from exc


async def _unrewritable(conn: Conn, c: Calibration, exc: Exception) -> CalibrationError:
    """Why a step of ``c``'s rewrite failed (it rolled back), and the way out. The readings at or
    after the cursor were stored after the calibration was set (set_calibration checked those before),
    by the writer with the previous calibration."""
    from ingest.store.classify import describe

    cursor = c.rewrite_cursor
    assert cursor is not None
    end = await conn.fetchval(_NEXT, c.device_id, c.metric_id, c.effective_from)
    frm, to = (c.from_scale, c.from_offset), (c.scale, c.offset)
    extremes = await _extremes(conn, c.device_id, c.metric_id, cursor, end)
    bad = None if extremes is None else out_of_range(*extremes, frm, to)
    if bad is None:
        what = f"a stored reading of its span cannot be rewritten ({describe(exc)})"
    else:
        reading = await _reading(conn, c.device_id, c.metric_id, cursor, end, bad)
        what = f"it would take {reading} (stored with {_shown(frm)}) past the largest double"
    if cursor == c.effective_from:
        todo = ("Nothing of its span is rewritten yet, so it can be corrected: `sensor-ingest devices calibrate "
                f"DEVICE METRIC --from {c.effective_from.isoformat()}` with the right --scale and --offset")
    else:
        todo = (f"Its readings before {cursor.isoformat()} carry it already, so it cannot be corrected before it is "
                "finished: fix or delete that reading, then run `sensor-ingest devices recalibrate DEVICE METRIC` "
                "again")
    return CalibrationError(f"the calibration from {c.effective_from.isoformat()} ({_shown(to)}): {what}; this "
                            f"step rolled back. {todo}")
