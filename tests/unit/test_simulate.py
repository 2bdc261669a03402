"""ingest.simulate: the fleet, its daily pattern and faults, through the service's real processing."""

from __future__ import annotations

import argparse
import json
import math
import re
import tomllib
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.cli import build_parser
from ingest.errors import ConfigError
from ingest.model import RawMessage
from ingest.process import Outcome, Processor
from ingest.settings import Settings, SourceSettings, load_settings
from ingest.simulate.families import FAMILIES, sources_toml
from ingest.simulate.faults import (
    ALERT_THRESHOLDS,
    BAD_CLOCK_VARIANTS,
    BAD_PAYLOAD_VARIANTS,
    EXPECTED_REASONS,
    FaultConfig,
    parse_faults,
)
from ingest.simulate.fleet import (
    DEFAULT_DEVICES,
    DISTRICTS,
    KINDS,
    Device,
    FleetClock,
    SimMessage,
    Simulator,
    build_fleet,
)
from ingest.simulate.patterns import HANOI
from ingest.simulate.run import broker_from
from ingest.simulate.tally import Meta, Tally

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "sensor-ingest.example.toml"
WALL = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)  # 10:00 in Hanoi


def hanoi(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, 25, hour, minute, tzinfo=HANOI)


def processor(prefix: str = "city") -> Processor:
    sources = [SourceSettings(**s) for s in tomllib.loads(sources_toml(prefix))["sources"]]
    return Processor.from_settings(Settings(sources=sources))


def process(p: Processor, msg: SimMessage, delay: float = 0.05) -> Outcome:
    assert msg.time is not None
    received = WALL if msg.fault == "bad-clock" else msg.time + timedelta(seconds=delay)
    return p.process(RawMessage(msg.topic, msg.payload, received))


def run_messages(sim: Simulator, n: int, start: datetime = WALL, step: float = 0.05) -> list[SimMessage]:
    out = []
    for i in range(n):
        wall = start + timedelta(seconds=i * step)
        msg = sim.next_message(wall, wall)
        assert msg is not None
        out.append(msg)
    return out


# --- the fleet -----------------------------------------------------------------------------------


def test_the_same_seed_builds_the_same_fleet_and_another_seed_another() -> None:
    assert build_fleet(7) == build_fleet(7)
    assert build_fleet(7) != build_fleet(8)
    assert [d.uid for d in build_fleet(7)] == [d.uid for d in build_fleet(8)]  # ids do not depend on the seed


def test_the_same_seed_and_clock_give_the_same_messages() -> None:
    faults = FaultConfig(parse_faults("all"), 0.1)
    a = run_messages(Simulator(build_fleet(3), seed=3, faults=faults), 300)
    b = run_messages(Simulator(build_fleet(3), seed=3, faults=faults), 300)
    c = run_messages(Simulator(build_fleet(4), seed=4, faults=faults), 300)

    assert [(m.topic, m.payload, m.fault) for m in a] == [(m.topic, m.payload, m.fault) for m in b]
    assert [m.payload for m in a] != [m.payload for m in c]


def test_faults_do_not_change_the_values_of_the_other_messages() -> None:
    plain = run_messages(Simulator(build_fleet(5), seed=5), 200)
    faulty = run_messages(Simulator(build_fleet(5), seed=5, faults=FaultConfig(frozenset({"spike"}), 0.2)), 200)

    same = [(p.payload, f.payload) for p, f in zip(plain, faulty, strict=True) if f.fault is None]
    assert len(same) > 100
    assert all(a == b for a, b in same)


def test_the_default_fleet_has_every_kind_in_every_family_and_district() -> None:
    fleet = build_fleet(1)

    assert len(fleet) == DEFAULT_DEVICES == 70
    assert Counter(d.kind for d in fleet) == {k: 10 for k in KINDS}
    assert {(d.kind, d.family) for d in fleet} == {(k, f) for k in KINDS for f in FAMILIES}
    assert {d.district for d in fleet} == set(DISTRICTS)
    assert len({d.uid for d in fleet}) == len(fleet)
    assert all(re.fullmatch(r"hn-[a-z]+-\d{4}", d.uid) for d in fleet)
    assert fleet[0].uid == "hn-aq-0001"


def test_a_small_fleet_still_has_every_kind() -> None:
    fleet = build_fleet(1, 14)
    assert {(d.kind, d.family) for d in fleet} == {(k, f) for k in KINDS for f in FAMILIES}
    assert {d.kind for d in build_fleet(1, 7)} == set(KINDS)


