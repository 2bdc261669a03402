"""Data quality per device (ingest/quality.py) on the real TimescaleDB.

- The definitions, on readings inserted directly: declared and learned intervals and their precedence,
  buckets that follow each series' own phase (jittered readings at a clock boundary are complete), a
  series silent all window, the silent devices of the register (never seen, or not within the lookback)
  and the lookback itself, staleness at its boundary, the suspect ratio, rejections by reason (with the
  declared expected messages of a device whose every message is rejected), the gauges' statement timeout,
  and the --district, --device, --below filters and the --json shape of `sensor-ingest quality`.
- The issue's must-show: a simulated fleet with scripted gaps and drops, published by `sensor-ingest
  simulate` to the real service, gives exactly the completeness and the stale devices the script
  implies, in the command's output and in fleet_quality (the gauges' figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from ingest.cli import build_parser
from ingest.quality import FleetQuality, QualityReport, SeriesQuality, cmd_quality, fleet_quality, read_report
from ingest.settings import QualitySettings
from ingest.simulate.fleet import KINDS
from tests.integration.harness import IngestProcess, count, write_config
from tests.services import REPO, Mosquitto, wait_until

pytestmark = pytest.mark.integration

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # the end of the window (a whole minute)
HOUR = 3600.0
CODE_TO_KIND = {spec.code: name for name, spec in KINDS.items()}


def _at(seconds: float) -> datetime:
    """``seconds`` after T (negative: before)."""
    return T + timedelta(seconds=seconds)


Device = tuple[str, str | None, str | None, float | None]  # uid, source, district, expected_interval
Reading = tuple[str, str, datetime, int]  # uid, metric, time, flags


def _load(url: str, devices: Iterable[Device], readings: Iterable[Reading],
          rejected: Iterable[tuple[str | None, str, datetime]] = ()) -> None:
    """Insert devices, their readings (value 1.0) and rejection rows (device_uid, reason, received_at), and
    set each device's last_seen to its last reading, as the writer does (NULL: never seen)."""
    readings = list(readings)
    with psycopg.connect(url, autocommit=True) as c:
        for uid, source, district, interval in devices:
            c.execute("INSERT INTO devices (uid, source, attributes, expected_interval) VALUES (%s, %s, %s, %s)",
                      (uid, source, json.dumps({"district": district} if district else {}), interval))
        for name in sorted({m for _, m, _, _ in readings}):
            c.execute("INSERT INTO metrics (name) VALUES (%s)", (name,))
        ids = dict(c.execute("SELECT uid, id FROM devices").fetchall())
        metrics = dict(c.execute("SELECT name, id FROM metrics").fetchall())
        with c.cursor().copy("COPY readings (time, device_id, metric_id, value, flags) FROM STDIN") as copy:
            for uid, metric, time, flags in readings:
                copy.write_row((time, ids[uid], metrics[metric], 1.0, flags))
        c.execute("UPDATE devices d SET last_seen = (SELECT max(r.time) FROM readings r WHERE r.device_id = d.id)")
        for device_uid, reason, received_at in rejected:
            c.execute("INSERT INTO rejected_messages (received_at, source, topic, payload, reason, detail, device_uid)"
                      " VALUES (%s, 'native', 'x/up', '\\x00', %s, 'test', %s)", (received_at, reason, device_uid))


def _every(uid: str, metric: str, start: float, step: float, n: int, flags: int = 0) -> list[Reading]:
    return [(uid, metric, _at(start + k * step), flags) for k in range(n)]


async def _report(url: str, *, at: datetime = T, window: float = HOUR, stale_after: float = 3.0,
                  below: float = 90.0, learn_from: int = 20, sources: dict[str, float] | None = None,
                  district: str | None = None, device: str | None = None) -> QualityReport:
    conn = await asyncpg.connect(url)
    try:
        return await read_report(conn, at=at, window=window, stale_after=stale_after, below=below,
                                 learn_from=learn_from, source_intervals=sources or {}, district=district,
                                 device=device)
    finally:
        await conn.close()


def _by_device(report: QualityReport) -> dict[str, SeriesQuality]:
    assert len({s.device for s in report.series}) == len(report.series), "one metric per device in these cases"
    return {s.device: s for s in report.series}


