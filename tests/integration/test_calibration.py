"""Calibrations and their rewrite of stored readings (issue #15), on the real database and with the real service.

Every stored reading has a raw value of its own (1000 + i, ...), so each one can be checked: before the
effective time it is the raw value, at or after it raw * scale + offset, computed here with the same
double arithmetic as the writer and the rewrite (exact for a first calibration; a correction divides
the previous calibration out, which may differ in the last bits: 1e-9 relative then). A reading
calibrated twice, or not at all, differs from that by far more.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import psycopg
import pytest
import pytest_asyncio

from ingest.alerts.model import Rule
from ingest.alerts.runtime import AlertRuntime, RuleSet
from ingest.alerts.stage import AlertStage
from ingest.cli import main
from ingest.model import RawMessage, Reading
from ingest.process import Outcome
from ingest.settings import DatabaseSettings
from ingest.store.calibration import LOCK_KEY, CalibrationError, rewrite_step, set_calibration
from ingest.store.pool import create_pool
from ingest.store.writer import Writer
from tests.integration.harness import IngestProcess, Publisher, native, write_config
from tests.services import REPO, Mosquitto, until, wait_until

if TYPE_CHECKING:
    from ingest.store.calibration import Conn

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
DEVICE, METRIC = "hn-wl-1", "distance"


def at(minutes: float, base: datetime = T0) -> datetime:
    return base + timedelta(minutes=minutes)


def z(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def raw(i: int) -> float:
    return 1000.0 + i


@pytest_asyncio.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(database_url)
    yield c
    await c.close()


async def make_series(c: Conn, device: str = DEVICE, metric: str = METRIC,
                      kind: str = "number") -> tuple[int, int]:
    d = await c.fetchval("INSERT INTO devices (uid) VALUES ($1) ON CONFLICT (uid) DO UPDATE SET uid = $1 "
                         "RETURNING id", device)
    m = await c.fetchval("INSERT INTO metrics (name, kind) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET kind = $2 "
                         "RETURNING id", metric, kind)
    return int(d), int(m)


def message(redelivered: bool = False) -> RawMessage:
    return RawMessage("x/hn-wl-1/up", b"{}", T0, 1, 1, 1, 1, redelivered)


async def insert(c: Conn, d: int, m: int, *rows: tuple[datetime, float]) -> None:
    """Stored as they are (as the writer stores readings at or after a rewrite's cursor: with the
    calibration they are rewritten from)."""
    await c.executemany("INSERT INTO readings (time, device_id, metric_id, value) VALUES ($1, $2, $3, $4)",
                        [(t, d, m, v) for t, v in rows])


async def store(c: Conn, d: int, m: int, n: int) -> None:
    """n readings, one a minute from T0, raw value 1000 + i (as the service stores them uncalibrated)."""
    await c.executemany("INSERT INTO readings (time, device_id, metric_id, value) VALUES ($1, $2, $3, $4)",
                        [(at(i), d, m, raw(i)) for i in range(n)])


async def values(c: Conn, d: int, m: int) -> list[float]:
    """The stored values, in time order (reading i at index i)."""
    return [r["value"] for r in await c.fetch(
        "SELECT value FROM readings WHERE device_id = $1 AND metric_id = $2 ORDER BY time", d, m)]


async def calibration(c: Conn, cid: int) -> asyncpg.Record:
    row = await c.fetchrow("SELECT * FROM calibrations WHERE id = $1", cid)
    assert row is not None
    return row


async def rewrite_all(c: Conn, cid: int, max_rows: int) -> list[int]:
    """rewrite_step until done; the readings each step rewrote."""
    steps = []
    done = False
    while not done:
        n, done = await rewrite_step(c, cid, max_rows)
        steps.append(n)
    return steps


def expected(n: int, spans: list[tuple[int, float, float]]) -> list[float]:
    """Reading i's value when the calibration (scale, offset) applies from minute ``start`` on, per span."""
    out = []
    for i in range(n):
        factor = None
        for start, scale, offset in spans:
            if i >= start:
                factor = (scale, offset)
        out.append(raw(i) if factor is None else raw(i) * factor[0] + factor[1])
    return out