def test_topics_follow_the_family_and_the_district() -> None:
    sim = Simulator(build_fleet(1), seed=1, prefix="demo/hn")
    for msg in run_messages(sim, 70):
        device = next(d for d in sim.devices if d.uid == msg.device)
        suffix = {"native": "up", "senml": "senml"}[msg.family]
        assert msg.topic == f"demo/hn/{device.district.slug}/{device.uid}/{suffix}"


# --- through the real processing ------------------------------------------------------------------


def test_every_unfaulted_message_of_a_whole_day_decodes_into_its_readings() -> None:
    p = processor()
    sim = Simulator(build_fleet(2), seed=2)
    for minutes in range(0, 24 * 60, 90):
        fleet_time = hanoi(0) + timedelta(minutes=minutes)
        for device in sim.devices:
            wall = WALL + timedelta(minutes=minutes)
            msg = sim.message(device, wall, fleet_time)
            out = process(p, msg)

            assert out.rejection is None, (msg.payload, out.rejection)
            assert out.source == f"city-{device.family}"
            assert {r.metric for r in out.readings} == {m for m, _ in KINDS[device.kind].metrics}
            assert {r.device for r in out.readings} == {device.uid}
            assert {r.time for r in out.readings} == {msg.time}
            assert {r.metric: r.value for r in out.readings} == msg.values
            assert all(r.flags == 0 for r in out.readings)


def test_a_device_never_sends_two_messages_with_the_same_time() -> None:
    sim = Simulator(build_fleet(1, 7), seed=1)
    device = sim.devices[0]
    times = [sim.message(device, WALL).time for _ in range(5)]  # a clock that did not move
    times += [sim.message(device, WALL - timedelta(seconds=1)).time]  # or went back
    assert times == sorted(set(times))
    assert all(t is not None and t.microsecond % 1000 == 0 for t in times)


def test_smart_meter_energy_only_counts_up() -> None:
    sim = Simulator(build_fleet(1, 7), seed=1)
    meter = next(d for d in sim.devices if d.kind == "smart_meter")
    energy = [float(sim.message(meter, WALL, hanoi(0) + timedelta(minutes=15 * i)).values["energy_kwh"])
              for i in range(96)]
    assert energy == sorted(energy)
    assert energy[-1] > energy[0]


# --- the daily pattern ----------------------------------------------------------------------------


def _at(sim: Simulator, kind: str, hour: int, minute: int = 0) -> list[dict[str, object]]:
    return [dict(sim.message(d, WALL, hanoi(hour, minute)).values) for d in sim.devices if d.kind == kind]


def test_street_lights_are_on_at_night_and_off_at_noon() -> None:
    sim = Simulator(build_fleet(1), seed=1)
    assert all(v["on"] is True and v["dimming_pct"] == 100.0 for v in _at(sim, "street_light", 22))
    assert all(v["on"] is True and v["dimming_pct"] == 50.0 for v in _at(sim, "street_light", 2))
    assert all(v["on"] is False and v["dimming_pct"] == 0.0 for v in _at(sim, "street_light", 12))


def test_rush_hour_has_more_traffic_and_noise_than_the_night() -> None:
    sim = Simulator(build_fleet(1), seed=1)
    for kind, metric in (("traffic", "vehicles"), ("noise", "laeq_db")):
        rush = [float(v[metric]) for v in _at(sim, kind, 8)]  # type: ignore[arg-type]
        night = [float(v[metric]) for v in _at(sim, kind, 3)]  # type: ignore[arg-type]
        assert all(r > n for r, n in zip(rush, night, strict=True)), (kind, rush, night)


def test_pm25_is_worse_at_the_morning_rush_than_in_the_afternoon() -> None:
    sim = Simulator(build_fleet(1), seed=1)
    morning = [float(v["pm25"]) for v in _at(sim, "air_quality", 7, 30)]  # type: ignore[arg-type]
    afternoon = [float(v["pm25"]) for v in _at(sim, "air_quality", 14)]  # type: ignore[arg-type]
    assert sum(morning) > 1.5 * sum(afternoon)


def test_normal_values_stay_below_the_alert_thresholds() -> None:
    sim = Simulator(build_fleet(1), seed=1)
    for hour in range(24):
        for d in sim.devices:
            values = sim.message(d, WALL, hanoi(hour)).values
            if d.kind in ALERT_THRESHOLDS:
                metric, threshold = ALERT_THRESHOLDS[d.kind]
                assert float(values[metric]) < threshold
            if d.kind == "water_level":
                assert float(values["level_cm"]) < d.flood_level_cm
                assert values["flood"] is False


def test_the_fleet_clock_runs_at_its_speed() -> None:
    clock = FleetClock(start=hanoi(6), origin=WALL, speed=720)
    assert clock.at(WALL) == hanoi(6)
    assert clock.at(WALL + timedelta(minutes=1)) == hanoi(18)


