"""A source's time policy: device (the payload's time), receive (the receive time), device_or_receive
(the payload's time when it lies in [earliest_time, received_at + max_future], else the receive time).

Through validate() and through a Processor built from settings.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from ingest.errors import ConfigError
from ingest.model import FLAG_RECEIVE_TIME, FLAG_SUSPECT, RawMessage, Reading
from ingest.process import Processor
from ingest.settings import Settings, SourceSettings, load_settings
from ingest.validate import Limits, validate

RECEIVED = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE = timedelta(seconds=600)
LIMITS = Limits(earliest=EARLIEST, max_future=MAX_FUTURE)
GOOD = datetime(2026, 11, 25, 3, 0, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # a device's clock after a power loss
TOMORROW = RECEIVED + timedelta(days=1)
HANOI = timezone(timedelta(hours=7))


def _r(time: datetime, value: float | bool | str = 12.0, *, metric: str = "pm25", flags: int = 0) -> Reading:
    return Reading("aq-7", metric, time, value, None, flags)


def _at_receipt(r: Reading) -> Reading:
    return Reading(r.device, r.metric, RECEIVED, r.value, r.unit, r.flags | FLAG_RECEIVE_TIME)


# --- device -------------------------------------------------------------------------------------


def test_device_is_the_default_policy() -> None:
    assert SourceSettings(name="aq", topic="a/{device}", format="native").time_policy == "device"
    kept, problems = validate([_r(EPOCH)], RECEIVED, LIMITS)
    assert kept == []
    assert [p.reason for p in problems] == ["bad_time"]


def test_device_keeps_a_good_time_as_it_came() -> None:
    good = _r(GOOD)

    assert validate([good], RECEIVED, LIMITS, "device") == ([good], [])


@pytest.mark.parametrize(("when", "says"), [(EPOCH, "before earliest_time"), (TOMORROW, "86400s ahead")])
def test_device_rejects_1970_and_a_day_ahead_as_bad_time(when: datetime, says: str) -> None:
    kept, problems = validate([_r(when)], RECEIVED, LIMITS, "device")

    assert kept == []
    assert [(p.reason, p.device) for p in problems] == [("bad_time", "aq-7")]
    assert problems[0].detail.startswith(f"pm25: time {when.isoformat()} ")
    assert says in problems[0].detail


@pytest.mark.parametrize("when", [EARLIEST, RECEIVED + MAX_FUTURE])
def test_device_keeps_the_exact_bounds(when: datetime) -> None:
    reading = _r(when)

    assert validate([reading], RECEIVED, LIMITS, "device") == ([reading], [])


# --- receive ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [GOOD, EPOCH, TOMORROW, EARLIEST, RECEIVED + MAX_FUTURE, RECEIVED - timedelta(days=3650),
     datetime(2026, 11, 25, 10, 0, tzinfo=HANOI)],
)
def test_receive_gives_every_reading_the_receive_time_and_its_flag(when: datetime) -> None:
    reading = _r(when)

    kept, problems = validate([reading], RECEIVED, LIMITS, "receive")

    assert problems == []
    assert kept == [Reading("aq-7", "pm25", RECEIVED, 12.0, None, FLAG_RECEIVE_TIME)]


def test_receive_flags_a_device_time_that_equals_the_receive_time_too() -> None:
    # The policy says the receive time is used for every reading, so every reading carries the flag,
    # even one whose device clock happens to agree with the receive time to the microsecond.
    kept, problems = validate([_r(RECEIVED)], RECEIVED, LIMITS, "receive")

    assert problems == []
    assert kept == [Reading("aq-7", "pm25", RECEIVED, 12.0, None, FLAG_RECEIVE_TIME)]


def test_receive_keeps_the_other_flags_and_values_of_each_reading() -> None:
    readings = [_r(GOOD, 1.5, flags=FLAG_SUSPECT), _r(EPOCH, True, metric="door"), _r(GOOD, "open", metric="state")]

    kept, problems = validate(readings, RECEIVED, LIMITS, "receive")

    assert problems == []
    assert kept == [
        Reading("aq-7", "pm25", RECEIVED, 1.5, None, FLAG_SUSPECT | FLAG_RECEIVE_TIME),
        Reading("aq-7", "door", RECEIVED, True, None, FLAG_RECEIVE_TIME),
        Reading("aq-7", "state", RECEIVED, "open", None, FLAG_RECEIVE_TIME),
    ]


def test_receive_still_rejects_what_is_wrong_besides_the_time() -> None:
    kept, problems = validate([_r(EPOCH, float("nan")), _r(GOOD, 3.0)], RECEIVED, LIMITS, "receive")

    assert kept == [Reading("aq-7", "pm25", RECEIVED, 3.0, None, FLAG_RECEIVE_TIME)]
    assert [p.reason for p in problems] == ["not_finite"]


# --- device_or_receive --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        GOOD,
        EARLIEST,  # exactly earliest_time
        datetime(2000, 1, 1, 7, 0, tzinfo=HANOI),  # the same instant, in Hanoi
        RECEIVED + MAX_FUTURE,  # exactly max_future ahead
        RECEIVED,
        RECEIVED - timedelta(days=3650),
    ],
)
def test_device_or_receive_keeps_a_time_in_the_window_unflagged(when: datetime) -> None:
    reading = _r(when)

    assert validate([reading], RECEIVED, LIMITS, "device_or_receive") == ([reading], [])


@pytest.mark.parametrize(
    "when",
    [
        EPOCH,
        TOMORROW,
        EARLIEST - timedelta(microseconds=1),
        RECEIVED + MAX_FUTURE + timedelta(microseconds=1),
        # 2000-01-01 06:59 in Hanoi is still 1999 in UTC.
        datetime(2000, 1, 1, 6, 59, tzinfo=HANOI),
        datetime(2027, 11, 25, 3, 0, tzinfo=UTC),
    ],
)
def test_device_or_receive_gives_a_time_outside_the_window_the_receive_time_and_its_flag(when: datetime) -> None:
    kept, problems = validate([_r(when)], RECEIVED, LIMITS, "device_or_receive")

    assert problems == []
    assert kept == [Reading("aq-7", "pm25", RECEIVED, 12.0, None, FLAG_RECEIVE_TIME)]


def test_device_or_receive_judges_each_reading_on_its_own() -> None:
    good, old, ahead = _r(GOOD, 1.0, metric="a"), _r(EPOCH, 2.0, metric="b"), _r(TOMORROW, 3.0, metric="c")

    kept, problems = validate([good, old, ahead], RECEIVED, LIMITS, "device_or_receive")

    assert problems == []
    assert kept == [good, _at_receipt(old), _at_receipt(ahead)]


def test_device_or_receive_keeps_the_other_flags() -> None:
    kept, _ = validate([_r(EPOCH, flags=FLAG_SUSPECT)], RECEIVED, LIMITS, "device_or_receive")

    assert kept[0].flags == FLAG_SUSPECT | FLAG_RECEIVE_TIME


def test_a_reading_that_already_has_the_receive_time_is_kept_as_it_is() -> None:
    # A payload without a time: the decoder gave it the receive time and the flag.
    reading = _r(RECEIVED, flags=FLAG_RECEIVE_TIME)

    for policy in ("device", "receive", "device_or_receive"):
        assert validate([reading], RECEIVED, LIMITS, policy) == ([reading], []), policy


def test_device_or_receive_uses_the_limits_it_is_given() -> None:
    limits = Limits(earliest=datetime(2020, 1, 1, tzinfo=UTC), max_future=timedelta(0))
    in_2019 = _r(datetime(2019, 6, 1, tzinfo=UTC))
    one_ms_ahead = _r(RECEIVED + timedelta(milliseconds=1))
    at_receipt = _r(RECEIVED)

    kept, problems = validate([in_2019, one_ms_ahead, at_receipt], RECEIVED, limits, "device_or_receive")

    assert problems == []
    assert kept == [_at_receipt(in_2019), _at_receipt(one_ms_ahead), at_receipt]


# --- through the processor and the settings -----------------------------------------------------


def _processor(**policies: str) -> Processor:
    return Processor.from_settings(Settings(sources=[
        SourceSettings(name=name, topic=f"{name}/{{device}}", format="native", time_policy=policy)
        for name, policy in policies.items()
    ]))


def _msg(topic: str, payload: object) -> RawMessage:
    return RawMessage(topic, json.dumps(payload).encode(), RECEIVED)


def test_a_device_source_rejects_1970_as_bad_time() -> None:
    out = _processor(aq="device").process(_msg("aq/aq-1", {"time": "1970-01-01T00:00:00Z", "readings": {"pm25": 7}}))

    assert out.readings == []
    assert out.rejection is not None
    assert (out.rejection.reason, out.rejection.device) == ("bad_time", "aq-1")


@pytest.mark.parametrize("when", ["1970-01-01T00:00:00Z", "2026-11-26T03:00:05Z"])
def test_a_device_or_receive_source_stores_a_bad_clock_at_the_receive_time(when: str) -> None:
    out = _processor(aq="device_or_receive").process(_msg("aq/aq-1", {"time": when, "readings": {"pm25": 7}}))

    assert out.rejection is None
    assert [(r.device, r.metric, r.time, r.value, r.flags) for r in out.readings] == [
        ("aq-1", "pm25", RECEIVED, 7.0, FLAG_RECEIVE_TIME)]


def test_a_device_or_receive_source_keeps_a_good_device_time() -> None:
    out = _processor(aq="device_or_receive").process(
        _msg("aq/aq-1", {"time": "2026-11-25T09:59:00+07:00", "readings": {"pm25": 7}}))

    assert out.rejection is None
    assert [(r.time, r.flags) for r in out.readings] == [(datetime(2026, 11, 25, 2, 59, tzinfo=UTC), 0)]


def test_a_receive_source_stores_a_good_device_time_at_the_receive_time() -> None:
    out = _processor(aq="receive").process(_msg("aq/aq-1", {"time": "2026-11-25T02:59:00Z", "readings": {"pm25": 7}}))

    assert out.rejection is None
    assert [(r.time, r.flags) for r in out.readings] == [(RECEIVED, FLAG_RECEIVE_TIME)]


def test_each_source_has_its_own_policy() -> None:
    p = _processor(old="device", new="device_or_receive", gw="receive")
    payload = {"time": "1970-01-01T00:00:00Z", "readings": {"pm25": 7}}

    old, new, gw = (p.process(_msg(f"{name}/d-1", payload)) for name in ("old", "new", "gw"))

    assert old.readings == []
    assert old.rejection is not None
    assert old.rejection.reason == "bad_time"
    assert [(r.time, r.flags) for r in new.readings] == [(RECEIVED, FLAG_RECEIVE_TIME)]
    assert [(r.time, r.flags) for r in gw.readings] == [(RECEIVED, FLAG_RECEIVE_TIME)]


def test_the_catalog_checks_a_reading_that_got_the_receive_time() -> None:
    out = _processor(aq="device_or_receive").process(
        _msg("aq/aq-1", {"time": "1970-01-01T00:00:00Z", "readings": {"pm25": 900, "temperature": 900}}))

    assert [(r.metric, r.time, r.value, r.flags) for r in out.readings] == [
        ("pm25", RECEIVED, 900.0, FLAG_RECEIVE_TIME | FLAG_SUSPECT)]
    assert out.rejection is not None
    assert out.rejection.reason == "out_of_range"
    assert "temperature" in out.rejection.detail


def test_time_policy_is_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sensor-ingest.toml"
    path.write_text('[[sources]]\nname = "aq"\ntopic = "aq/{device}"\nformat = "native"\n'
                    'time_policy = "device_or_receive"\n', encoding="utf-8")
    settings = load_settings(path)

    assert settings.sources[0].time_policy == "device_or_receive"
    out = Processor.from_settings(settings).process(
        _msg("aq/aq-1", {"time": "1970-01-01T00:00:00Z", "readings": {"pm25": 7}}))
    assert [(r.time, r.flags) for r in out.readings] == [(RECEIVED, FLAG_RECEIVE_TIME)]


def test_an_unknown_time_policy_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "sensor-ingest.toml"
    path.write_text('[[sources]]\nname = "aq"\ntopic = "aq/{device}"\nformat = "native"\n'
                    'time_policy = "whenever"\n', encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_settings(path)

    assert len(info.value.problems) == 1
    p = info.value.problems[0]
    assert p.key == "sources[0].time_policy"
    for policy in ("'device'", "'receive'", "'device_or_receive'"):
        assert policy in p.message
    assert "'whenever'" in p.fix


def test_retimed_readings_keep_their_spacing_so_a_buffered_series_stays_a_series() -> None:
    t = datetime(1970, 1, 1, tzinfo=UTC)
    samples = [Reading("aq-7", "temperature", t + timedelta(minutes=i), 20.0 + i) for i in range(3)]
    kept, problems = validate(samples, RECEIVED, LIMITS, "device_or_receive")
    assert problems == []
    assert [(r.time, r.value, r.flags) for r in kept] == [
        (RECEIVED - timedelta(minutes=2), 20.0, FLAG_RECEIVE_TIME),
        (RECEIVED - timedelta(minutes=1), 21.0, FLAG_RECEIVE_TIME),
        (RECEIVED, 22.0, FLAG_RECEIVE_TIME)]


def test_under_receive_a_pack_keeps_its_spacing_too() -> None:
    t = RECEIVED - timedelta(days=3)
    kept, _ = validate([Reading("aq-7", "pm25", t, 1.0), Reading("aq-7", "pm25", t + timedelta(seconds=30), 2.0)],
                       RECEIVED, LIMITS, "receive")
    assert [r.time for r in kept] == [RECEIVED - timedelta(seconds=30), RECEIVED]


def test_a_retimed_reading_that_would_fall_before_earliest_takes_the_receive_time() -> None:
    old = Reading("aq-7", "pm25", datetime(1970, 1, 1, tzinfo=UTC), 1.0)
    ahead = Reading("aq-7", "pm10", RECEIVED + timedelta(days=400), 2.0)
    kept, _ = validate([old, ahead], RECEIVED, LIMITS, "device_or_receive")
    assert [(r.metric, r.time) for r in kept] == [("pm25", RECEIVED), ("pm10", RECEIVED)]
