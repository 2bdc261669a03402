"""The `auto` format (ingest/decoders/auto.py): the family told from the payload, then decoded as that
family with its default options; and the value format's "nan" (not_finite even with options.text)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.decoders import OPTIONS, REGISTRY
from ingest.decoders import value as value_format
from ingest.decoders.auto import decode, detect
from ingest.decoders.base import DecodeContext, Decoded
from ingest.errors import ConfigError, DecodeError
from ingest.model import FLAG_RECEIVE_TIME
from ingest.settings import load_settings

RECEIVED = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
T_1795 = datetime(2026, 11, 18, 11, 6, 40, tzinfo=UTC)  # epoch 1795000000


def ctx(device: str | None = "d1", topic: str = "home/d1/x") -> DecodeContext:
    return DecodeContext(topic=topic, received_at=RECEIVED, device=device,
                         captures={"device": device} if device else {})


def rows(decoded: Decoded) -> list[tuple[str, str, object, str | None, datetime, int]]:
    return [(r.device, r.metric, r.value, r.unit, r.time, r.flags) for r in decoded.readings]


# --- detect --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "family"),
    [
        # SenML: an array whose first item is an object with a SenML key
        (b'[{"n": "temp", "v": 21.5}]', "senml"),
        (b'[{"bn": "urn:dev:d1/"}, {"n": "t", "v": 1}]', "senml"),
        (b'[{"vs": "on"}]', "senml"),
        (b'\n  [{"n": "temp", "v": 21.5}]', "senml"),  # leading whitespace
        # native: an array of objects with "readings", or an object whose readings is an object / array
        (b'[{"readings": {"a": 1}}]', "native"),
        (b'{"readings": {"pm25": 7}}', "native"),
        (b'{"readings": [{"metric": "a", "value": 1}]}', "native"),
        # json: any other array or object
        (b"[1, 2]", "json"),
        (b"[]", "json"),
        (b'[{"a": 1}]', "json"),
        (b'{"a": 1}', "json"),
        (b'{"readings": 5}', "json"),
        (b'{"sensordatavalues": {"a": 1}}', "json"),  # not a list: no pairs
        (b'  {"a": 1}', "json"),
        # lorawan
        (b'{"end_device_ids": {"device_id": "d1"}}', "lorawan"),
        (b'{"deviceInfo": {"devEui": "d1"}}', "lorawan"),
        # airrohr: json with pairs
        (b'{"sensordatavalues": []}', "airrohr"),
        (b'{"sensordatavalues": [{"value_type": "P1", "value": "1"}]}', "airrohr"),
        # line protocol
        (b"weather,site=a temp=1", "line"),
        (b"weather temp=1i 1795000000000000000", "line"),
        (b"# a comment first\nweather temp=1", "line"),
        (b"\n\n   weather temp=1", "line"),
        (b"wea\\ ther,t=1 f=1", "line"),  # an escaped space in the measurement
        # value: a number, ON/OFF, a JSON scalar, any other text
        (b"21.5", "value"),
        (b"ON", "value"),
        (b'"21.5"', "value"),
        (b"true", "value"),
        (b"null", "value"),
        (b"hello world", "value"),
        (b"x=1", "value"),  # no measurement before the field
        (b"# only a comment", "value"),
        (b"", "value"),
        (b"   ", "value"),
        (b"\xff\xfe", "value"),  # not UTF-8: the value decoder says why
    ],
)
def test_detect_tells_the_family(payload: bytes, family: str) -> None:
    assert detect(payload) == family


@pytest.mark.parametrize("payload", [b"{bad", b"[1,", b'{"a": 1} x', b'{"a": 1, "a": 2}'])
def test_detect_raises_malformed_for_json_it_cannot_read(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        detect(payload)

    assert info.value.reason == "malformed"


def test_detect_raises_too_deep_past_the_depth_limit() -> None:
    with pytest.raises(DecodeError) as info:
        detect(b"[" * 5 + b"]" * 5, max_depth=4)

    assert info.value.reason == "too_deep"
    assert "limit ingest.max_json_depth = 4" in info.value.detail


def test_detect_looks_only_at_the_first_point_line() -> None:
    assert detect(b"weather temp=1\nnot a point") == "line"
    assert detect(b"not a point\nweather temp=1") == "value"


# --- decode --------------------------------------------------------------------------------------


def test_decode_senml() -> None:
    decoded = decode(b'[{"n": "temp", "u": "Cel", "v": 21.5, "t": 1795000000}]', ctx())

    assert rows(decoded) == [("d1", "temp", 21.5, "Cel", T_1795, 0)]


def test_decode_native() -> None:
    decoded = decode(b'{"readings": {"pm25": 7}}', ctx())

    assert rows(decoded) == [("d1", "pm25", 7.0, None, RECEIVED, FLAG_RECEIVE_TIME)]


def test_decode_json_with_default_options() -> None:
    decoded = decode(b'{"AM2301": {"Temperature": 21.5}, "id": 4}', ctx())

    assert rows(decoded) == [("d1", "AM2301.Temperature", 21.5, None, RECEIVED, FLAG_RECEIVE_TIME)]
    assert decoded.ignored == 1


def test_decode_airrohr_reads_the_pairs() -> None:
    payload = b'{"software_version": "NRZ", "sensordatavalues": [{"value_type": "SDS_P1", "value": "5.53"}]}'

    decoded = decode(payload, ctx())

    assert rows(decoded) == [("d1", "SDS_P1", 5.53, None, RECEIVED, FLAG_RECEIVE_TIME)]
    assert decoded.ignored == 1


def test_decode_the_things_stack_uplink() -> None:
    payload = (b'{"end_device_ids": {"device_id": "d1"}, "received_at": "2026-11-25T03:00:00Z",'
               b' "uplink_message": {"decoded_payload": {"temperature": 21.5}}}')

    decoded = decode(payload, ctx())

    assert rows(decoded) == [("d1", "temperature", 21.5, None, datetime(2026, 11, 25, 3, 0, tzinfo=UTC), 0)]


def test_decode_chirpstack_uplink() -> None:
    payload = b'{"deviceInfo": {"devEui": "d1"}, "time": "2026-11-25T03:00:00Z", "object": {"humidity": 57.5}}'

    decoded = decode(payload, ctx())

    assert rows(decoded) == [("d1", "humidity", 57.5, None, datetime(2026, 11, 25, 3, 0, tzinfo=UTC), 0)]


def test_decode_line_protocol_with_a_comment_line_first() -> None:
    decoded = decode(b"# exported by a gateway\nweather,site=a temp=1.5 1795000000000000000\n", ctx())

    assert rows(decoded) == [("d1", "weather.temp", 1.5, None, T_1795, 0)]


@pytest.mark.parametrize(
    ("payload", "value"),
    [(b"21.5", 21.5), (b"ON", True), (b"off", False), (b'"21.5"', 21.5), (b"true", True),
     (b"hello there", "hello there")],  # with options.text: any other text is a state
)
def test_decode_a_value(payload: bytes, value: object) -> None:
    decoded = decode(payload, ctx())

    assert rows(decoded) == [("d1", "x", value, None, RECEIVED, FLAG_RECEIVE_TIME)]


def test_decode_a_json_scalar_is_one_value() -> None:
    decoded = decode(b"  42  ", ctx(topic="home/d1/level"))

    assert rows(decoded) == [("d1", "level", 42.0, None, RECEIVED, FLAG_RECEIVE_TIME)]


def test_decode_invalid_utf8_is_malformed() -> None:
    with pytest.raises(DecodeError) as info:
        decode(b"\xff\xfe21", ctx())

    assert info.value.reason == "malformed"
    assert info.value.detail == "not UTF-8: invalid start byte at byte 0"


@pytest.mark.parametrize("payload", [b'{"a": ', b"[1, 2", b'{"a" 1}'])
def test_decode_malformed_json_is_malformed(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(payload, ctx())

    assert info.value.reason == "malformed"
    assert info.value.detail.startswith("not JSON: ")


@pytest.mark.parametrize("payload", [b"", b" \n "])
def test_decode_an_empty_payload_is_empty(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(payload, ctx())

    assert info.value.reason == "empty"


def test_decode_ignores_the_options_given_in_the_context() -> None:
    # The family's own defaults apply, whatever the context carries (auto itself has no options).
    context = ctx()
    context.options = {"strings_as_numbers": False, "text": False}

    assert rows(decode(b'{"a": "1.5"}', context)) == [("d1", "a", 1.5, None, RECEIVED, FLAG_RECEIVE_TIME)]
    assert rows(decode(b"hello", context)) == [("d1", "x", "hello", None, RECEIVED, FLAG_RECEIVE_TIME)]


def test_auto_is_a_registered_format_without_options() -> None:
    assert REGISTRY["auto"] is decode
    assert OPTIONS["auto"].model_fields == {}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[sources.options]\ntext = true\n', "options.text: unknown option for format auto"),
        ('time_field = "t"\n', "time_field is read by the json format, not by auto"),
    ],
)
def test_auto_options_and_path_fields_are_config_errors(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[sources]]\nname = "a"\ntopic = "a/{device}"\nformat = "auto"\n' + extra, encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_settings(path)

    assert [p.key for p in info.value.problems] == ["sources[0]"]
    assert message in info.value.problems[0].message


# --- value: not finite ---------------------------------------------------------------------------


def _value_ctx(text: bool) -> DecodeContext:
    context = ctx(topic="node/sensor/temp/state", device="node")
    context.options = value_format.Options(text=text).model_dump()
    return context


@pytest.mark.parametrize("text", [False, True])
@pytest.mark.parametrize("payload", [b"nan", b"NaN", b"inf", b"-Infinity", b"1e999", b'"nan"'])
def test_value_nan_and_infinities_are_not_finite_even_with_text(payload: bytes, text: bool) -> None:
    with pytest.raises(DecodeError) as info:
        value_format.decode(payload, _value_ctx(text))

    assert info.value.reason == "not_finite"
    assert "is not a finite number (NaN and infinities are no readings)" in info.value.detail


def test_value_other_text_is_a_state_only_with_text() -> None:
    assert value_format.decode(b"nano", _value_ctx(True)).readings[0].value == "nano"

    with pytest.raises(DecodeError) as info:
        value_format.decode(b"nano", _value_ctx(False))
    assert info.value.reason == "wrong_type"


def test_auto_refuses_nan_as_not_finite() -> None:
    with pytest.raises(DecodeError) as info:
        decode(b"nan", ctx())

    assert info.value.reason == "not_finite"