def close_to(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(math.isclose(g, w, rel_tol=1e-9) for g, w in zip(got, want, strict=True))


# -- the store: set_calibration and rewrite_step ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_readings_before_are_untouched_and_after_rewritten_exactly_once(conn: asyncpg.Connection) -> None:
    d, m = await make_series(conn)
    await store(conn, d, m, 20)
    c, change, was = await set_calibration(conn, d, m, at(8), 2.0, 0.5, "new mount")
    assert (change, was) == ("added", None)
    assert (c.rewrite_cursor, c.from_scale, c.from_offset) == (at(8), 1.0, 0.0)
    assert await values(conn, d, m) == expected(20, [])  # recorded; nothing rewritten yet

    assert await rewrite_all(conn, c.id, 5) == [5, 5, 2]
    want = expected(20, [(8, 2.0, 0.5)])
    assert await values(conn, d, m) == want  # exact: raw * 2 + 0.5, at exactly 03:08 too
    row = await calibration(conn, c.id)
    assert (row["rewrite_cursor"], row["rewritten"], row["comment"]) == (None, 12, "new mount")

    # Again: nothing to do, nothing changes.
    assert await rewrite_step(conn, c.id, 5) == (0, True)
    again, change, was = await set_calibration(conn, d, m, at(8), 2.0, 0.5)
    assert (change, was, again.rewrite_cursor) == ("unchanged", (2.0, 0.5), None)
    assert await rewrite_step(conn, c.id, 5) == (0, True)
    assert await values(conn, d, m) == want
    assert (await calibration(conn, c.id))["rewritten"] == 12


@pytest.mark.asyncio
async def test_an_interrupted_rewrite_resumed_later_rewrites_each_reading_once(database_url: str) -> None:
    first = await asyncpg.connect(database_url)
    d, m = await make_series(first)
    await store(first, d, m, 30)
    c, _, _ = await set_calibration(first, d, m, at(0), -1.0, 5.25)
    for _ in range(3):
        assert await rewrite_step(first, c.id, 4) == (4, False)
    assert (await calibration(first, c.id))["rewrite_cursor"] == at(12)
    assert await values(first, d, m) == expected(12, [(0, -1.0, 5.25)]) + [raw(i) for i in range(12, 30)]
    await first.close()  # the "process" ends here

    later = await asyncpg.connect(database_url)
    try:
        assert await rewrite_all(later, c.id, 7) == [7, 7, 4]
        assert await values(later, d, m) == expected(30, [(0, -1.0, 5.25)])
        row = await calibration(later, c.id)
        assert (row["rewrite_cursor"], row["rewritten"]) == (None, 30)
    finally:
        await later.close()


@pytest.mark.asyncio
async def test_the_writer_follows_the_cursor_of_an_interrupted_rewrite(database_url: str) -> None:
    """New readings of a series half rewritten: before the cursor the new calibration, at or after it
    the previous one, so that the rest of the rewrite takes them once."""
    pool = await create_pool(DatabaseSettings(url=database_url))
    try:
        async with pool.acquire() as c:
            d, m = await make_series(c)
            await c.executemany("INSERT INTO readings (time, device_id, metric_id, value) VALUES ($1, $2, $3, $4)",
                                [(at(i), d, m, raw(i)) for i in range(0, 40, 2)])  # even minutes
            cal, _, _ = await set_calibration(c, d, m, at(10), 3.0, -2.0)
            for _ in range(2):
                await rewrite_step(c, cal.id, 4)  # minutes 10 to 24 rewritten; the cursor is at 26
            assert (await calibration(c, cal.id))["rewrite_cursor"] == at(26)
        writer = Writer(pool)
        odd = [Reading(DEVICE, METRIC, at(i), raw(i)) for i in range(1, 40, 2)]  # before, in, after the cursor
        result = await writer.write([Outcome(RawMessage("x/hn-wl-1/up", b"{}", T0, 1, 1, 1, 1, False), "native", odd)])
        assert result.readings == 20
        assert result.calibrated == 8  # minutes 11 to 25: the new calibration; from 27 on: stored raw, for now
        async with pool.acquire() as c:
            assert await values(c, d, m) == expected(26, [(10, 3.0, -2.0)]) + [raw(i) for i in range(26, 40)]
            assert await rewrite_all(c, cal.id, 5) == [5, 5, 4]
            assert await values(c, d, m) == expected(40, [(10, 3.0, -2.0)])
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_value_the_calibration_takes_past_the_largest_double_is_rejected(database_url: str) -> None:
    """Finiteness is checked before calibration; the writer checks the calibrated value once more."""
    pool = await create_pool(DatabaseSettings(url=database_url))
    try:
        async with pool.acquire() as c:
            d, m = await make_series(c)
            await set_calibration(c, d, m, at(0), 1e300, 0.0)
        writer = Writer(pool)
        readings = [Reading(DEVICE, METRIC, at(1), 2.0), Reading(DEVICE, METRIC, at(2), 1e10)]
        result = await writer.write([Outcome(RawMessage("x/hn-wl-1/up", b"{}", T0, 1, 1, 1, 1, False), "native",
                                             readings)])
        assert (result.readings, result.rejections, result.calibrated) == (1, 1, 1)
        async with pool.acquire() as c:
            assert await values(c, d, m) == [2e300]
            row = await c.fetchrow("SELECT reason, detail FROM rejected_messages")
        assert row is not None
        assert row["reason"] == "not_finite"
        assert "calibrated" in row["detail"]
        assert "1e+10" in row["detail"]
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_an_alert_rule_judges_the_calibrated_value(database_url: str) -> None:
    """A water level of 1500 - distance: the distances (all above 400) must not fire a rule on level > 400."""
    rule = Rule("level-high", METRIC, "above", 400.0, clear=350.0)
    pool = await create_pool(DatabaseSettings(url=database_url))
    try:
        async with pool.acquire() as c:
            d, m = await make_series(c)
            await set_calibration(c, d, m, at(0), -1.0, 1500.0)
        alerts = AlertStage(AlertRuntime(RuleSet((rule,), {}, max_notify_age=3600.0)), clock=lambda: at(10))
        writer = Writer(pool, alerts=alerts)
        msg = RawMessage("x/hn-wl-1/up", b"{}", T0, 1, 1, 1, 1, False)
        readings = [Reading(DEVICE, METRIC, at(i), v) for i, v in enumerate([1200.0, 1050.0, 1160.0])]
        result = await writer.write([Outcome(msg, "native", readings)])
        assert result.calibrated == 3
        rows = await pool.fetch("SELECT status, event_time, value FROM alert_events ORDER BY id")
        assert [tuple(r) for r in rows] == [("firing", at(1), 450.0), ("resolved", at(2), 340.0)]
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_correction_rewrites_from_the_old_parameters_to_the_new(conn: asyncpg.Connection) -> None:
    d, m = await make_series(conn)
    await store(conn, d, m, 20)
    c, _, _ = await set_calibration(conn, d, m, at(5), 2.0, 3.0)
    await rewrite_all(conn, c.id, 100)
    fixed, change, was = await set_calibration(conn, d, m, at(5), -1.0, 4.25, "the mount height was wrong")
    assert (change, was) == ("corrected", (2.0, 3.0))
    assert fixed.id == c.id
    assert (fixed.from_scale, fixed.from_offset, fixed.rewrite_cursor, fixed.rewritten) == (2.0, 3.0, at(5), 0)
    assert await rewrite_all(conn, c.id, 6) == [6, 6, 3]
    got = await values(conn, d, m)
    assert got[:5] == expected(5, [])  # before: untouched, exactly
    assert close_to(got, expected(20, [(5, -1.0, 4.25)]))
    assert (await calibration(conn, c.id))["rewritten"] == 15


@pytest.mark.asyncio
async def test_a_calibration_inserted_between_two_only_touches_its_own_span(conn: asyncpg.Connection) -> None:
    d, m = await make_series(conn)
    await store(conn, d, m, 30)
    a, _, _ = await set_calibration(conn, d, m, at(5), 2.0, 0.0)
    await rewrite_all(conn, a.id, 100)
    c, _, _ = await set_calibration(conn, d, m, at(20), 4.0, 1.0)
    await rewrite_all(conn, c.id, 100)
    # A (from 5) still covers 5..19 until B splits it: B's readings 10..19 carry A's factor now.
    b, change, _ = await set_calibration(conn, d, m, at(10), 0.5, -3.0)
    assert change == "added"
    assert (b.from_scale, b.from_offset, b.rewrite_cursor) == (2.0, 0.0, at(10))
    assert await rewrite_all(conn, b.id, 4) == [4, 4, 2]
    assert await values(conn, d, m) == expected(30, [(5, 2.0, 0.0), (10, 0.5, -3.0), (20, 4.0, 1.0)])
    rows = await conn.fetch("SELECT effective_from, rewritten, rewrite_cursor FROM calibrations ORDER BY 1")
    # A rewrote 5..29 before C took 20..29 over (and then B 10..19): counts are of what each did.
    assert [tuple(r) for r in rows] == [(at(5), 25, None), (at(10), 10, None), (at(20), 10, None)]


@pytest.mark.asyncio
async def test_refused_while_another_calibration_of_the_series_is_being_rewritten(conn: asyncpg.Connection) -> None:
    d, m = await make_series(conn)
    await store(conn, d, m, 20)
    a, _, _ = await set_calibration(conn, d, m, at(0), 2.0, 0.0)
    await rewrite_step(conn, a.id, 3)
    before = await values(conn, d, m)
    with pytest.raises(CalibrationError, match="sensor-ingest devices recalibrate") as refused:
        await set_calibration(conn, d, m, at(10), 3.0, 0.0)
    assert refused.value.pending is not None
    assert (refused.value.pending.id, refused.value.pending.rewrite_cursor) == (a.id, at(3))
    with pytest.raises(CalibrationError, match="still being applied"):
        await set_calibration(conn, d, m, at(0), 5.0, 0.0)  # a correction of the one being rewritten
    # The same calibration again is no change: the command run again after an interruption resumes.
    same, change, _ = await set_calibration(conn, d, m, at(0), 2.0, 0.0)
    assert (change, same.rewrite_cursor) == ("unchanged", at(3))
    assert await values(conn, d, m) == before
    assert await conn.fetchval("SELECT count(*) FROM calibrations") == 1
    # Another series is not held up.
    d2, m2 = await make_series(conn, "hn-wl-2")
    other, change, _ = await set_calibration(conn, d2, m2, at(0), 3.0, 0.0)
    assert (change, other.rewrite_cursor) == ("added", None)  # no stored reading: nothing to rewrite


@pytest.mark.asyncio
async def test_only_numbers_are_calibrated(conn: asyncpg.Connection) -> None:
    d, relay = await make_series(conn, metric="relay", kind="bool")
    status = await conn.fetchval("INSERT INTO metrics (name, kind) VALUES ('status', 'state') RETURNING id")
    number = await conn.fetchval("INSERT INTO metrics (name) VALUES ('level') RETURNING id")
    for metric_id, kind in ((relay, "bool"), (status, "state")):
        with pytest.raises(CalibrationError, match=f"kind '{kind}': only numbers are calibrated"):
            await set_calibration(conn, d, metric_id, at(0), 2.0, 1.0)
    for scale, offset in ((0.0, 1.0), (math.nan, 0.0), (1.0, math.inf)):
        with pytest.raises(CalibrationError, match="finite"):
            await set_calibration(conn, d, number, at(0), scale, offset)
    with pytest.raises(CalibrationError, match="UTC offset"):
        await set_calibration(conn, d, number, datetime(2026, 11, 25, 3, 0), 2.0, 1.0)
    assert await conn.fetchval("SELECT count(*) FROM calibrations") == 0
    assert await conn.fetchval("SELECT epoch FROM calibration_epoch") == 0


@pytest.mark.asyncio
async def test_a_boolean_of_a_number_series_is_calibrated_as_its_numbers_are(database_url: str) -> None:
    """A number metric may hold a boolean reading, stored as 1 or 0: the rewrite and the writer both
    calibrate it, so the same boolean delivered again after the rewrite is a duplicate, not a conflict."""
    pool = await create_pool(DatabaseSettings(url=database_url))
    try:
        writer = Writer(pool)
        first = [Reading(DEVICE, METRIC, at(1), 1000.0), Reading(DEVICE, METRIC, at(2), True)]
        assert (await writer.write([Outcome(message(), "native", first)])).readings == 2
        async with pool.acquire() as c:
            d, m = await make_series(c)
            assert await c.fetchval("SELECT kind FROM metrics WHERE id = $1", m) == "number"
            assert await values(c, d, m) == [1000.0, 1.0]
            cal, _, _ = await set_calibration(c, d, m, at(0), 2.0, 0.5)
            assert await rewrite_all(c, cal.id, 100) == [2]
            assert await values(c, d, m) == [2000.5, 2.5]
        live = await writer.write([Outcome(message(), "native", [Reading(DEVICE, METRIC, at(3), True)])])
        assert (live.readings, live.calibrated) == (1, 1)
        again = await writer.write([Outcome(message(redelivered=True), "native",
                                            [Reading(DEVICE, METRIC, at(2), True)])])
        assert (again.readings, again.duplicates, again.rejections) == (0, 1, 0)
        other = await writer.write([Outcome(message(redelivered=True), "native",
                                            [Reading(DEVICE, METRIC, at(2), False)])])
        assert (other.duplicates, other.reasons) == (0, Counter({"conflict": 1}))  # 0.5 is not 2.5
        async with pool.acquire() as c:
            assert await values(c, d, m) == [2000.5, 2.5, 2.5]
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_message_written_again_after_a_correction_is_a_duplicate(database_url: str) -> None:
    """0.35 stored with offset 0.3, then corrected to offset -0.35: the rewrite leaves about -5.55e-17
    where the writer computes 0 for the same message. In a calibrated series that is the same value
    (within 1e-9): a duplicate. An uncalibrated series compares exactly: there it is a conflict."""
    pool = await create_pool(DatabaseSettings(url=database_url))
    try:
        async with pool.acquire() as c:
            d, m = await make_series(c)
            cal, _, _ = await set_calibration(c, d, m, at(0), 1.0, 0.3)
        writer = Writer(pool)
        outcome = Outcome(message(), "native", [Reading(DEVICE, METRIC, at(1), 0.35)])
        assert (await writer.write([outcome])).calibrated == 1
        async with pool.acquire() as c:
            assert await values(c, d, m) == [0.35 + 0.3]
            fixed, change, was = await set_calibration(c, d, m, at(0), None, -0.35)
            assert (change, was, fixed.scale, fixed.offset) == ("corrected", (1.0, 0.3), 1.0, -0.35)
            assert await rewrite_all(c, cal.id, 10) == [1]
            [stored] = await values(c, d, m)
        assert stored == (0.35 + 0.3 - 0.3) / 1.0 * 1.0 + -0.35
        assert stored != 0.0
        assert abs(stored) < 1e-16
        assert 0.35 * 1.0 + -0.35 == 0.0  # what the writer computes for the message now
        # The same outcome again, not marked redelivered: the COPY fails on the key, the conflict path runs.
        again = await writer.write([outcome])
        assert (again.conflict_path, again.readings, again.duplicates, again.rejections) == (True, 0, 1, 0)
        async with pool.acquire() as c:
            assert await values(c, d, m) == [stored]
            d2, level = await make_series(c, metric="level")
            await insert(c, d2, level, (at(1), stored))
        plain = await writer.write([Outcome(message(), "native", [Reading(DEVICE, "level", at(1), 0.0)])])
        assert (plain.duplicates, plain.reasons) == (0, Counter({"conflict": 1}))
        assert await pool.fetchval("SELECT count(*) FROM rejected_messages") == 1
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_calibration_that_would_take_a_stored_reading_past_the_largest_double_is_refused(
        conn: asyncpg.Connection) -> None:
    """Refused when it is set, naming the reading: its rewrite could never be done. Both extremes of
    the span are checked, from what its readings carry (a correction divides the old parameters out)."""
    d, m = await make_series(conn)
    await insert(conn, d, m, (at(0), 3.0), (at(1), 1e10), (at(2), -2.0))
    with pytest.raises(CalibrationError, match=r"^scale 1e\+300 offset 0 would take the stored reading 1e\+10 at "
                       r"2026-11-25T03:01:00\+00:00 \(stored with scale 1 offset 0\) past the largest double"):
        await set_calibration(conn, d, m, at(0), 1e300, 0.0, "a typo")
    d2, m2 = await make_series(conn, "hn-wl-2")
    await insert(conn, d2, m2, (at(0), -1e10), (at(1), 3.0))
    with pytest.raises(CalibrationError, match=r"the stored reading -1e\+10 at 2026-11-25T03:00:00\+00:00 "):
        await set_calibration(conn, d2, m2, at(0), 1e300, 0.0)  # the least goes to -inf
    assert await conn.fetchval("SELECT count(*) FROM calibrations") == 0
    assert await conn.fetchval("SELECT epoch FROM calibration_epoch") == 0

    ok, _, _ = await set_calibration(conn, d, m, at(0), 1e298, 0.0)
    assert await rewrite_all(conn, ok.id, 10) == [3]
    want = [3.0 * 1e298, 1e10 * 1e298, -2.0 * 1e298]  # 1e308: still a double
    assert await values(conn, d, m) == want
    with pytest.raises(CalibrationError, match=r"the stored reading 1e\+308 at 2026-11-25T03:01:00\+00:00 \(stored "
                       r"with scale 1e\+298 offset 0\)"):
        await set_calibration(conn, d, m, at(0), 1e299, 0.0)
    assert await values(conn, d, m) == want
    row = await calibration(conn, ok.id)
    assert (row["scale"], row["rewrite_cursor"]) == (1e298, None)
    # Only the span counts: from minute 2 on, -2e298 * 100 is a double.
    later, change, _ = await set_calibration(conn, d, m, at(2), 1e300, 0.0)
    assert (change, later.rewrite_cursor) == ("added", at(2))


@pytest.mark.asyncio
async def test_a_calibration_whose_rewrite_has_not_begun_can_be_corrected(conn: asyncpg.Connection) -> None:
    """A reading stored after the calibration was set (by the writer, with the previous calibration:
    at or after the cursor) that the rewrite would take past the largest double: the step rolls back
    and says so. Nothing of the span is rewritten yet, so the calibration can be corrected; the
    rewrite then takes every reading once, from what they carry."""
    d, m = await make_series(conn)
    await store(conn, d, m, 5)
    c, _, _ = await set_calibration(conn, d, m, at(0), 1e300, 0.0, "a typo")
    await insert(conn, d, m, (at(5), 1e10))
    with pytest.raises(CalibrationError, match=r"\(scale 1e\+300 offset 0\): it would take the stored reading 1e\+10 "
                       r"at 2026-11-25T03:05:00\+00:00 \(stored with scale 1 offset 0\) past the largest double; this "
                       r"step rolled back\. Nothing of its span is rewritten yet, so it can be corrected") as failed:
        await rewrite_step(conn, c.id, 100)
    assert isinstance(failed.value.__cause__, asyncpg.NumericValueOutOfRangeError)
    row = await calibration(conn, c.id)
    assert (row["rewrite_cursor"], row["rewritten"]) == (at(0), 0)
    assert await values(conn, d, m) == [*expected(5, []), 1e10]

    fixed, change, was = await set_calibration(conn, d, m, at(0), 1e3, None)  # the offset kept
    assert (change, was) == ("corrected", (1e300, 0.0))
    assert (fixed.id, fixed.scale, fixed.offset, fixed.from_scale, fixed.from_offset, fixed.rewrite_cursor,
            fixed.comment) == (c.id, 1e3, 0.0, 1.0, 0.0, at(0), "a typo")
    assert await rewrite_all(conn, c.id, 4) == [4, 2]
    assert await values(conn, d, m) == [*expected(5, [(0, 1e3, 0.0)]), 1e13]
    assert (await calibration(conn, c.id))["rewritten"] == 6

    # Corrected, before its rewrite begins, back to what the readings carry: nothing is left to rewrite.
    d2, m2 = await make_series(conn, "hn-wl-2")
    await store(conn, d2, m2, 3)
    c2, _, _ = await set_calibration(conn, d2, m2, at(0), 2.0, 0.0)
    back, change, _ = await set_calibration(conn, d2, m2, at(0), 1.0, None)
    assert (change, back.rewrite_cursor, back.rewritten) == ("corrected", None, 0)
    assert await rewrite_step(conn, c2.id, 10) == (0, True)
    assert await values(conn, d2, m2) == expected(3, [])


@pytest.mark.asyncio
async def test_a_rewrite_stopped_part_way_by_such_a_reading_says_what_to_do(conn: asyncpg.Connection) -> None:
    """Part of the span rewritten already: a correction must wait (each side of the cursor carries
    another calibration); the message says to fix or delete the reading, and the rewrite then ends."""
    d, m = await make_series(conn)
    await store(conn, d, m, 10)
    c, _, _ = await set_calibration(conn, d, m, at(0), 1e300, 0.0)
    assert await rewrite_step(conn, c.id, 4) == (4, False)
    await insert(conn, d, m, (at(20), 1e10))
    with pytest.raises(CalibrationError, match=r"the stored reading 1e\+10 at 2026-11-25T03:20:00\+00:00 .*Its "
                       r"readings before 2026-11-25T03:04:00\+00:00 carry it already, so it cannot be corrected before "
                       r"it is finished: fix or delete that reading, then run `sensor-ingest devices recalibrate "
                       r"DEVICE METRIC` again"):
        await rewrite_step(conn, c.id, 100)
    with pytest.raises(CalibrationError, match="still being applied"):
        await set_calibration(conn, d, m, at(0), 1e3, 0.0)
    assert (await calibration(conn, c.id))["rewrite_cursor"] == at(4)
    await conn.execute("DELETE FROM readings WHERE device_id = $1 AND time = $2", d, at(20))
    assert await rewrite_all(conn, c.id, 100) == [6]
    assert await values(conn, d, m) == expected(10, [(0, 1e300, 0.0)])


# -- the commands, in process ---------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sync_values(url: str, device: str = DEVICE, metric: str = METRIC) -> list[float]:
    with psycopg.connect(url) as c:
        return [float(v) for (v,) in c.execute(
            "SELECT r.value FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id "
            "WHERE d.uid = %s AND m.name = %s ORDER BY r.time", (device, metric)).fetchall()]


async def _seed(url: str, n: int) -> None:
    c = await asyncpg.connect(url)
    try:
        d, m = await make_series(c)
        await store(c, d, m, n)
    finally:
        await c.close()


def test_calibrate_recalibrate_and_calibrations_commands(database_url: str, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", database_url)
    asyncio.run(_seed(database_url, 20))
    code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "-1", "--offset", "5.5",
                           "--from", "2026-11-25T10:10:00+07:00", "--batch", "4", "--comment", "mount 5.5 m")
    assert code == 0
    assert out.splitlines() == [
        "added: hn-wl-1 distance from 2026-11-25T03:10:00Z: scale -1 offset 5.5 (mount 5.5 m)",
        "10 readings rewritten from scale 1 offset 0 to scale -1 offset 5.5",
    ]
    want = expected(20, [(10, -1.0, 5.5)])
    assert sync_values(database_url) == want

    for _ in range(2):  # idempotent
        code, out, _ = run_cli(capsys, "devices", "recalibrate", DEVICE, METRIC)
        assert (code, out) == (0, "0 readings rewritten: every calibration of hn-wl-1 distance was applied already\n")
        assert sync_values(database_url) == want
    code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "-1", "--offset", "5.5",
                           "--from", "2026-11-25T03:10:00Z")
    assert code == 0
    assert out.splitlines() == ["unchanged: hn-wl-1 distance from 2026-11-25T03:10:00Z: scale -1 offset 5.5 "
                                "(mount 5.5 m)", "no stored reading needed rewriting"]

    code, out, _ = run_cli(capsys, "devices", "calibrations", "--json")
    listed = json.loads(out)
    assert code == 0
    assert [(c["device"], c["metric"], c["effective_from"], c["until"], c["scale"], c["offset"], c["state"],
             c["rewritten"]) for c in listed] == [(DEVICE, METRIC, "2026-11-25T03:10:00+00:00", None, -1.0, 5.5,
                                                   "applied", 10)]

    # A correction recorded now, rewritten later.
    code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "-1", "--offset", "4.75",
                           "--from", "2026-11-25T03:10:00Z", "--no-rewrite")
    assert code == 0
    assert out.splitlines() == [
        "corrected: hn-wl-1 distance from 2026-11-25T03:10:00Z: scale -1 offset 5.5 -> scale -1 offset 4.75 "
        "(mount 5.5 m)",
        "10 stored reading(s) from 2026-11-25T03:10:00Z on still carry scale -1 offset 5.5: run "
        "`sensor-ingest devices recalibrate hn-wl-1 distance` to rewrite them",
    ]
    assert sync_values(database_url) == want
    code, out, _ = run_cli(capsys, "devices", "calibrations", "hn-wl-*", "--metric", "dist*")
    assert code == 0
    assert "rewriting from 2026-11-25T03:10:00Z" in out
    assert "mount 5.5 m" in out
    code, out, err = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--offset", "1", "--from",
                             "2026-11-25T03:15:00Z")
    assert (code, out) == (1, "")
    assert "finish it first with `sensor-ingest devices recalibrate hn-wl-1 distance`" in err
    code, out, _ = run_cli(capsys, "devices", "recalibrate", DEVICE, METRIC, "--batch", "3")
    assert (code, out) == (0, "10 readings rewritten: from 2026-11-25T03:10:00Z, scale -1 offset 5.5 to scale -1 "
                              "offset 4.75\n")
    assert close_to(sync_values(database_url), expected(20, [(10, -1.0, 4.75)]))
    code, out, _ = run_cli(capsys, "devices", "calibrations", "--json", "nobody")
    assert (code, json.loads(out)) == (0, [])


