"""Property tests: whatever the bytes, a decoder returns Decoded or raises DecodeError, nothing else."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decoders import REGISTRY, DecodeContext, Decoded
from ingest.decoders.jsonutil import DEFAULT_MAX_DEPTH
from ingest.errors import DecodeError

RECEIVED = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
PROPS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

contexts = st.builds(
    DecodeContext,
    topic=st.just("t"),
    received_at=st.just(RECEIVED),
    device=st.sampled_from([None, "dev-a", "hn-aq-0001"]),
    timezone=st.sampled_from([None, ZoneInfo("Asia/Ho_Chi_Minh")]),
)
formats = st.sampled_from(sorted(REGISTRY))

times = st.one_of(
    st.datetimes().map(lambda d: d.isoformat()),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(["2026-11-25T03:00:00Z", "2026-11-25", "yesterday", "", "9999-12-31T23:59:59-23:59"]),
    st.floats(),
    st.integers(min_value=-(2**70), max_value=2**70),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.text(max_size=12),
    times,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)

numbers = st.one_of(st.floats(), st.integers(min_value=-(2**40), max_value=2**40))
names = st.text(min_size=1, max_size=6)
# Mostly well-formed values with a share of wrong ones, so that decoding gets past the shape checks.
native_leaf = st.one_of(
    numbers,
    st.booleans(),
    st.text(max_size=6),
    st.fixed_dictionaries({"value": st.one_of(numbers, st.booleans(), scalars)}, optional={"unit": names}),
    st.fixed_dictionaries({"text": st.text(max_size=6)}, optional={"unit": names}),
    json_values,
)
native_item = st.fixed_dictionaries(
    {"metric": names},
    optional={
        "value": st.one_of(numbers, st.booleans(), scalars),
        "text": st.text(max_size=6),
        "unit": names,
        "time": times,
    },
)
native_message = st.fixed_dictionaries(
    {"readings": st.one_of(st.dictionaries(names, native_leaf, max_size=4), st.lists(native_item, max_size=4))},
    optional={"device": st.sampled_from(["dev-a", "hn-aq-0001", "dev-b"]), "time": times},
)
native_like = st.one_of(native_message, st.lists(native_message, max_size=3))


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] = json_values) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, ``bad`` otherwise."""
    return st.integers(0, 9).flatmap(lambda k: bad if k == 0 else good)


senml_record = st.fixed_dictionaries(
    {},
    optional={
        "bn": mostly(st.sampled_from(["dev-a:", "hn-aq-0001/", "dev-b", ":", ""])),
        "bt": mostly(st.one_of(numbers, st.sampled_from([1.795575600e9, 2.0**28]))),
        "bu": mostly(names),
        "bv": mostly(numbers),
        "bs": numbers,
        "bver": mostly(st.integers(min_value=1, max_value=10), st.sampled_from([0, 11, 2.5])),
        "n": mostly(names),
        "u": mostly(names),
        "v": mostly(numbers),
        "vs": mostly(st.text(max_size=6)),
        "vb": mostly(st.booleans()),
        "vd": st.text(max_size=6),
        "s": mostly(numbers),
        "t": mostly(numbers),
        "ut": numbers,
        "x": json_values,
    },
)
senml_like = st.lists(
    mostly(senml_record, st.dictionaries(st.sampled_from(["x_", "v", "n"]), json_values)),
    max_size=6,
)


def _check(decoded: Decoded) -> None:
    for reading in decoded.readings:
        assert reading.time.tzinfo is UTC
        assert isinstance(reading.value, float | bool | str)
        assert isinstance(reading.device, str)
        assert isinstance(reading.metric, str)
        assert reading.metric
    assert decoded.ignored >= 0


def _run(name: str, payload: bytes, ctx: DecodeContext) -> None:
    try:
        decoded = REGISTRY[name](payload, ctx)
    except DecodeError as exc:
        error = exc
    else:
        _check(decoded)
        return
    assert error.reason
    assert error.detail


def _dump(value: Any) -> bytes:
    return json.dumps(value).encode()


@PROPS
@given(name=formats, payload=st.binary(max_size=200), ctx=contexts)
def test_random_bytes(name: str, payload: bytes, ctx: DecodeContext) -> None:
    _run(name, payload, ctx)


@PROPS
@given(name=formats, value=json_values, ctx=contexts)
def test_random_json(name: str, value: Any, ctx: DecodeContext) -> None:
    _run(name, _dump(value), ctx)


@PROPS
@given(value=native_like, ctx=contexts)
def test_native_shaped_json(value: Any, ctx: DecodeContext) -> None:
    _run("native", _dump(value), ctx)


@PROPS
@given(value=senml_like, ctx=contexts)
def test_senml_shaped_json(value: Any, ctx: DecodeContext) -> None:
    _run("senml", _dump(value), ctx)


# Line protocol reads no JSON: "[" * 100_000 is one malformed line there, decoded in linear time
# (tests/unit/test_line.py::test_deeply_nested_json_is_one_malformed_line).
JSON_READING = sorted(set(REGISTRY) - {"line"})