def _figures(s: SeriesQuality) -> tuple[Any, ...]:
    return s.interval, s.interval_from, s.expected, s.received, s.readings, s.stale


@pytest.mark.asyncio
async def test_the_device_interval_beats_the_source_s_which_beats_the_learned_one(database_url: str) -> None:
    _load(database_url, [
        ("own", "declared", None, 60.0),  # the register's 60 s, though its source declares 120 s
        ("of-source", "declared", None, None),  # its source's 120 s
        ("learned", "silent-source", None, None),  # a source that declares nothing: learned
        ("few", "silent-source", None, None),  # two readings and nothing declared: unknown
    ], [
        # A 10-minute gap: 50 of the 60 minute buckets.
        *(r for k, r in enumerate(_every("own", "pm25", -HOUR, 60, 60)) if not 10 <= k < 20),
        *_every("of-source", "pm25", -HOUR, 60, 60),  # two readings in each 2-minute bucket
        # Every 30 s, 0.4 s late every other time: the median gap rounds to 30 s.
        *((u, m, t + timedelta(seconds=0.4 * (k % 2)), f)
          for k, (u, m, t, f) in enumerate(_every("learned", "pm25", -HOUR, 30, 120))),
        *_every("few", "pm25", -600, 60, 2),
    ])
    report = await _report(database_url, sources={"declared": 120.0})
    got = {d: _figures(s) for d, s in _by_device(report).items()}
    assert got == {
        "own": (60.0, "device", 60, 50, 50, False),
        "of-source": (120.0, "source", 30, 30, 60, False),
        "learned": (30.0, "learned", 120, 120, 120, False),
        "few": (None, None, None, None, 2, False),
    }
    series = _by_device(report)
    assert series["own"].completeness == 50 / 60
    assert series["few"].completeness is None
    assert not series["few"].below(100)
    # `few` counts neither way; `own` (83 %) is the one incomplete device.
    assert report.fleet == FleetQuality(devices=4, devices_reporting=4, devices_stale=0, devices_incomplete=1)


@pytest.mark.asyncio
async def test_the_learned_interval_is_the_median_gap_of_the_last_learn_from_readings(database_url: str) -> None:
    _load(database_url, [("d", None, None, None)], [
        *_every("d", "level", -3 * HOUR, 10, 360),  # every 10 s, until 2 h before T
        *_every("d", "level", -1800, 300, 6),  # then every 5 minutes
    ])
    last_five = _by_device(await _report(database_url, learn_from=5))["d"]
    assert _figures(last_five) == (300.0, "learned", 12, 6, 6, False)
    # Twenty readings reach back into the 10-second ones: 13 of their 19 gaps are 10 s.
    twenty = _by_device(await _report(database_url, learn_from=20))["d"]
    assert (twenty.interval, twenty.expected, twenty.received) == (10.0, 360, 6)


@pytest.mark.asyncio
async def test_buckets_are_centred_on_the_phase_of_the_series_last_reading(database_url: str) -> None:
    _load(database_url, [("seven", "s", None, 7.0), ("minute", "s", None, 60.0)], [
        # Every 7 s, 3.3 s past T's 7-second lattice: the last one at T - 3.7 s; the window of 700 s holds
        # the centres T - 3.7 - 7k for k = 0 .. 99.
        *_every("seven", "n", -700 + 3.3, 7, 100),
        # As of 12:00:30 the last reading is at 12:00:10: the buckets are [m:40, (m+1):40), centred on :10 of
        # each minute, and 60 centres lie in the window [11:00:30, 12:00:30) (11:01:10 .. 12:00:10). The
        # reading at 11:00:40 shares the 11:01:10 bucket with the one at 11:01:00.
        ("minute", "n", _at(-3600 + 40), 0), *_every("minute", "n", -3540, 60, 59), ("minute", "n", _at(10), 0),
        ("minute", "n", _at(-1795), 0),  # a second reading in the 11:30:10 bucket: counted once
    ])
    seven = _by_device(await _report(database_url, window=700, device="seven"))["seven"]
    assert (seven.expected, seven.received, seven.readings) == (100, 100, 100)
    minute = _by_device(await _report(database_url, at=_at(30), device="minute"))["minute"]
    assert (minute.expected, minute.received, minute.readings) == (60, 60, 62)
    assert minute.completeness == 1.0
    # As of 12:01:20 the centre 12:01:10 is in the window, with no reading in its bucket, and 11:01:10 is
    # not (nor are the readings at 11:00:40 and 11:01:00): 59 of 60.
    later = _by_device(await _report(database_url, at=_at(80), device="minute"))["minute"]
    assert (later.expected, later.received, later.readings) == (60, 59, 60)