def test_commands_say_what_to_fix(database_url: str, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", database_url)
    asyncio.run(_seed(database_url, 3))
    code, _, err = run_cli(capsys, "devices", "calibrate", "hn-nobody", METRIC, "--scale", "2", "--from", "now")
    assert code == 1
    assert "no device 'hn-nobody'" in err
    assert "sensor-ingest devices list" in err
    code, _, err = run_cli(capsys, "devices", "recalibrate", DEVICE, "nothing")
    assert code == 1
    assert "sensor-ingest devices show hn-wl-1" in err
    code, _, err = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--from", "now")
    assert code == 2
    assert "--scale, --offset or both" in err
    for bad, hint in ((["--from", "2026-11-25T03:00:00"], "has no UTC offset"),
                      (["--from", "yesterday"], "is not an RFC 3339 time"),
                      (["--scale", "0", "--from", "now"], "a scale of 0"),
                      (["--scale", "nan", "--from", "now"], "not a finite number")):
        with pytest.raises(SystemExit) as usage:
            main(["devices", "calibrate", DEVICE, METRIC, "--offset", "1", *bad])
        assert usage.value.code == 2
        assert hint in capsys.readouterr().err
    code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--offset", "1", "--from", "now")
    assert code == 0
    assert out.endswith("no stored reading needed rewriting\n")  # from now on: nothing stored yet
    assert sync_values(database_url) == expected(3, [])


def test_a_correction_keeps_the_parameter_not_given_and_shows_the_change(
        database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", database_url)
    asyncio.run(_seed(database_url, 20))
    t = "2026-11-25T03:10:00Z"
    assert run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "-1", "--offset", "4.2", "--from", t,
                   "--comment", "mount 4.20 m")[0] == 0
    code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--offset", "4.35", "--from", t)
    assert (code, out.splitlines()) == (0, [
        "corrected: hn-wl-1 distance from 2026-11-25T03:10:00Z: scale -1 offset 4.2 -> scale -1 offset 4.35 "
        "(mount 4.20 m)",
        "10 readings rewritten from scale -1 offset 4.2 to scale -1 offset 4.35"])
    assert close_to(sync_values(database_url), expected(20, [(10, -1.0, 4.35)]))
    code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "2", "--from", t)
    assert (code, out.splitlines()[0]) == (0, "corrected: hn-wl-1 distance from 2026-11-25T03:10:00Z: scale -1 "
                                              "offset 4.35 -> scale 2 offset 4.35 (mount 4.20 m)")
    assert close_to(sync_values(database_url), expected(20, [(10, 2.0, 4.35)]))
    code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--offset", "4.35", "--from", t)
    assert (code, out.splitlines()) == (0, [
        "unchanged: hn-wl-1 distance from 2026-11-25T03:10:00Z: scale 2 offset 4.35 (mount 4.20 m)",
        "no stored reading needed rewriting"])
    # Another time: a new calibration, whose parameter not given is the default.
    code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--offset", "1", "--from",
                           "2026-11-25T03:15:00Z")
    assert (code, out.splitlines()) == (0, [
        "added: hn-wl-1 distance from 2026-11-25T03:15:00Z: scale 1 offset 1",
        "5 readings rewritten from scale 2 offset 4.35 to scale 1 offset 1"])
    assert close_to(sync_values(database_url), expected(20, [(10, 2.0, 4.35), (15, 1.0, 1.0)]))


