"""`sensor-ingest quality` without a database (ingest/quality.py): the pure definitions (completeness below a
threshold, the fleet counts, a device's expected messages, the lookback, the gauges' statement timeout), the
--json shape and the table (a silent device's row too), the options, and exit status 2 with a message that
says why when the database cannot be reached.

The figures themselves are computed by SQL: tests/integration/test_quality.py checks them on TimescaleDB.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.cli import build_parser, main
from ingest.quality import (
    LOOKBACK,
    FleetQuality,
    QualityReport,
    Rejected,
    SeriesQuality,
    as_json,
    expected_messages,
    fleet_of,
    gauges_timeout,
    lookback,
    source_intervals,
)
from ingest.settings import load_settings

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _series(device: str, metric: str = "pm25", *, interval: float | None = 60.0, expected: int | None = 60,
            received: int | None = 60, readings: int = 60, suspect: int = 0, stale: bool = False,
            district: str | None = "Hoan Kiem") -> SeriesQuality:
    return SeriesQuality(device=device, district=district, metric=metric, interval=interval,
                         interval_from=None if interval is None else "source", expected=expected, received=received,
                         readings=readings, suspect=suspect, last_reading=AT - timedelta(seconds=30), stale=stale)


def test_completeness_is_received_over_expected_and_below_is_exact() -> None:
    s = _series("a", received=54)
    assert s.completeness == 0.9
    assert not s.below(90)  # exactly 90 %: not below, without a rounding error either way
    assert s.below(90.01)
    assert _series("a", received=53).below(90)


def test_completeness_is_not_computed_without_an_interval_or_a_whole_bucket() -> None:
    unknown = _series("a", interval=None, expected=None, received=None, readings=2)
    assert unknown.completeness is None
    assert not unknown.below(100)
    longer_than_the_window = _series("a", interval=7200, expected=0, received=0, readings=1)
    assert longer_than_the_window.completeness is None
    assert not longer_than_the_window.below(100)


def test_the_fleet_counts_devices_not_series() -> None:
    series = [
        _series("a", "pm25"), _series("a", "noise", received=30),  # incomplete
        _series("b", "pm25", stale=True, readings=0, received=0),  # stale, incomplete, not reporting
        _series("c", interval=None, expected=None, received=None, readings=2),  # counts neither way
        _series("d", "pm25"), _series("d", "noise"),
    ]
    assert fleet_of(series, 90) == FleetQuality(devices=4, devices_reporting=3, devices_stale=1,
                                                devices_incomplete=2)
    assert fleet_of(series, 50) == FleetQuality(devices=4, devices_reporting=3, devices_stale=1,
                                                devices_incomplete=1)
    assert fleet_of([], 90) == FleetQuality(0, 0, 0, 0)


def test_a_device_s_expected_messages_come_from_its_shortest_interval() -> None:
    series = [_series("a", "slow", interval=300, expected=12), _series("a", "fast", interval=60, expected=60),
              _series("b", interval=None, expected=None, received=None)]
    assert expected_messages(series) == {"a": 60}
    assert Rejected("a", "out_of_range", 3, 60).ratio == 0.05
    assert Rejected("b", "out_of_range", 3, None).ratio is None


def test_the_lookback_is_a_week_or_longer_for_a_long_window_or_a_long_declared_interval() -> None:
    day = 86400
    assert day * 7 == LOOKBACK
    assert lookback(day, 3, None) == LOOKBACK
    assert lookback(day, 3, 60) == LOOKBACK
    assert lookback(30 * day, 3, 60) == 60 * day  # twice a long window
    assert lookback(day, 3, 3 * day) == 9 * day  # a series declared every 3 days, stale after 3 of them
    assert lookback(day, 1, 10 * day) == 11 * day  # the window and one declared interval


def test_the_gauges_statement_timeout_is_a_tenth_of_their_period_within_5_and_20_s() -> None:
    assert [gauges_timeout(every) for every in (1, 50, 120, 200, 300, 3600)] == [5, 5, 12, 20, 20, 20]


def _silent(device: str, interval: float | None, seen: datetime | None) -> SeriesQuality:
    return SeriesQuality(device=device, district=None, metric=None, interval=interval,
                         interval_from=None if interval is None else "device",
                         expected=None if interval is None else 1440, received=None if interval is None else 0,
                         readings=0, suspect=0, last_reading=seen, stale=True)


def test_a_silent_device_counts_as_stale_and_incomplete_when_declared_and_sets_its_expected_messages() -> None:
    series = [_series("a"), _silent("b", 60.0, None), _silent("c", None, AT - timedelta(days=9))]
    assert fleet_of(series, 90) == FleetQuality(devices=3, devices_reporting=1, devices_stale=2,
                                                devices_incomplete=1)
    assert expected_messages(series) == {"a": 60, "b": 1440}


def _report() -> QualityReport:
    series = [_series("hn-1", received=45, suspect=6, readings=45), _series("hn-2", stale=True, received=10,
                                                                             readings=10, district=None)]
    return QualityReport(at=AT, window=3600.0, stale_after=3.0, below=90.0, series=series,
                         rejected=[Rejected("hn-1", "out_of_range", 2, 60)], unattributed={"malformed": 4},
                         fleet=fleet_of(series, 90.0))


def test_the_json_has_the_window_the_series_the_rejections_and_the_fleet() -> None:
    out = json.loads(json.dumps(as_json(_report(), _report().series[:1]), default=lambda v: v.isoformat()))
    assert out == {
        "at": "2026-03-01T12:00:00+00:00", "from": "2026-03-01T11:00:00+00:00", "window": 3600.0,
        "stale_after": 3.0, "below": 90.0,
        "series": [{"device": "hn-1", "district": "Hoan Kiem", "metric": "pm25", "interval": 60.0,
                    "interval_from": "source", "expected": 60, "received": 45, "readings": 45, "suspect": 6,
                    "last_reading": "2026-03-01T11:59:30+00:00", "stale": False, "completeness_pct": 75.0,
                    "suspect_pct": 100 * 6 / 45}],
        "rejected": [{"device": "hn-1", "reason": "out_of_range", "count": 2, "expected_messages": 60,
                      "ratio": 2 / 60}],
        "rejected_without_device": {"malformed": 4},
        "fleet": {"devices": 2, "devices_reporting": 2, "devices_stale": 1, "devices_incomplete": 2},
    }


def test_the_table_shows_each_series_then_the_rejections_then_the_fleet_line(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from ingest.quality import _print

    args = build_parser().parse_args(["quality", "--below", "80"])
    _print(_report(), _report().series, args)
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("│")] for line in out.splitlines() if "│" in line]
    assert ["hn-1", "Hoan Kiem", "pm25", "1m", "source", "60", "45", "45", "75.0", "13.3", "2026-03-01 11:59:30Z",
            ""] in rows
    assert ["hn-1", "out_of_range", "2", "60", "3.3"] in rows
    headers = [[c.strip() for c in line.split("┃")] for line in out.splitlines() if "┃" in line]
    assert headers[1] == ["device", "reason", "count", "expected messages", "ratio %"]
    assert "data quality over 1h to 2026-03-01 12:00:00Z (below 80 % or stale)" in out
    assert out.rstrip().endswith("fleet: 2 device(s), 2 reporting, 1 stale, 2 incomplete (a series "
                                 "below 90 %); rejected without a registered device: malformed 4")


def test_a_silent_device_s_row_has_no_metric_and_says_never_when_never_seen(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from ingest.quality import _print

    series = [_silent("hn-9", 60.0, None), _silent("hn-8", None, AT - timedelta(days=9))]
    report = QualityReport(at=AT, window=86400.0, stale_after=3.0, below=90.0, series=series, rejected=[],
                           unattributed={}, fleet=fleet_of(series, 90.0))
    _print(report, series, build_parser().parse_args(["quality"]))
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("│")] for line in out.splitlines() if "│" in line]
    assert ["hn-9", "-", "-", "1m", "device", "1440", "0", "0", "0.0", "-", "never", "STALE"] in rows
    assert ["hn-8", "-", "-", "-", "-", "-", "-", "0", "-", "-", "2026-02-20 12:00:00Z", "STALE"] in rows
    assert out.rstrip().endswith("fleet: 2 device(s), 0 reporting, 2 stale, 1 incomplete (a series below 90 %)")
    [never, _] = as_json(report, series)["series"]
    assert (never["metric"], never["last_reading"], never["completeness_pct"]) == (None, None, 0.0)


def test_the_table_says_so_when_nothing_is_to_show(capsys: pytest.CaptureFixture[str]) -> None:
    from ingest.quality import _print

    empty = QualityReport(at=AT, window=86400.0, stale_after=3.0, below=90.0, series=[], rejected=[],
                          unattributed={}, fleet=FleetQuality(0, 0, 0, 0))
    _print(empty, [], build_parser().parse_args(["quality", "--district", "Ba Dinh"]))
    assert capsys.readouterr().out.startswith(
        "no series: no device selected has a reading before 2026-03-01 12:00:00Z in the lookback, and none is "
        "silent (district Ba Dinh)")
    _print(_report(), [], build_parser().parse_args(["quality", "--below", "10"]))
    assert "every one of the 2 series is complete and fresh" in capsys.readouterr().out


def test_the_options_parse_durations_times_and_percentages() -> None:
    args = build_parser().parse_args(["quality", "--window", "24h", "--at", "2026-03-01T19:00:00+07:00",
                                      "--below", "90", "--stale-after", "2.5", "--device", "hn-*"])
    assert (args.window, args.at, args.below, args.stale_after, args.device) == (86400.0, AT, 90.0, 2.5, "hn-*")
    before = datetime.now(UTC)
    ago = build_parser().parse_args(["quality", "--at", "2h"]).at
    assert before - timedelta(hours=2, seconds=5) < ago <= datetime.now(UTC) - timedelta(hours=2)
    defaults = build_parser().parse_args(["quality"])
    assert (defaults.window, defaults.at, defaults.below, defaults.stale_after, defaults.json) == (
        None, None, None, None, False)


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--window", "0", "longer than 0"), ("--window", "soon", "not a duration"),
    ("--below", "0", "above 0 and at most 100"), ("--below", "101", "above 0 and at most 100"),
    ("--below", "most", "not a number of percent"), ("--stale-after", "-1", "above 0"),
    ("--at", "2026-03-01T12:00:00", "no UTC offset"),
])
def test_a_bad_option_exits_2_and_says_what_to_write(
    option: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["quality", option, value])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_the_help_says_what_each_figure_means_the_exit_status_and_the_environment(
    capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["quality", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("completeness", "received", "stale", "learned", "phase", "lookback", "never",
                   "Exit status: 0; 2 when",
                   "SENSOR_INGEST_DATABASE_URL", "--district", "--below", "--json"):
        assert phrase in text, phrase


def test_the_sources_declared_intervals_are_passed_on(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[sources]]\nname = "aq"\ntopic = "a/{device}"\nformat = "native"\nexpected_interval = "2m"\n'
                      '[[sources]]\nname = "plain"\ntopic = "b/{device}"\nformat = "native"\n')
    assert source_intervals(load_settings(config)) == {"aq": 120.0}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.usefixtures("_restore_logging")
def test_an_unreachable_database_exits_2_and_never_prints_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", f"postgresql://ingest@127.0.0.1:{_closed_port()}/city")
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_PASSWORD", "s3cret-pw")
    assert main(["quality", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot reach the database at postgresql://ingest@127.0.0.1" in captured.err
    assert "s3cret-pw" not in captured.err


def test_adding_the_command_to_the_parser_imports_neither_the_drivers_nor_rich() -> None:
    code = ("import argparse, sys; from ingest.quality import add_quality_parser; "
            "add_quality_parser(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('asyncpg', 'psycopg', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