# --- faults ---------------------------------------------------------------------------------------


def _faulted(fault: str, n: int = 3000) -> list[SimMessage]:
    sim = Simulator(build_fleet(9), seed=9, faults=FaultConfig(frozenset({fault}), 0.3))
    return [m for m in run_messages(sim, n) if m.fault is not None]


@pytest.mark.parametrize(("fault", "variants"), [("bad-payload", BAD_PAYLOAD_VARIANTS),
                                                 ("bad-clock", BAD_CLOCK_VARIANTS)])
def test_bad_payloads_and_bad_clocks_are_rejected_whole_with_the_expected_reason(
    fault: str, variants: tuple[str, ...]
) -> None:
    p = processor()
    messages = _faulted(fault)
    assert {m.variant for m in messages} == set(variants)
    assert {m.family for m in messages} == set(FAMILIES)
    for msg in messages:
        out = process(p, msg)
        assert msg.variant is not None
        assert out.readings == [], msg.payload[:200]
        assert out.rejection is not None
        assert out.rejection.reason == EXPECTED_REASONS[msg.variant], (msg.payload[:200], out.rejection)


def test_an_oversize_payload_is_over_64_kib_and_otherwise_valid() -> None:
    msg = next(m for m in _faulted("bad-payload") if m.variant == "oversize")
    assert len(msg.payload) > 65536
    json.loads(msg.payload)


def test_spikes_are_stored_and_cross_the_alert_threshold() -> None:
    p = processor()
    messages = _faulted("spike")
    assert {m.kind for m in messages} == set(KINDS) - {"street_light"}  # lights have no threshold
    fleet = {d.uid: d for d in build_fleet(9)}
    for msg in messages:
        out = process(p, msg)
        assert out.rejection is None
        stored = {r.metric: r.value for r in out.readings}
        device = fleet[msg.device]
        if msg.kind == "water_level":
            assert float(stored["level_cm"]) > device.flood_level_cm
            assert stored["flood"] is True
        else:
            metric, threshold = ALERT_THRESHOLDS[msg.kind]
            assert float(stored[metric]) > threshold
        assert all(math.isfinite(float(v)) for v in stored.values())


def test_the_fault_rate_is_the_rate_of_each_fault() -> None:
    sim = Simulator(build_fleet(1), seed=1, faults=FaultConfig(frozenset({"bad-payload", "bad-clock"}), 0.05))
    counts = Counter(m.fault for m in run_messages(sim, 20000))
    for fault in ("bad-payload", "bad-clock"):
        assert 800 < counts[fault] < 1200


def test_silent_devices_stop_after_a_few_messages_and_never_come_back() -> None:
    sim = Simulator(build_fleet(1), seed=1, faults=FaultConfig(frozenset({"silent"}), 0.05))
    planned = sim.planned_silent
    assert len(planned) == 4  # 5 % of 70, rounded
    messages = run_messages(sim, 70 * 20)
    sent = Counter(m.device for m in messages)
    assert set(sim.silenced) == set(planned)
    for uid in planned:
        assert 2 <= sent[uid] <= 10
        last = max(i for i, m in enumerate(messages) if m.device == uid)
        assert last < 70 * 11
    assert all(m.fault is None for m in messages)


def test_at_least_one_device_goes_silent_and_an_all_silent_fleet_ends() -> None:
    assert len(Simulator(build_fleet(1), seed=1, faults=FaultConfig(frozenset({"silent"}), 0.0)).planned_silent) == 1
    sim = Simulator(build_fleet(1, 2), seed=1, faults=FaultConfig(frozenset({"silent"}), 1.0))
    results = [sim.next_message(WALL, WALL) for _ in range(25)]
    assert results[-1] is None


def test_parse_faults() -> None:
    assert parse_faults("all") == {"bad-payload", "silent", "spike", "bad-clock"}
    assert parse_faults("spike, silent") == {"spike", "silent"}
    assert parse_faults("") == frozenset()
    with pytest.raises(ValueError, match="bogus"):
        parse_faults("spike,bogus")


# --- sources, CLI, broker settings ----------------------------------------------------------------


def test_the_example_config_reads_the_default_prefix() -> None:
    p = Processor.from_settings(load_settings(EXAMPLE))
    for msg in run_messages(Simulator(build_fleet(1), seed=1), 70):
        out = process(p, msg)
        assert out.source == msg.family, msg.topic
        assert out.rejection is None


def test_print_sources_is_toml_for_the_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    from ingest.cli import main

    assert main(["simulate", "--print-sources", "--prefix", "t0/x"]) == 0
    sources = tomllib.loads(capsys.readouterr().out)["sources"]
    assert sources == [
        {"name": "t0-x-native", "topic": "t0/x/{district}/{device}/up", "format": "native"},
        {"name": "t0-x-senml", "topic": "t0/x/{district}/{device}/senml", "format": "senml"},
    ]