def test_commands_refuse_a_factor_past_the_largest_double_and_correct_a_rewrite_not_begun(
        database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", database_url)
    asyncio.run(_seed(database_url, 5))
    t = "2026-11-25T03:00:00Z"
    code, out, err = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "1e306", "--from", t)
    assert (code, out) == (1, "")
    assert err == ("sensor-ingest: hn-wl-1 distance: scale 1e+306 offset 0 would take the stored reading 1000 at "
                   "2026-11-25T03:00:00+00:00 (stored with scale 1 offset 0) past the largest double (about "
                   "1.8e308): check the scale and offset\n")
    assert sync_values(database_url) == expected(5, [])
    # Within range when set; a reading stored since then (with the previous calibration) is not.
    assert run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "1e305", "--from", t,
                   "--no-rewrite")[0] == 0
    with psycopg.connect(database_url) as c:
        c.execute("INSERT INTO readings (time, device_id, metric_id, value) SELECT %s, d.id, m.id, 1e10 "
                  "FROM devices d, metrics m WHERE d.uid = %s AND m.name = %s", (at(5), DEVICE, METRIC))
    code, out, err = run_cli(capsys, "devices", "recalibrate", DEVICE, METRIC)
    assert (code, out) == (1, "")
    assert err == (
        "sensor-ingest: hn-wl-1 distance: the calibration from 2026-11-25T03:00:00+00:00 (scale 1e+305 offset 0): it "
        "would take the stored reading 1e+10 at 2026-11-25T03:05:00+00:00 (stored with scale 1 offset 0) past the "
        "largest double; this step rolled back. Nothing of its span is rewritten yet, so it can be corrected: "
        "`sensor-ingest devices calibrate hn-wl-1 distance --from 2026-11-25T03:00:00+00:00` with the right --scale "
        "and --offset (0 readings were rewritten before)\n")
    code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "1000", "--from", t)
    assert (code, out.splitlines()) == (0, [
        "corrected: hn-wl-1 distance from 2026-11-25T03:00:00Z: scale 1e+305 offset 0 -> scale 1000 offset 0",
        "6 readings rewritten from scale 1 offset 0 to scale 1000 offset 0"])
    assert sync_values(database_url) == [*expected(5, [(0, 1000.0, 0.0)]), 1e13]


