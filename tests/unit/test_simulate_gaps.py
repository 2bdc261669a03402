"""ingest.simulate.gaps: backfill windows, scripted gaps and drops, and the per-device counts they imply."""

from __future__ import annotations

import argparse
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console

from ingest.cli import build_parser, main
from ingest.errors import ConfigError
from ingest.simulate.display import print_summary
from ingest.simulate.faults import FaultConfig
from ingest.simulate.fleet import Simulator, build_fleet
from ingest.simulate.gaps import Gap, Script, Window, parse_gap
from ingest.simulate.run import SimulateOptions, broker_from, check_gaps
from ingest.simulate.tally import Meta, Tally

END = datetime(2026, 11, 25, 2, 0, 30, tzinfo=UTC)  # 09:00:30 in Hanoi
START = datetime(2026, 11, 25, 0, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def backfill(window: Window, script: Script, *, devices: int = 14, seed: int = 3,
             faults: FaultConfig | None = None) -> tuple[Tally, dict[str, list[datetime]]]:
    """What run.simulate does with a backfill, without the broker: the tally, and the published times."""
    fleet = build_fleet(seed, devices)
    sim = Simulator(fleet, seed=seed, faults=faults)
    by_uid = {d.uid: d for d in fleet}
    tally = Tally(fleet)
    sent: dict[str, list[datetime]] = {d.uid: [] for d in fleet}
    for uid, t in window.slots(seed, list(by_uid)):
        msg = sim.message_at(by_uid[uid], t)
        if msg is None:
            tally.on_skipped(uid, "silent")
            continue
        assert msg.at is not None
        why = script.verdict(uid, msg.at)
        if why:
            tally.on_skipped(uid, why)
            continue
        tally.on_published(Meta.of(msg, 1))
        sent[uid].append(msg.at)
    return tally, sent


def options(**kw: object) -> SimulateOptions:
    base: dict[str, object] = dict(broker=broker_from(None, None, {}), devices=14, rate=100.0, duration=0.0, seed=3,
                                   prefix="city", qos=1, faults=FaultConfig(), start=None, speed=1.0)
    base.update(kw)
    return SimulateOptions(**base)  # type: ignore[arg-type]


# --- the window ----------------------------------------------------------------------------------


def test_the_window_is_floored_to_the_interval_since_the_epoch() -> None:
    w = Window.ending(END, 7200, 60)
    assert (w.start, w.end, w.interval_ms, w.intervals) == (START, START + timedelta(hours=2), 60000, 120)
    # A duration that is not a whole number of intervals: the start is floored too, so one bucket more.
    w = Window.ending(END, 90, 60)
    assert (w.start, w.end, w.intervals) == (END - timedelta(seconds=150), END - timedelta(seconds=30), 2)
    assert Window.ending(START + timedelta(hours=2), 7200, 60).intervals == 120  # an end on a boundary stays
    for interval in (0.5, 1.0005):
        with pytest.raises(ValueError, match="whole milliseconds"):
            Window.ending(END, 7200, interval)
    with pytest.raises(ValueError, match="above 0"):
        Window.ending(END, 0, 60)


def test_each_device_has_a_fixed_phase_in_the_first_half_of_its_bucket() -> None:
    w = Window.ending(END, 7200, 60)
    uids = [d.uid for d in build_fleet(3)]
    phases = [w.phase_ms(3, uid) for uid in uids]
    assert all(1 <= p < 30000 for p in phases)
    assert phases == [w.phase_ms(3, uid) for uid in uids]  # deterministic
    assert phases != [w.phase_ms(4, uid) for uid in uids]  # from the seed
    assert len(set(phases)) > len(uids) * 0.9  # spread: the fleet does not publish at one instant
    second = Window.ending(END, 60, 1)
    assert {second.phase_ms(s, "hn-aq-0001") for s in range(20000)} == set(range(1, 500))  # [1, 500) ms


def test_every_device_has_exactly_one_message_in_every_bucket_and_none_on_a_boundary() -> None:
    w = Window.ending(END, 7200, 60)
    uids = [d.uid for d in build_fleet(3, 70)]
    slots = list(w.slots(3, uids))
    assert len(slots) == 70 * 120
    assert [t for _, t in slots] == sorted(t for _, t in slots)  # in time order
    per_device: dict[str, list[int]] = {}
    for uid, t in slots:
        assert t.microsecond % 1000 == 0  # whole milliseconds
        offset = t - w.start
        assert timedelta(0) < offset % MINUTE < MINUTE / 2
        per_device.setdefault(uid, []).append(offset // MINUTE)
    assert per_device == {uid: list(range(120)) for uid in uids}


# --- gaps and drops ------------------------------------------------------------------------------


def test_a_backfill_of_2h_at_60s_with_a_gap_of_10m_to_40m_skips_exactly_30_messages() -> None:
    w = Window.ending(END, 7200, 60)
    gap = parse_gap("hn-aq-0001:10m-40m").resolve(w.start)
    tally, sent = backfill(w, Script([gap], drop=0.0, seed=3))
    summary = tally.summary(seed=3, prefix="city", elapsed=1.0, silenced=[], scripted=True, backfill=w)
    rows = summary["per_device"]
    assert rows["hn-aq-0001"] == {"published": 90, "acked": 0, "gap": 30, "dropped": 0, "silent": 0,
                                  "start": "2026-11-25T00:00:00+00:00", "end": "2026-11-25T02:00:00+00:00",
                                  "interval": 60.0, "expected": 120}
    assert all(r["published"] == 120 and r["gap"] == 0 for uid, r in rows.items() if uid != "hn-aq-0001")
    assert (summary["gap"], summary["dropped"], summary["published"]) == (30, 0, 14 * 120 - 30)
    assert sorted({(t - w.start) // MINUTE for t in sent["hn-aq-0001"]} ^ set(range(120))) == list(range(10, 40))
    json.dumps(summary)


def test_a_gap_given_in_rfc3339_times_and_one_with_mixed_bounds() -> None:
    w = Window.ending(END, 7200, 60)
    times = parse_gap("hn-noise-0002:2026-11-25T08:00:00+07:00..2026-11-25T08:15:00+07:00")
    assert times.resolve(w.start) == Gap("hn-noise-0002", START + timedelta(hours=1), START + timedelta(minutes=75))
    mixed = parse_gap("hn-rain-0001@1h..2026-11-25T01:30Z")  # '@' in place of ':'
    assert mixed.resolve(w.start) == Gap("hn-rain-0001", START + timedelta(hours=1), START + timedelta(minutes=90))
    tally, _ = backfill(w, Script([times.resolve(w.start), mixed.resolve(w.start)], drop=0.0, seed=3))
    rows = tally.summary(seed=3, prefix="city", elapsed=1.0, silenced=[], scripted=True)["per_device"]
    assert (rows["hn-noise-0002"]["gap"], rows["hn-rain-0001"]["gap"]) == (15, 30)
    with pytest.raises(ValueError, match="before it starts"):
        mixed.resolve(START + timedelta(hours=1))


@pytest.mark.parametrize("text", ["hn-aq-0001", ":10m-40m", "hn-aq-0001:", "hn-aq-0001:40m-10m", "hn-aq-0001:10m",
                                  "hn-aq-0001:10m-10m", "hn-aq-0001:soon-later",
                                  "hn-aq-0001:2026-11-25T07:00+07:00-2026-11-25T08:00+07:00",
                                  "hn-aq-0001:2026-11-25T07:00..2026-11-25T08:00"])
def test_malformed_gaps_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"DEVICE:FROM|'\.\.'|after FROM|neither a duration"):
        parse_gap(text)


def test_drops_are_reproducible_and_counted_exactly() -> None:
    w = Window.ending(END, 7200, 60)

    def run(seed: int, drop: float, gaps: list[Gap] | None = None) -> tuple[dict[str, Any], list[tuple[str, datetime]]]:
        tally, sent = backfill(w, Script(gaps or [], drop=drop, seed=seed), seed=seed)
        summary = tally.summary(seed=seed, prefix="city", elapsed=1.0, silenced=[], scripted=True, backfill=w)
        return summary, sorted((uid, t) for uid, ts in sent.items() for t in ts)

    first, sent = run(3, 0.1)
    again, sent_again = run(3, 0.1)
    assert (first, sent) == (again, sent_again)
    other, _ = run(4, 0.1)
    assert other["per_device"] != first["per_device"]
    rows = first["per_device"]
    dropped = sum(r["dropped"] for r in rows.values())
    assert first["dropped"] == dropped == 14 * 120 - len(sent)
    assert 0.07 * 14 * 120 < dropped < 0.13 * 14 * 120
    assert all(r["published"] == 120 - r["dropped"] for r in rows.values())
    # A gap changes no drop decision outside it: the drop stream is drawn for every message.
    gap = parse_gap("hn-aq-0001:10m-40m").resolve(w.start)
    _, with_gap = run(3, 0.1, [gap])
    assert with_gap == [(uid, t) for uid, t in sent if not gap.covers(uid, t)]
    assert run(3, 1.0)[0]["published"] == 0


def test_drops_and_gaps_leave_the_values_and_faults_of_the_other_messages_as_they_were() -> None:
    w = Window.ending(END, 3600, 60)
    fleet = build_fleet(3, 14)
    faults = FaultConfig(frozenset({"spike", "bad-payload"}), 0.05)

    def payloads(script: Script) -> dict[tuple[str, datetime], bytes]:
        sim = Simulator(fleet, seed=3, faults=faults)
        by_uid = {d.uid: d for d in fleet}
        out = {}
        for uid, t in w.slots(3, list(by_uid)):
            msg = sim.message_at(by_uid[uid], t)
            assert msg is not None
            if script.verdict(uid, t) is None:
                out[uid, t] = msg.payload
        return out

    full = payloads(Script([], drop=0.0, seed=3))
    thinned = payloads(Script([parse_gap("hn-aq-0001:0s-30m").resolve(w.start)], drop=0.2, seed=3))
    assert 0 < len(thinned) < len(full)
    assert thinned == {key: full[key] for key in thinned}


def test_a_silent_device_in_a_backfill_is_counted_as_silent() -> None:
    w = Window.ending(END, 7200, 60)
    tally, sent = backfill(w, Script([], drop=0.0, seed=3), faults=FaultConfig(frozenset({"silent"}), 0.1))
    rows = tally.summary(seed=3, prefix="city", elapsed=1.0, silenced=[], backfill=w)["per_device"]
    quiet = {uid: r for uid, r in rows.items() if r["silent"]}
    assert len(quiet) == 1
    for uid, r in quiet.items():
        assert 2 <= r["published"] <= 10
        assert r["published"] + r["silent"] == 120
        assert len(sent[uid]) == r["published"]


def test_live_gaps_count_from_the_first_message() -> None:
    origin = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
    script = check_gaps(options(gaps=(parse_gap("hn-aq-0001:10m-40m"),)), ["hn-aq-0001", "hn-noise-0001"], origin)
    assert script.verdict("hn-aq-0001", origin + timedelta(minutes=10)) == "gap"
    assert script.verdict("hn-aq-0001", origin + timedelta(minutes=40)) is None
    assert script.verdict("hn-aq-0001", origin + timedelta(minutes=9, seconds=59)) is None
    assert script.verdict("hn-noise-0001", origin + timedelta(minutes=20)) is None


def test_a_gap_of_a_device_outside_the_fleet_names_the_fleet() -> None:
    with pytest.raises(ConfigError) as info:
        check_gaps(options(gaps=(parse_gap("hn-aq-0099:1m-2m"),)), [d.uid for d in build_fleet(3, 14)], START)
    assert "hn-aq-0099" in str(info.value)
    assert "hn-aq-0001, hn-noise-0001" in str(info.value)


# --- the summary -----------------------------------------------------------------------------------


def test_per_device_counts_appear_only_when_the_script_is_used() -> None:
    tally = Tally(build_fleet(1, 7))
    plain = tally.summary(seed=1, prefix="city", elapsed=1.0, silenced=[])
    assert not {"per_device", "gap", "dropped", "backfill"} & set(plain)
    tally.on_published(Meta("native", "air_quality", None, None, 1, "hn-aq-0001"))
    tally.on_answer(Meta("native", "air_quality", None, None, 1, "hn-aq-0001"), failure=False)
    tally.on_skipped("hn-aq-0001", "dropped")
    live = tally.summary(seed=1, prefix="city", elapsed=1.0, silenced=[], scripted=True)
    assert live["per_device"]["hn-aq-0001"] == {"published": 1, "acked": 1, "gap": 0, "dropped": 1, "silent": 0}
    assert "backfill" not in live
    assert set(plain) <= set(live)  # the existing fields stay


def test_the_text_summary_lists_the_devices_that_lost_messages() -> None:
    w = Window.ending(END, 7200, 60)
    tally, _ = backfill(w, Script([parse_gap("hn-aq-0001:10m-40m").resolve(w.start)], drop=0.0, seed=3))
    out = io.StringIO()
    print_summary(Console(file=out, width=120), tally.summary(seed=3, prefix="city", elapsed=1.0, silenced=[],
                                                              scripted=True, backfill=w))
    text = out.getvalue()
    assert "2026-11-25T00:00:00+00:00 .. 2026-11-25T02:00:00+00:00, every 60 s: 120 messages expected" in text
    assert "gap 30, dropped 0" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("hn-")]
    assert rows == [["hn-aq-0001", "│", "120", "│", "90", "│", "0", "│", "30", "│", "0", "│", "0"]]


# --- options -------------------------------------------------------------------------------------


def test_backfill_options_are_parsed() -> None:
    args = build_parser().parse_args(["simulate", "--backfill", "2h", "--interval", "1m", "--end",
                                      "2026-11-25T09:00:30+07:00", "--gap", "hn-aq-0001:10m-40m",
                                      "--gap", "hn-aq-0002:0s-1m", "--drop", "0.25", "--rate", "5000"])
    assert (args.backfill, args.interval, args.end, args.drop, args.rate) == (7200.0, 60.0, END, 0.25, 5000.0)
    assert [g.device for g in args.gap] == ["hn-aq-0001", "hn-aq-0002"]
    assert (args.duration, args.speed, args.start) == (None, None, None)


@pytest.mark.parametrize("argv", [["--backfill", "0"], ["--backfill", "soon"], ["--interval", "0.5"],
                                  ["--interval", "1.0005"], ["--end", "2026-11-25T07:00"], ["--end", "tomorrow"],
                                  ["--gap", "hn-aq-0001"], ["--gap", "hn-aq-0001:40m-10m"], ["--drop", "1.5"],
                                  ["--drop", "-0.1"]])
def test_invalid_backfill_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["simulate", *argv])
    assert info.value.code == 2


@pytest.mark.parametrize(("argv", "says"), [
    (["--backfill", "2h"], "--interval: is required with --backfill"),
    (["--backfill", "2h", "--interval", "60", "--duration", "5"], "cannot be combined with --duration"),
    (["--backfill", "2h", "--interval", "60", "--speed", "2", "--start", "2026-11-25T06:00"],
     "cannot be combined with --speed, --start"),
    (["--interval", "60"], "--interval: only applies to a backfill"),
    (["--end", "2026-11-25T09:00+07:00"], "--end: only applies to a backfill"),
    (["--backfill", "2h", "--interval", "60", "--gap", "hn-zz-0001:1m-2m"], "hn-zz-0001"),
    (["--backfill", "2h", "--interval", "60", "--end", "2026-11-25T09:00+07:00", "--gap",
      "hn-aq-0001:1h..2026-11-25T00:30Z"], "before it starts"),
])
def test_options_that_do_not_go_together_exit_2_before_connecting(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 1 would refuse a connection (exit 1): exit 2 shows the options were refused first.
    assert main(["simulate", "--mqtt-url", "mqtt://127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err
    assert says in err
    if "hn-zz-0001" in says:
        assert "hn-aq-0001, hn-noise-0001, hn-water-0001" in err


def test_help_describes_the_backfill_and_the_gap_syntax() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["simulate"].format_help().split())
    for needed in ("--backfill DURATION", "--interval SECONDS", "--end RFC3339", "--gap DEVICE:FROM-TO", "--drop P",
                   "hn-aq-0001:10m-40m", "'..'", "per_device", "Excludes --duration, --speed and --start",
                   "floored to a multiple of the interval"):
        assert needed in text, needed