def _jitter(k: int) -> int:
    """A deterministic jitter of -5 .. +5 s for the k-th reading; the first and the last are not early, so
    that the window's two ends are not what the test is about."""
    return (7 * k + 8) % 11 - 5


@pytest.mark.asyncio
async def test_readings_jittered_around_a_clock_boundary_are_complete(database_url: str) -> None:
    day = 86400.0
    slots = range(1440)  # every 60 s over 24 h, at phase 0: on the minute, give or take 5 s
    assert (_jitter(0), _jitter(1439)) == (3, 0)
    assert {_jitter(k) for k in range(11)} == set(range(-5, 6))
    every = [("all", "pm25", _at(-day + 60 * k + _jitter(k)), 0) for k in slots]
    lossy = [("lossy", "pm25", _at(-day + 60 * k + _jitter(k)), 0) for k in slots if not 700 <= k < 730]
    # The data is what broke buckets aligned to the clock: minutes [m, m + 60) would hold two readings
    # or none (an early one belongs to the minute before) and give about 75 %.
    clock_minutes = {int(t.timestamp()) // 60 for _, _, t, _ in every if T - timedelta(days=1) <= t < T}
    assert len(clock_minutes) < 0.8 * 1440
    _load(database_url, [("all", None, None, 60.0), ("lossy", None, None, 60.0)], [*every, *lossy])
    report = _by_device(await _report(database_url, window=day))
    assert _figures(report["all"]) == (60.0, "device", 1440, 1440, 1440, False)
    assert report["all"].completeness == 1.0
    assert _figures(report["lossy"]) == (60.0, "device", 1440, 1410, 1410, False)
    assert report["lossy"].completeness == (1440 - 30) / 1440


@pytest.mark.asyncio
async def test_a_series_silent_all_window_is_shown_with_completeness_zero_and_stale(database_url: str) -> None:
    _load(database_url, [("quiet", None, None, None), ("later", None, None, None), ("fine", None, None, None)], [
        *_every("quiet", "noise", -3 * HOUR, 60, 100),  # the last one at T - 1 h 21 min
        *_every("later", "noise", 60, 60, 10),  # only after T: no series as of T
        *_every("fine", "noise", -HOUR, 60, 60),
    ])
    report = await _report(database_url)
    got = {d: _figures(s) for d, s in _by_device(report).items()}
    assert got == {"quiet": (60.0, "learned", 60, 0, 0, True), "fine": (60.0, "learned", 60, 60, 60, False)}
    assert _by_device(report)["quiet"].last_reading == _at(-3 * HOUR + 99 * 60)
    assert _by_device(report)["quiet"].completeness == 0.0
    assert report.fleet == FleetQuality(devices=2, devices_reporting=1, devices_stale=1, devices_incomplete=1)
    # As of 2 hours later, `later` has a series too, silent for 2 hours... and stale.
    later = _by_device(await _report(database_url, at=_at(2 * HOUR)))["later"]
    assert _figures(later) == (60.0, "learned", 60, 0, 0, True)


@pytest.mark.asyncio
async def test_a_registered_device_never_seen_or_silent_past_the_lookback_is_reported_once_as_stale(
    database_url: str
) -> None:
    _load(database_url, [
        ("never", None, "Ba Dinh", 60.0),  # imported with an interval, never reported
        ("never-plain", None, None, None),  # imported with nothing declared
        ("gone", "declared", None, None),  # reported 10 days ago, no more: past the 7-day lookback
        ("fine", "declared", None, None),
    ], [*_every("gone", "pm25", -10 * 86400, 120, 30), *_every("gone", "noise", -10 * 86400, 120, 30),
        *_every("fine", "pm25", -HOUR, 120, 30)])
    report = await _report(database_url, sources={"declared": 120.0})
    rows = {s.device: s for s in report.series}
    assert [s.device for s in report.series] == ["fine", "gone", "never", "never-plain"]  # one row each
    gone_seen = _at(-10 * 86400 + 29 * 120)
    assert rows["gone"] == SeriesQuality(device="gone", district=None, metric=None, interval=120.0,
                                         interval_from="source", expected=30, received=0, readings=0, suspect=0,
                                         last_reading=gone_seen, stale=True)
    assert rows["never"] == SeriesQuality(device="never", district="Ba Dinh", metric=None, interval=60.0,
                                          interval_from="device", expected=60, received=0, readings=0, suspect=0,
                                          last_reading=None, stale=True)
    assert rows["never-plain"] == SeriesQuality(device="never-plain", district=None, metric=None, interval=None,
                                                interval_from=None, expected=None, received=None, readings=0,
                                                suspect=0, last_reading=None, stale=True)
    assert _figures(rows["fine"]) == (120.0, "source", 30, 30, 30, False)
    # Stale: the three silent ones; incomplete: those with a declared interval (0 %).
    assert report.fleet == FleetQuality(devices=4, devices_reporting=1, devices_stale=3, devices_incomplete=2)
    conn = await asyncpg.connect(database_url)
    try:
        gauges = await fleet_quality(conn, QualitySettings(window=HOUR), {"declared": 120.0}, T)
    finally:
        await conn.close()
    assert gauges == report.fleet
    # A device seen within the lookback with no numeric reading in it (text states only, say) is not.
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("UPDATE devices SET last_seen = %s WHERE uid = 'never-plain'", (_at(-6 * 86400),))
    assert {s.device for s in (await _report(database_url)).series} == {"fine", "gone", "never"}


@pytest.mark.asyncio
async def test_the_lookback_reaches_stale_after_times_the_longest_declared_interval(database_url: str) -> None:
    # Every 3 days, the last one 8 days before T: within 3 x 3 days, so its series is found and not stale.
    _load(database_url, [("slow", None, None, 3 * 86400.0)], _every("slow", "level", -20 * 86400, 3 * 86400, 5))
    [slow] = (await _report(database_url, stale_after=3)).series
    assert (slow.metric, slow.last_reading, slow.stale, slow.expected, slow.completeness) == (
        "level", _at(-8 * 86400), False, 0, None)
    # With stale_after 2 the lookback is 7 days (more than 2 x 3): past it, the device is silent.
    [silent] = (await _report(database_url, stale_after=2)).series
    assert (silent.metric, silent.last_reading, silent.stale, silent.expected, silent.received) == (
        None, _at(-8 * 86400), True, 0, 0)


@pytest.mark.asyncio
async def test_stale_means_more_than_stale_after_intervals_since_the_last_reading(database_url: str) -> None:
    _load(database_url, [("edge", "s", None, 60.0), ("past", "s", None, 60.0)], [
        *_every("edge", "t", -HOUR, 60, 57), ("edge", "t", _at(-180), 0),  # exactly 3 intervals before T
        *_every("past", "t", -HOUR, 60, 57), ("past", "t", _at(-181), 0),
    ])
    stale = {d: s.stale for d, s in _by_device(await _report(database_url)).items()}
    assert stale == {"edge": False, "past": True}
    lenient = {d: s.stale for d, s in _by_device(await _report(database_url, stale_after=5)).items()}
    assert lenient == {"edge": False, "past": False}


@pytest.mark.asyncio
async def test_the_suspect_ratio_counts_readings_with_flag_1(database_url: str) -> None:
    _load(database_url, [("sus", "s", None, 60.0)], [
        *_every("sus", "pm25", -HOUR, 60, 6),
        *_every("sus", "pm25", -HOUR + 360, 60, 3, flags=1),  # suspect
        ("sus", "pm25", _at(-HOUR + 540), 2),  # receive time substituted: not suspect
        ("sus", "pm25", _at(-HOUR + 600), 3),  # both
        ("sus", "pm25", _at(-HOUR - 60), 1),  # before the window
    ])
    s = _by_device(await _report(database_url))["sus"]
    assert (s.readings, s.suspect) == (11, 4)


@pytest.mark.asyncio
async def test_rejections_by_reason_per_device_in_the_window(database_url: str) -> None:
    _load(database_url, [("aq", "s", "Hoan Kiem", None), ("other", "s", "Ba Dinh", None)], [
        *_every("aq", "pm25", -HOUR, 60, 60), *_every("aq", "temperature", -HOUR, 120, 30),
        *_every("other", "pm25", -HOUR, 60, 60),
    ], rejected=[
        *(("aq", "out_of_range", _at(-60 * k)) for k in range(1, 4)),
        ("aq", "wrong_type", _at(-1)),
        ("aq", "out_of_range", _at(-HOUR - 1)),  # before the window
        ("aq", "out_of_range", T),  # the window ends before T
        ("other", "malformed", _at(-10)),
        (None, "malformed", _at(-5)), (None, "malformed", _at(-6)),
        ("ghost", "unknown_device", _at(-7)),  # not in the register
    ])
    report = await _report(database_url)
    # aq's shortest (learned) interval is 60 s: 60 messages expected in the hour.
    assert [(r.device, r.reason, r.count, r.expected_messages) for r in report.rejected] == [
        ("aq", "out_of_range", 3, 60), ("aq", "wrong_type", 1, 60), ("other", "malformed", 1, 60)]
    assert report.rejected[0].ratio == 3 / 60
    assert report.unattributed == {"malformed": 2, "unknown_device": 1}
    hoan_kiem = await _report(database_url, district="Hoan Kiem")
    assert {r.device for r in hoan_kiem.rejected} == {"aq"}
    assert hoan_kiem.unattributed == {"malformed": 2, "unknown_device": 1}  # the fleet line: every device


@pytest.mark.asyncio
async def test_a_device_whose_every_message_is_rejected_is_measured_against_its_declared_interval(
    database_url: str
) -> None:
    _load(database_url, [("broken", None, None, 60.0), ("broken-src", "declared", None, None),
                         ("undeclared", None, None, None)], [],
          rejected=[*(("broken", "wrong_type", _at(-60 * k)) for k in range(1, 6)),
                    *(("broken-src", "schema", _at(-60 * k)) for k in range(1, 4)),
                    ("undeclared", "schema", _at(-1))])
    report = await _report(database_url, sources={"declared": 120.0})
    assert [(r.device, r.reason, r.count, r.expected_messages, r.ratio) for r in report.rejected] == [
        ("broken", "wrong_type", 5, 60, 5 / 60), ("broken-src", "schema", 3, 30, 3 / 30),
        ("undeclared", "schema", 1, None, None)]


@pytest.mark.asyncio
async def test_the_gauges_read_has_a_statement_timeout_of_its_own(database_url: str) -> None:
    """fleet_quality limits its statements (SET LOCAL): behind a lock that never ends, it is cancelled by the
    server after gauges_timeout(quality.every), on a connection that has no statement_timeout itself."""
    _fleet_data(database_url)
    blocker = await asyncpg.connect(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SHOW statement_timeout") == "0"
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
            # (wait_for only bounds a hang: without the timeout the read would wait for the lock forever)
            await asyncio.wait_for(fleet_quality(conn, QualitySettings(window=HOUR, every=1.0), {}, T), 60)
        await blocking.rollback()
        assert await conn.fetchval("SHOW statement_timeout") == "0"  # only inside its transaction
        assert (await fleet_quality(conn, QualitySettings(window=HOUR), {"declared": 120.0}, T)).devices == 4
    finally:
        await conn.close()
        await blocker.close()


def _config(tmp_path: Path, database_url: str, quality: str = "") -> Path:
    path = tmp_path / "quality.toml"
    path.write_text(f"""
[database]
url = "{database_url}"

[quality]
{quality}

[[sources]]
name = "declared"
topic = "q/{{device}}/up"
format = "native"
expected_interval = "2m"
""")
    return path


def _quality_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    args: argparse.Namespace = build_parser().parse_args(["quality", *argv, "--json"])
    assert cmd_quality(args) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def _fleet_data(database_url: str) -> None:
    _load(database_url, [
        ("hk-1", "declared", "Hoan Kiem", None), ("hk-2", "declared", "Hoan Kiem", 60.0),
        ("bd-1", None, "Ba Dinh", None), ("bd-2", None, "Ba Dinh", None),
    ], [
        *_every("hk-1", "pm25", -HOUR, 120, 30),  # 100 %
        *_every("hk-1", "noise", -HOUR, 120, 27),  # 90 %: not below 90
        *_every("hk-2", "pm25", -HOUR, 60, 30),  # 50 % and stale (last at T - 31 min)
        *_every("bd-1", "pm25", -HOUR, 60, 53),  # 53 of 60: 88.3 %
        *_every("bd-2", "pm25", -HOUR, 60, 60, flags=1),  # 100 %, all suspect
    ], rejected=[("bd-1", "out_of_range", _at(-30))])


def test_quality_json_has_every_figure_of_each_series_and_the_fleet(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _fleet_data(database_url)
    out = _quality_json(capsys, "-c", str(_config(tmp_path, database_url)), "--at", T.isoformat(), "--window", "1h")
    assert set(out) == {"at", "from", "window", "stale_after", "below", "series", "rejected",
                        "rejected_without_device", "fleet"}
    assert (out["at"], out["from"], out["window"], out["stale_after"], out["below"]) == (
        "2026-03-01T12:00:00+00:00", "2026-03-01T11:00:00+00:00", 3600.0, 3.0, 90.0)
    assert out["series"][0] == {
        "device": "bd-1", "district": "Ba Dinh", "metric": "pm25", "interval": 60.0, "interval_from": "learned",
        "expected": 60, "received": 53, "readings": 53, "suspect": 0, "last_reading": "2026-03-01T11:52:00+00:00",
        "stale": True, "completeness_pct": 100 * 53 / 60, "suspect_pct": 0.0}
    got = {(s["device"], s["metric"]): (s["interval_from"], s["completeness_pct"], s["suspect_pct"], s["stale"])
           for s in out["series"]}
    assert got == {
        ("bd-1", "pm25"): ("learned", 100 * 53 / 60, 0.0, True),
        ("bd-2", "pm25"): ("learned", 100.0, 100.0, False),
        ("hk-1", "noise"): ("source", 90.0, 0.0, True),
        ("hk-1", "pm25"): ("source", 100.0, 0.0, False),
        ("hk-2", "pm25"): ("device", 50.0, 0.0, True),
    }
    assert out["rejected"] == [{"device": "bd-1", "reason": "out_of_range", "count": 1, "expected_messages": 60,
                                "ratio": 1 / 60}]
    assert out["rejected_without_device"] == {}
    assert out["fleet"] == {"devices": 4, "devices_reporting": 4, "devices_stale": 3, "devices_incomplete": 2}


def test_quality_filters_on_district_device_and_below(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _fleet_data(database_url)
    base = ["-c", str(_config(tmp_path, database_url)), "--at", T.isoformat(), "--window", "1h"]

    def shown(*argv: str) -> tuple[set[tuple[str, str]], dict[str, int]]:
        out = _quality_json(capsys, *base, *argv)
        return {(s["device"], s["metric"]) for s in out["series"]}, out["fleet"]

    everything = {("bd-1", "pm25"), ("bd-2", "pm25"), ("hk-1", "noise"), ("hk-1", "pm25"), ("hk-2", "pm25")}
    assert shown()[0] == everything
    assert shown("--district", "Hoan Kiem") == (
        {("hk-1", "noise"), ("hk-1", "pm25"), ("hk-2", "pm25")},
        {"devices": 2, "devices_reporting": 2, "devices_stale": 2, "devices_incomplete": 1})
    assert shown("--device", "bd-*")[0] == {("bd-1", "pm25"), ("bd-2", "pm25")}
    # Below 90 %: bd-1 (88 %) and hk-2 (50 %); hk-1's noise (exactly 90 %) shows because it is stale.
    assert shown("--below", "90") == (
        {("bd-1", "pm25"), ("hk-1", "noise"), ("hk-2", "pm25")},
        {"devices": 4, "devices_reporting": 4, "devices_stale": 3, "devices_incomplete": 2})
    assert shown("--below", "95", "--stale-after", "100") == (
        {("bd-1", "pm25"), ("hk-1", "noise"), ("hk-2", "pm25")},
        {"devices": 4, "devices_reporting": 4, "devices_stale": 0, "devices_incomplete": 3})
    assert shown("--below", "60", "--stale-after", "100")[0] == {("hk-2", "pm25")}


def test_the_table_names_every_series_and_the_fleet_line(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _fleet_data(database_url)
    args = build_parser().parse_args(["quality", "-c", str(_config(tmp_path, database_url)), "--at", T.isoformat(),
                                      "--window", "1h"])
    assert cmd_quality(args) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("│")] for line in out.splitlines() if "│" in line]
    assert ["hk-2", "Hoan Kiem", "pm25", "1m", "device", "60", "30", "30", "50.0", "0.0", "2026-03-01 11:29:00Z",
            "STALE"] in rows
    assert ["hk-1", "Hoan Kiem", "pm25", "2m", "source", "30", "30", "30", "100.0", "0.0", "2026-03-01 11:58:00Z",
            ""] in rows
    assert ["bd-1", "out_of_range", "1", "60", "1.7"] in rows
    assert "fleet: 4 device(s), 4 reporting, 3 stale, 2 incomplete (a series below 90 %)" in out


@pytest.mark.asyncio
async def test_fleet_quality_counts_every_device_with_the_quality_settings(database_url: str) -> None:
    _fleet_data(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        fleet = await fleet_quality(conn, QualitySettings(window=HOUR), {"declared": 120.0}, T)
        assert fleet == FleetQuality(devices=4, devices_reporting=4, devices_stale=3, devices_incomplete=2)
        strict = await fleet_quality(conn, QualitySettings(window=HOUR, below=100.0, stale_after=100.0),
                                     {"declared": 120.0}, T)
        assert strict == FleetQuality(devices=4, devices_reporting=4, devices_stale=0, devices_incomplete=3)
        later = await fleet_quality(conn, QualitySettings(window=HOUR), {"declared": 120.0}, _at(2 * HOUR))
        assert later == FleetQuality(devices=4, devices_reporting=0, devices_stale=4, devices_incomplete=4)
    finally:
        await conn.close()


def test_an_unmigrated_database_exits_2_and_says_to_migrate(
    tmp_path: Path, empty_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_quality(build_parser().parse_args(["quality", "-c", str(_config(tmp_path, empty_database_url))])) == 2
    assert "sensor-ingest migrate" in capsys.readouterr().err


# -- the must-show: a simulated fleet with scripted gaps and drops, through the real service ---------------

END = "2026-11-25T09:00:00+07:00"  # the backfill's window is [07:00, 09:00) Hanoi: 120 buckets of 60 s
MIDDLE_GAP = ("hn-aq-0001", 40, 70)  # silent from minute 40 to minute 70 of the window: 30 buckets
END_GAP = ("hn-noise-0002", 100, 120)  # silent for the last 20 minutes: stale at the end


def _sensor_ingest(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSOR_INGEST_")}
    return subprocess.run([sys.executable, "-m", "ingest", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_a_simulated_fleet_with_scripted_gaps_gives_exactly_the_completeness_and_staleness_of_its_script(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, ingests: list[IngestProcess]
) -> None:
    printed = _sensor_ingest("simulate", "--print-sources", "--prefix", topic_prefix, timeout=60)
    assert printed.returncode == 0, printed.stderr
    native_source = f"{topic_prefix}-native"
    assert f'name = "{native_source}"' in printed.stdout
    # The native family's source declares its interval; the senml family's is learned from the readings.
    sources = printed.stdout.replace('format = "native"', 'format = "native"\nexpected_interval = "1m"', 1)
    config = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url,
                          mqtt_url=broker.url, extra=sources)
    service = IngestProcess(config, tmp_path / "ingest.log")
    ingests.append(service)
    service.start()

    gaps = [f"{uid}:{start}m-{end}m" for uid, start, end in (MIDDLE_GAP, END_GAP)]
    result = _sensor_ingest("simulate", "--backfill", "2h", "--interval", "60", "--end", END, "--devices", "14",
                            "--gap", gaps[0], "--gap", gaps[1], "--drop", "0.1", "--rate", "5000", "--seed", "11",
                            "--prefix", topic_prefix, "--mqtt-url", broker.url, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    per_device: dict[str, dict[str, Any]] = summary["per_device"]
    assert summary["backfill"]["expected"] == 120
    assert per_device[MIDDLE_GAP[0]]["gap"] == 30
    assert per_device[END_GAP[0]]["gap"] == 20
    assert summary["dropped"] > 0
    for row in per_device.values():
        assert row["published"] == row["acked"] == 120 - row["gap"] - row["dropped"]
    family = {uid: name for name, uids in summary["devices_per_family"].items() for uid in uids}
    assert set(family) == set(per_device)
    assert set(family.values()) == {"native", "senml"}
    metrics = {uid: [m for m, _ in KINDS[CODE_TO_KIND[uid.split("-")[1]]].metrics] for uid in per_device}

    # Everything published is stored: the service acknowledges a message only after its commit.
    acked = summary["acked"]
    wait_until(lambda: service.metric("sensor_ingest_messages_acked_total") >= acked, 60,
               f"the service to commit and acknowledge {acked} messages")
    assert count(database_url, "readings") == sum(row["published"] * len(metrics[uid])
                                                  for uid, row in per_device.items())

    out = _sensor_ingest("quality", "-c", str(config), "--at", END, "--window", "2h", "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    got = {(s["device"], s["metric"]): (s["interval"], s["interval_from"], s["expected"], s["received"],
                                        s["readings"], s["suspect"]) for s in report["series"]}
    # Each published message is one reading of every metric of its device, in a bucket of its own.
    assert got == {(uid, m): (60.0, "source" if family[uid] == "native" else "learned", 120, row["published"],
                              row["published"], 0) for uid, row in per_device.items() for m in metrics[uid]}
    assert all(s["completeness_pct"] == 100 * s["received"] / 120 for s in report["series"])
    # Stale: no reading in the last 3 intervals before the end. The end gap silences its device for
    # 20; a drop would need the last 3 messages of a device in a row (this seed drops no such run).
    stale = {s["device"] for s in report["series"] if s["stale"]}
    assert stale == {END_GAP[0]}
    incomplete = {uid for uid, row in per_device.items() if 100 * row["published"] < 90 * 120}
    assert incomplete >= {MIDDLE_GAP[0], END_GAP[0]}
    expected_fleet = {"devices": 14, "devices_reporting": 14, "devices_stale": 1,
                      "devices_incomplete": len(incomplete)}
    assert report["fleet"] == expected_fleet
    assert {s["device"] for s in report["series"] if s["completeness_pct"] < 90} == incomplete
    assert report["rejected"] == []
    assert report["rejected_without_device"] == {}

    # The gauges' figures, for the same data: fleet_quality over a [quality] window of 2 hours.
    async def gauges() -> FleetQuality:
        conn = await asyncpg.connect(database_url)
        try:
            return await fleet_quality(conn, QualitySettings(window=7200.0), {native_source: 60.0},
                                       datetime.fromisoformat(END))
        finally:
            await conn.close()

    assert asdict(asyncio.run(gauges())) == expected_fleet


def test_the_service_publishes_the_fleet_gauges_on_its_schedule(
        tmp_path: Path, broker: Mosquitto, database_url: str, topic_prefix: str) -> None:
    """The gauges of /metrics come from fleet_quality on the service's own clock: two devices that sent
    one reading each a minute ago, with a declared interval of 60 s, report, are not stale (3 intervals
    have not passed) and are incomplete (one minute of 24 hours)."""
    from tests.integration.harness import Publisher, native

    config = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url,
                          mqtt_url=f"mqtt://127.0.0.1:{broker.port}",
                          extra=('[[sources]]\nname = "declared"\n'
                                 f'topic = "{topic_prefix}/q/{{device}}"\nformat = "native"\n'
                                 'expected_interval = "1m"\n\n[quality]\nevery = "1s"\n'))
    ingest = IngestProcess(config, tmp_path / "ingest.log")
    ingest.start()
    try:
        t = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0).isoformat()
        publisher = Publisher(broker.port)
        try:
            publisher.publish_all([(f"{topic_prefix}/q/hn-q-{i}", native(f"hn-q-{i}", t, {"pm25": 10.0 + i}))
                                   for i in (1, 2)])
        finally:
            publisher.close()
        wait_until(lambda: count(database_url, "readings") == 2, 30, "the two readings")
        wait_until(lambda: ingest.metric("sensor_ingest_devices_reporting") == 2, 30, "the gauges to count both")
        m = ingest.metrics()
        assert (m["sensor_ingest_devices_stale"], m["sensor_ingest_devices_incomplete"]) == (0, 2)
        assert m["sensor_ingest_quality_computed_timestamp_seconds"] > 0
    finally:
        ingest.close()
