"""validate(): keep correct readings, reject the rest with a reason and a detail naming what is wrong."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ingest.model import Reading
from ingest.validate import Limits, validate

RECEIVED = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
LIMITS = Limits(earliest=datetime(2000, 1, 1, tzinfo=UTC), max_future=timedelta(seconds=600))
T = datetime(2026, 11, 25, 3, 0, 0, tzinfo=UTC)


def _r(value: float | bool | str = 1.0, *, device: str = "aq-7", metric: str = "pm25",
       time: datetime = T) -> Reading:
    return Reading(device, metric, time, value)


def _one_rejection(reading: Reading) -> tuple[str, str, str | None]:
    kept, problems = validate([reading], RECEIVED, LIMITS)
    assert kept == []
    assert len(problems) == 1
    return problems[0].reason, problems[0].detail, problems[0].device


def test_keeps_good_readings_in_order() -> None:
    readings = [
        _r(35.2),
        _r(-4.0, metric="temperature"),
        _r(0.0, metric="zero"),
        _r(True, metric="door"),
        _r(False, metric="alarm"),
        _r("open", metric="status"),
        _r("", metric="empty_text"),
        _r("x" * 1000, metric="max_text"),
    ]

    kept, problems = validate(readings, RECEIVED, LIMITS)

    assert kept == readings
    assert problems == []


def test_good_readings_survive_next_to_bad_ones() -> None:
    good = _r(1.0, metric="a")
    kept, problems = validate([_r(float("nan"), metric="b"), good, _r(2.0, device="")], RECEIVED, LIMITS)

    assert kept == [good]
    assert [p.reason for p in problems] == ["not_finite", "bad_device"]


def test_empty_input() -> None:
    assert validate([], RECEIVED, LIMITS) == ([], [])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_rejects_values_that_are_not_finite(value: float) -> None:
    reason, detail, device = _one_rejection(_r(value, metric="pm25"))

    assert reason == "not_finite"
    assert "pm25" in detail
    assert device == "aq-7"


@pytest.mark.parametrize(
    "when",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        # 2000-01-01 06:59 in Hanoi is still 1999 in UTC.
        datetime(2000, 1, 1, 6, 59, tzinfo=timezone(timedelta(hours=7))),
    ],
)
def test_rejects_time_before_earliest(when: datetime) -> None:
    reason, detail, device = _one_rejection(_r(time=when, metric="temperature"))

    assert reason == "bad_time"
    assert "temperature" in detail
    assert "earliest_time" in detail
    assert device == "aq-7"


@pytest.mark.parametrize(
    "when",
    [
        datetime(2027, 11, 25, 3, 0, 0, tzinfo=UTC),  # next year
        RECEIVED + timedelta(seconds=600, microseconds=1),
        # 10:10:06 in Hanoi is 03:10:06 UTC: one second past the limit.
        datetime(2026, 11, 25, 10, 10, 6, tzinfo=timezone(timedelta(hours=7))),
    ],
)
def test_rejects_time_too_far_ahead(when: datetime) -> None:
    reason, detail, device = _one_rejection(_r(time=when, metric="humidity"))

    assert reason == "bad_time"
    assert "humidity" in detail
    assert "max_future" in detail
    assert device == "aq-7"


@pytest.mark.parametrize(
    "when",
    [
        datetime(2000, 1, 1, tzinfo=UTC),  # exactly earliest_time
        datetime(2000, 1, 1, 7, 0, tzinfo=timezone(timedelta(hours=7))),  # the same instant, in Hanoi
        RECEIVED + timedelta(seconds=600),  # exactly max_future ahead
        RECEIVED + timedelta(seconds=599),
        RECEIVED - timedelta(days=3650),
    ],
)
def test_time_limits_are_inclusive(when: datetime) -> None:
    reading = _r(time=when)
    assert validate([reading], RECEIVED, LIMITS) == ([reading], [])


def test_max_future_of_zero_rejects_any_time_after_receipt() -> None:
    limits = Limits(LIMITS.earliest, timedelta(0))
    at_receipt = _r(time=RECEIVED)
    later = _r(time=RECEIVED + timedelta(milliseconds=1))

    kept, problems = validate([at_receipt, later], RECEIVED, limits)

    assert kept == [at_receipt]
    assert [p.reason for p in problems] == ["bad_time"]


@pytest.mark.parametrize("device", ["", "d" * 201, "aq\x007", "aq\n7", "aq\x7f7", "\x1b[31maq", "\udc80x", "a\ud800"])
def test_rejects_bad_device_ids(device: str) -> None:
    reason, detail, _ = _one_rejection(_r(device=device))

    assert reason == "bad_device"
    assert repr(device[:64])[:-1] in detail
    assert detail.startswith("device id ")
    detail.encode("utf-8")  # the detail itself is storable: surrogates come out escaped


def test_bad_device_rejection_keeps_a_bounded_device_id() -> None:
    _, _, device = _one_rejection(_r(device="d" * 5000))

    assert device == "d" * 200


def test_longest_allowed_names_pass() -> None:
    reading = _r(device="d" * 200, metric="m" * 200)
    assert validate([reading], RECEIVED, LIMITS) == ([reading], [])


@pytest.mark.parametrize("metric", ["", "m" * 201, "pm\x0025", "pm\t25", "pm\x7f", "pm\udfff25"])
def test_rejects_bad_metric_names(metric: str) -> None:
    reason, detail, device = _one_rejection(_r(metric=metric))

    assert reason == "bad_metric"
    assert repr(metric[:64])[:-1] in detail
    detail.encode("utf-8")
    assert detail.startswith("metric name ")
    assert device == "aq-7"


def test_rejects_nul_in_text() -> None:
    reason, detail, device = _one_rejection(_r("op\x00en", metric="status"))

    assert reason == "bad_text"
    assert "status" in detail
    assert device == "aq-7"


@pytest.mark.parametrize("text", ["\udc80", "open\ud83d", "\ud83d\ude00"])
def test_rejects_lone_surrogates_in_text(text: str) -> None:
    reason, detail, device = _one_rejection(_r(text, metric="status"))

    assert reason == "bad_text"
    assert "surrogate" in detail
    assert device == "aq-7"


@pytest.mark.parametrize("unit", ["deg\udc80", "C\x00", "u" * 33, ""])
def test_rejects_units_that_cannot_be_stored(unit: str) -> None:
    reason, detail, device = _one_rejection(Reading("aq-7", "temperature", T, 21.0, unit))

    assert (reason, device) == ("bad_text", "aq-7")
    assert detail.startswith("temperature: unit ")
    detail.encode("utf-8")


def test_rejects_text_over_1000_characters() -> None:
    reason, detail, device = _one_rejection(_r("x" * 1001, metric="note"))

    assert reason == "too_long"
    assert "note" in detail
    assert "1001" in detail
    assert device == "aq-7"


def test_non_ascii_names_and_text_pass() -> None:
    reading = _r("cửa mở", device="hà-nội-7", metric="trạng_thái")
    assert validate([reading], RECEIVED, LIMITS) == ([reading], [])


@pytest.mark.parametrize(
    "reading",
    [
        _r(device=""),
        _r(device="x\ny"),
        _r(metric=""),
        _r(metric="a\x01"),
        _r(float("nan"), metric="nanmetric"),
        _r("\x00", metric="textmetric"),
        _r("y" * 2000, metric="longmetric"),
        _r(time=datetime(1970, 1, 1, tzinfo=UTC), metric="oldmetric"),
        _r(time=datetime(2027, 11, 25, tzinfo=UTC), metric="futuremetric"),
    ],
)
def test_every_rejection_detail_names_the_metric_or_device(reading: Reading) -> None:
    reason, detail, _ = _one_rejection(reading)

    names = {"bad_device": repr(reading.device[:64])[:-1], "bad_metric": repr(reading.metric[:64])[:-1]}
    assert names.get(reason, reading.metric) in detail