def _simulate_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["simulate"]
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def test_help_explains_every_option() -> None:
    parser = _simulate_parser()
    text = parser.format_help()
    wanted = {"--mqtt-url", "--username", "--devices", "--rate", "--duration", "--seed", "--prefix", "--qos",
              "--faults", "--fault-rate", "--start", "--speed", "--print-sources", "--quiet", "--json",
              "--backfill", "--interval", "--end", "--gap", "--drop"}
    options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert options == wanted
    for action in parser._actions:
        assert action.help, action.option_strings
        assert len(action.help) > 20, action.option_strings
    for option in wanted:
        assert option in text
    for needed in ("SENSOR_INGEST_MQTT_URL", "SENSOR_INGEST_MQTT_PASSWORD", "--print-sources",
                   "sensor-ingest simulate --duration 60", "max_future"):
        assert needed in text


@pytest.mark.parametrize("argv", [["--rate", "0"], ["--devices", "0"], ["--fault-rate", "1.5"],
                                  ["--faults", "nope"], ["--prefix", "a/+"], ["--start", "yesterday"],
                                  ["--qos", "3"], ["--duration", "-1"]])
def test_invalid_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["simulate", *argv])
    assert info.value.code == 2


def test_options_are_parsed() -> None:
    args = build_parser().parse_args(["simulate", "--faults", "all", "--start", "2026-11-25T06:30", "--speed", "720"])
    assert args.faults == parse_faults("all")
    assert args.start == hanoi(6, 30)
    assert args.devices == 70
    assert args.rate == 20.0
    assert args.qos == 1
    assert args.prefix == "city"


def test_broker_comes_from_the_option_else_the_environment() -> None:
    b = broker_from("mqtt://ops@broker.example:1999", None, {"SENSOR_INGEST_MQTT_PASSWORD": "s3cret"})
    assert (b.host, b.port, b.tls, b.username, b.password) == ("broker.example", 1999, False, "ops", "s3cret")
    assert "s3cret" not in repr(b)
    b = broker_from(None, "me", {"SENSOR_INGEST_MQTT_URL": "mqtts://u:p%40ss@h"})
    assert (b.host, b.port, b.tls, b.username, b.password) == ("h", 8883, True, "me", "p@ss")
    assert "p%40ss" not in b.display
    b = broker_from(None, None, {})
    assert (b.host, b.port, b.username, b.password) == ("127.0.0.1", 1883, None, None)


def test_a_password_on_the_command_line_is_refused() -> None:
    with pytest.raises(ConfigError, match="SENSOR_INGEST_MQTT_PASSWORD") as info:
        broker_from("mqtt://u:s3cret@h:1883", None, {})
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError, match="not an MQTT URL"):
        broker_from("http://h", None, {})


def test_tally_counts_only_what_the_broker_acknowledged() -> None:
    fleet = build_fleet(1, 14)
    tally = Tally(fleet)
    ok = Meta("native", "noise", None, None, 1)
    bad = Meta("senml", "rain", "bad-payload", "nan", 1)
    big = Meta("native", "rain", "bad-payload", "oversize", 0)
    for meta in (ok, ok, bad, big):
        tally.on_published(meta)
    tally.on_answer(ok, failure=False, no_subscribers=True)
    tally.on_answer(bad, failure=True, reason="Quota exceeded")
    tally.on_answer(big, failure=False)

    summary = tally.summary(seed=1, prefix="city", elapsed=1.0, silenced=["hn-aq-0001"])
    assert (summary["published"], summary["acked"], summary["refused"], summary["sent_qos0"],
            summary["unanswered"], summary["no_subscribers"]) == (4, 1, 1, 1, 1, 1)
    assert summary["families"]["native"] == {"published": 3, "acked": 1, "devices": 7}
    assert summary["faults"]["bad-payload"] == {"published": 2, "acked": 0}
    assert summary["faults"]["silent"] == {"devices": 1}
    assert summary["variants"]["bad-payload/nan"] == {"published": 1, "acked": 0}
    assert sorted(summary["devices_per_family"]) == ["native", "senml"]
    assert sum(len(v) for v in summary["devices_per_family"].values()) == 14
    assert summary["kinds"]["street_light"] == {"published": 0, "acked": 0, "devices": 2}
    json.dumps(summary)


def test_devices_are_plain_values() -> None:
    d = build_fleet(1, 1)[0]
    assert isinstance(d, Device)
    assert d.kind == "air_quality"