@pytest.mark.parametrize("name", JSON_READING)
@pytest.mark.parametrize(
    "payload",
    [b"[" * 100_000, b'{"readings":' * 50_000, b"[" * 33 + b"]" * 33, b'{"readings": {"a": ' + b"[" * 31 + b"]" * 31
     + b"}}", b'[{"bn": "d:", "n": "x", "v": 1, "x": ' + b"{" * 31 + b"}" * 31 + b"}]"],
    ids=["100000-open-arrays", "50000-open-objects", "33-levels", "33-levels-in-native", "33-levels-in-senml"],
)
def test_deep_nesting_is_a_decode_error(name: str, payload: bytes) -> None:
    """Deeper than the default ingest.max_json_depth (32): refused as too_deep, by every decoder."""
    ctx = DecodeContext(topic="t", received_at=RECEIVED)
    assert ctx.max_depth == DEFAULT_MAX_DEPTH == 32
    with pytest.raises(DecodeError) as refused:
        REGISTRY[name](payload, ctx)
    assert refused.value.reason == "too_deep"
    assert "ingest.max_json_depth = 32" in refused.value.detail


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_nesting_at_the_limit_is_not_too_deep(name: str) -> None:
    """32 levels are allowed: the payload is judged on its shape, not refused for its depth."""
    ctx = DecodeContext(topic="t", received_at=RECEIVED, device="d")
    payload = b"[" * 32 + b"]" * 32
    try:
        REGISTRY[name](payload, ctx)
        reason = None
    except DecodeError as exc:
        reason = exc.reason
    assert reason != "too_deep"


@settings(max_examples=2000, deadline=None)
@given(st.one_of(
    st.floats(0, 253402300799.999, allow_nan=False),
    st.integers(0, 253402300799),
    # Times of this century at microsecond and half-microsecond steps: where rounding could differ.
    st.integers(946684800_000000, 4102444800_000000).map(lambda us: us / 1e6),
    st.integers(946684800_000000, 4102444800_000000).map(lambda us: (us + 0.5) / 1e6),
))
def test_the_fast_epoch_conversion_is_the_exact_one(seconds: float) -> None:
    """epoch_to_utc uses datetime.fromtimestamp from 1970 on: the same instant as the epoch plus a
    timedelta (the definition), to the microsecond, whatever the rounding."""
    from datetime import timedelta

    from ingest.decoders.jsonutil import epoch_to_utc

    assert epoch_to_utc(seconds) == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)


def _outcome(format_name: str, payload: bytes, ctx: DecodeContext) -> Any:
    """What a decoder gives: its Decoded, or its error's reason and detail."""
    try:
        return REGISTRY[format_name](payload, ctx)
    except DecodeError as exc:
        return (exc.reason, exc.detail)


# Packs of mostly common records (what the fast path takes), with the odd other record among them.
senml_common_record = st.fixed_dictionaries(
    {"n": mostly(st.sampled_from(["temperature", "humidity", "", "x_"]), names),
     "v": mostly(st.one_of(st.floats(allow_nan=True), st.integers(-10**6, 10**6)))},
    optional={
        "bn": mostly(st.sampled_from(["dev-a:", "hn-aq-0001/", "dev-b"])),
        "bt": mostly(st.one_of(st.floats(2.0**28, 4e9), st.sampled_from([1.795575600e9, 2.0**28, 2.0**28 - 1]))),
        "bu": mostly(names),
        "bv": mostly(numbers),
        "u": mostly(st.sampled_from(["Cel", "%RH", ""]), st.one_of(names, st.none())),
        "t": mostly(st.one_of(st.floats(-1e6, 1e6), st.integers(-10**6, 10**6))),
        "s": numbers,
    },
)
senml_common = st.lists(mostly(senml_common_record, senml_record), min_size=1, max_size=8)


@PROPS
@given(value=st.one_of(senml_common, senml_like), ctx=contexts)
def test_the_senml_fast_path_decodes_as_the_general_one(value: Any, ctx: DecodeContext) -> None:
    """The fast path of the common record (a name, a number, an absolute time) gives exactly what the
    general path gives: the same readings, problems and ignored count, or the same error."""
    from ingest.decoders import senml

    payload = _dump(value)
    fast = _outcome("senml", payload, ctx)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(senml, "_FAST_PATH", False)
        general = _outcome("senml", payload, ctx)
    assert repr(fast) == repr(general)  # repr: a NaN value equals itself there, not under ==


# Native messages mostly of the common shape (what its fast path takes), with odd parts among them.
native_common_leaf = mostly(st.one_of(
    numbers, st.booleans(),
    st.fixed_dictionaries({"value": st.one_of(numbers, st.booleans())},
                          optional={"unit": mostly(st.sampled_from(["degF", "Cel", "%"]),
                                                   st.one_of(names, st.just("")))}),
), native_leaf)
native_common = mostly(st.fixed_dictionaries(
    {"readings": st.dictionaries(mostly(st.sampled_from(["seq", "temperature", "pm2_5"]), st.text(max_size=4)),
                                 native_common_leaf, min_size=1, max_size=4)},
    optional={"device": mostly(st.sampled_from(["dev-a", "hn-aq-0001", "dev-b"]), scalars),
              "time": mostly(st.one_of(st.sampled_from(["2026-11-25T03:00:00Z", "2026-11-25T10:00:00"]),
                                       st.floats(9e8, 2e9)), times)},
), native_message)


@PROPS
@given(value=st.one_of(native_common, native_like), ctx=contexts)
def test_the_native_fast_path_decodes_as_the_general_one(value: Any, ctx: DecodeContext) -> None:
    """The native fast path (one map-form message of numbers and booleans) gives exactly what the
    model-validated path gives: the same readings and problems, or the same error."""
    from ingest.decoders import native

    payload = _dump(value)
    fast = _outcome("native", payload, ctx)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(native, "_FAST_PATH", False)
        general = _outcome("native", payload, ctx)
    assert repr(fast) == repr(general)  # repr: a NaN value equals itself there, not under ==