RESUMED_BY_RECALIBRATE = ["16 readings rewritten: from 2026-11-25T03:00:00Z, scale 1 offset 0 to scale 3 offset 0"]
RESUMED_BY_CALIBRATE = ["unchanged: hn-wl-1 distance from 2026-11-25T03:00:00Z: scale 3 offset 0",
                        "16 readings rewritten from scale 1 offset 0 to scale 3 offset 0"]


@pytest.mark.parametrize(("sig", "code", "resume", "resumed"), [
    (signal.SIGINT, 130, ["recalibrate", DEVICE, METRIC], RESUMED_BY_RECALIBRATE),
    (signal.SIGTERM, 143, ["calibrate", DEVICE, METRIC, "--scale", "3", "--from", "2026-11-25T03:00:00Z"],
     RESUMED_BY_CALIBRATE),
], ids=["SIGINT", "SIGTERM"])
def test_recalibrate_stops_after_the_current_step_on_a_signal_and_resumes(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sig: int, code: int,
    resume: list[str], resumed: list[str],
) -> None:
    """Resumed by recalibrate, or by the same calibrate command again."""
    asyncio.run(_seed(database_url, 20))
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", database_url)
    assert run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "3", "--from", z(at(0)),
                   "--no-rewrite")[0] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSOR_INGEST_")}
    env["SENSOR_INGEST_DATABASE_URL"] = database_url
    # The test holds the lock's shared side, as an ingest batch would: the first step waits for it,
    # and the signal comes while it waits.
    with psycopg.connect(database_url, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock_shared(%s)", (LOCK_KEY,))
        proc = subprocess.Popen([sys.executable, "-m", "ingest", "devices", "recalibrate", DEVICE, METRIC,
                                 "--batch", "4"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stderr is not None
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        try:
            wait_until(lambda: _waiting_cli(database_url), 30, "recalibrate to wait on the calibration lock")
            proc.send_signal(sig)
            wait_until(lambda: any("stopping after the current transaction" in line for line in err), 30,
                       "recalibrate to take the signal")
        finally:
            gate.execute("SELECT pg_advisory_unlock_shared(%s)", (LOCK_KEY,))
            out = proc.communicate(timeout=60)[0]
            reader.join(10)
    assert proc.returncode == code, err
    assert out.splitlines() == [
        "stopped: 4 readings rewritten; the calibration from 2026-11-25T03:00:00Z has 16 stored reading(s) left "
        "from 2026-11-25T03:04:00Z on, still with scale 1 offset 0. Run `sensor-ingest devices recalibrate "
        "hn-wl-1 distance` to resume."]
    assert sync_values(database_url) == expected(4, [(0, 3.0, 0.0)]) + [raw(i) for i in range(4, 20)]
    code2, out2, _ = run_cli(capsys, "devices", *resume, "--batch", "5")
    assert (code2, out2.splitlines()) == (0, resumed)
    assert sync_values(database_url) == expected(20, [(0, 3.0, 0.0)])


def _waiting_cli(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sensor-ingest-cli' "
                        "AND wait_event_type = 'Lock' AND datname = current_database()").fetchone()
    return bool(row and row[0])


# -- with the real service ------------------------------------------------------------------------------------------


def start_service(tmp_path: Path, database_url: str, broker: Mosquitto, prefix: str,
                  ingests: list[IngestProcess]) -> IngestProcess:
    # Short batches: many ingest transactions interleave with the rewrite's.
    config = write_config(tmp_path / "ingest.toml", prefix=prefix, database_url=database_url, mqtt_url=broker.url,
                          extra="[ingest]\nbatch_max_age = 0.01\n")
    service = IngestProcess(config, tmp_path / "ingest.log")
    ingests.append(service)
    service.start()
    return service


def recent() -> datetime:
    """A device time the service accepts (not in the future), on a whole minute."""
    return (datetime.now(UTC) - timedelta(hours=1)).replace(second=0, microsecond=0)


def messages(prefix: str, base: datetime, indexes: list[int]) -> list[tuple[str, bytes]]:
    return [(f"{prefix}/{DEVICE}/up", native(DEVICE, at(i, base).isoformat(), {METRIC: raw(i)})) for i in indexes]


def test_readings_stored_live_then_calibrated_from_a_past_time(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, ingests: list[IngestProcess],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    start_service(tmp_path, database_url, broker, topic_prefix, ingests)
    base = recent()
    pub = Publisher(broker.port)
    try:
        pub.publish_all(messages(topic_prefix, base, list(range(20))))
        wait_until(lambda: len(sync_values(database_url)) == 20, 60, "the 20 readings to be stored")
    finally:
        pub.close()
    assert sync_values(database_url) == expected(20, [])
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", database_url)
    code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "-1", "--offset", "1500",
                           "--from", z(at(12, base)), "--batch", "3")
    assert code == 0
    assert out.splitlines()[1:] == ["8 readings rewritten from scale 1 offset 0 to scale -1 offset 1500"]
    want = expected(20, [(12, -1.0, 1500.0)])
    assert sync_values(database_url) == want
    for _ in range(2):
        code, out, _ = run_cli(capsys, "devices", "recalibrate", DEVICE, METRIC)
        assert (code, out.startswith("0 readings rewritten")) == (0, True)
        assert sync_values(database_url) == want


def test_the_service_stores_new_readings_calibrated_from_the_effective_time_on(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, ingests: list[IngestProcess],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    start_service(tmp_path, database_url, broker, topic_prefix, ingests)
    base = recent()
    pub = Publisher(broker.port)
    try:
        pub.publish_all(messages(topic_prefix, base, [0]))  # the series exists
        wait_until(lambda: len(sync_values(database_url)) == 1, 60, "the first reading to be stored")
        monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", database_url)
        # The water level of a sensor mounted 1500 (mm) above the bed: 1500 - distance.
        code, out, _ = run_cli(capsys, "devices", "calibrate", DEVICE, METRIC, "--scale", "-1", "--offset", "1500",
                               "--from", z(at(10, base)))
        assert (code, out.splitlines()[1:]) == (0, ["no stored reading needed rewriting"])
        later = list(range(1, 20))
        random.Random(15).shuffle(later)  # times before and after the effective one, in the same batches
        pub.publish_all(messages(topic_prefix, base, later))
        wait_until(lambda: len(sync_values(database_url)) == 20, 60, "the 20 readings to be stored")
    finally:
        pub.close()
    assert sync_values(database_url) == expected(20, [(10, -1.0, 1500.0)])  # exact: as the writer computes it


@pytest.mark.asyncio
async def test_a_rewrite_while_the_service_ingests_the_same_series_takes_each_reading_once(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, ingests: list[IngestProcess],
) -> None:
    """The service keeps storing readings of the series, at times on both sides of the moving cursor
    and before the effective time, while the rewrite runs in steps of 5 readings; each round publishes
    4 messages from another thread, runs a step at once (the service's transactions for them and the
    step's run at the same time) and waits until they are stored."""
    start_service(tmp_path, database_url, broker, topic_prefix, ingests)
    base = recent()
    sec = timedelta(seconds=1)
    stored_raw = {base + 2 * i * sec: 1000.0 + i for i in range(200)} | {base - (k + 1) * sec: 500.0 + k
                                                                        for k in range(10)}
    live_raw = {base + (2 * j + 1) * sec: 3000.0 + j for j in range(200)} | {base - (k + 1.5) * sec: 600.0 + k
                                                                           for k in range(10)}
    live = list(live_raw)
    random.Random(15).shuffle(live)
    chunks = [live[i:i + 4] for i in range(0, len(live), 4)]
    # The first round's readings include one past where the first step leaves the cursor (at most 10 s
    # on): it is stored ahead of the cursor, uncalibrated, and a later step rewrites it.
    assert max(chunks[0]) >= base + 10 * sec

    def payloads(times: list[datetime], raws: dict[datetime, float]) -> list[tuple[str, bytes]]:
        return [(f"{topic_prefix}/{DEVICE}/up", native(DEVICE, t.isoformat(), {METRIC: raws[t]})) for t in times]

    pub = Publisher(broker.port)
    watch = await asyncpg.connect(database_url)
    rewriter = await asyncpg.connect(database_url)
    go = threading.Semaphore(0)
    published: list[int] = []

    def publish() -> None:
        for chunk in chunks:
            go.acquire()
            pub.publish_all(payloads(chunk, live_raw))
            published.append(len(chunk))

    async def stored() -> int:
        return int(await watch.fetchval("SELECT count(*) FROM readings"))

    async def stored_at_least(n: int) -> None:
        for _ in range(6000):  # bounds a hang only
            if await stored() >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"gave up waiting for {n} readings to be stored")

    thread = threading.Thread(target=publish, name="publisher", daemon=True)
    try:
        pub.publish_all(payloads(list(stored_raw), stored_raw))
        await stored_at_least(len(stored_raw))
        d = await watch.fetchval("SELECT id FROM devices WHERE uid = $1", DEVICE)
        m = await watch.fetchval("SELECT id FROM metrics WHERE name = $1", METRIC)
        cal, _, _ = await set_calibration(rewriter, d, m, base, 2.0, 0.5)
        assert cal.rewrite_cursor == base
        thread.start()
        steps, done, during = 0, False, 0
        while not done:
            released = steps < len(chunks)
            if released:
                go.release()
                await until(partial(lambda n: len(published) > n, steps), "the round's messages to be published")
            _, done = await rewrite_step(rewriter, cal.id, 5)
            steps += 1
            if released:
                during = len(stored_raw) + sum(published)
                await stored_at_least(during)
        for _ in range(len(chunks) - steps):
            go.release()
        thread.join(60)
        await stored_at_least(len(stored_raw) + len(live_raw))
        rows = await watch.fetch("SELECT time, value FROM readings WHERE device_id = $1 AND metric_id = $2", d, m)
        assert await watch.fetchval("SELECT count(*) FROM rejected_messages") == 0
        rewritten = (await calibration(watch, cal.id))["rewritten"]
    finally:
        pub.close()
        await watch.close()
        await rewriter.close()
    # At least 40 steps (200 readings stored before, 5 a step), each with a round of messages.
    assert during >= len(stored_raw) + 4 * 40
    # Live readings were stored both ahead of the cursor (rewritten later) and behind it (calibrated
    # by the service): of the 400 in the span, the steps rewrote the 200 stored before and some.
    assert 200 < rewritten < 400
    raws = stored_raw | live_raw
    assert len(rows) == len(raws) == 420
    wrong = {r["time"]: (raws[r["time"]], r["value"]) for r in rows
             if r["value"] != (raws[r["time"]] if r["time"] < base else raws[r["time"]] * 2.0 + 0.5)}
    assert wrong == {}
