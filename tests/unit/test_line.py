"""The `line` decoder (InfluxDB line protocol): syntax, values, time, device, limits.

References: the InfluxDB v2 "Line protocol" reference (docs.influxdata.com/influxdb/v2/reference/syntax/
line-protocol/), quoted as "v2 §...", and the grammar of influxdata/line-protocol (line-protocol.ebnf).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.decoders import line
from ingest.decoders.base import DecodeContext, Decoded
from ingest.decoders.mapping import MetricRule, SourceMapping
from ingest.errors import DecodeError
from ingest.model import FLAG_RECEIVE_TIME, Reading

RECEIVED = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)  # 1795575600 s


def _decode(text: str | bytes, mapping: SourceMapping | None = None, **kw: Any) -> Decoded:
    options = line.Options.model_validate(kw.pop("options", {})).model_dump()
    if mapping is not None:
        kw["mapping"] = mapping
    ctx = DecodeContext(topic="t", received_at=RECEIVED, options=options, **kw)
    return line.decode(text.encode() if isinstance(text, str) else text, ctx)


def _one(text: str, **kw: Any) -> Reading:
    decoded = _decode(text, **kw)
    assert not decoded.problems, [p.detail for p in decoded.problems]
    assert len(decoded.readings) == 1, decoded.readings
    return decoded.readings[0]


def _problem(text: str, **kw: Any) -> tuple[str, str]:
    decoded = _decode(text, **kw)
    assert not decoded.readings, decoded.readings
    assert len(decoded.problems) == 1, decoded.problems
    return decoded.problems[0].reason, decoded.problems[0].detail


def _states(*names: str) -> SourceMapping:
    return SourceMapping(rules=tuple((n, MetricRule(state=True)) for n in names))


# ---------------------------------------------------------------- options


def test_options_defaults_and_validation() -> None:
    assert line.Options().model_dump() == {"precision": "ns", "device_tag": None}
    assert line.Options.model_validate({"precision": "s", "device_tag": "room"}).precision == "s"
    for bad in ({"precision": "m"}, {"device_tag": ""}, {"timezone": "UTC"}):
        with pytest.raises(ValidationError):
            line.Options.model_validate(bad)


def test_options_that_were_never_validated_are_refused_as_a_decode_error() -> None:
    ctx = DecodeContext(topic="t", received_at=RECEIVED, options={"precision": "minutes"})
    with pytest.raises(DecodeError) as refused:
        line.decode(b"m a=1", ctx)
    assert refused.value.reason == "unsupported"


# ---------------------------------------------------------------- field values


@pytest.mark.parametrize(
    ("token", "value"),
    [
        # v2 §Float examples, and the v1 reference's 1.e+78 and 1.E+78
        ("1.0", 1.0), ("1", 1.0), ("-1.234456e+78", -1.234456e78), ("1.e+78", 1e78), ("1.E+78", 1e78),
        # the grammar's other forms: digits ".", "." digits, exponents without a sign or a dot
        ("0" * 5000 + "1.5", 1.5), ("-" + "0" * 5000 + "7i", -7.0),  # leading zeros: not too many digits
        ("1.", 1.0), (".5", 0.5), ("-.5e-2", -0.005), ("1e5", 1e5), ("007", 7.0), ("-0", 0.0), ("1e-400", 0.0),
        # v2 §Integer and §UInteger examples and bounds
        ("1i", 1.0), ("12485903i", 12485903.0), ("-12485903i", -12485903.0), ("-9223372036854775808i", -(2.0**63)),
        ("9223372036854775807i", 2.0**63 - 1), ("1u", 1.0), ("0u", 0.0), ("18446744073709551615u", 2.0**64 - 1),
        ("9007199254740993i", 9007199254740992.0),  # past 2**53: the nearest double, as the column stores it
        # v2 §Boolean: every accepted spelling
        ("t", True), ("T", True), ("true", True), ("True", True), ("TRUE", True),
        ("f", False), ("F", False), ("false", False), ("False", False), ("FALSE", False),
    ],
)  # fmt: skip
def test_field_values(token: str, value: float | bool) -> None:
    reading = _one(f"m v={token} 1795575600000000000")
    assert type(reading.value) is type(value)
    assert reading.value == value


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("+1", "malformed"), ("1_000", "malformed"), ("١٢", "malformed"), ("1e", "malformed"), (".", "malformed"),
        ("-", "malformed"), ("0x1A", "malformed"), ("1.5i", "malformed"), ("1e3i", "malformed"), ("i", "malformed"),
        ("-1u", "malformed"), ("1iu", "malformed"), ("tRUE", "malformed"), ("yes", "malformed"), ("'a'", "malformed"),
        ("9223372036854775808i", "schema"), ("-9223372036854775809i", "schema"), ("18446744073709551616u", "schema"),
        ("1" * 5000 + "i", "schema"), ("0" * 5000 + "18446744073709551616u", "schema"),
        ("NaN", "schema"), ("nan", "schema"), ("inf", "schema"), ("-Inf", "schema"), ("+infinity", "schema"),
        ("1e400", "not_finite"), ("-1.8e308", "not_finite"),
    ],
)  # fmt: skip
def test_values_that_are_not_line_protocol(token: str, reason: str) -> None:
    got_reason, detail = _problem(f"m v={token} 1795575600000000000")
    assert got_reason == reason
    assert detail.startswith("line 1, column 5: field 'v': ")


def test_a_bad_value_keeps_the_whole_line_out() -> None:
    decoded = _decode("m,host=d a=1,b=2x,c=3 1795575600000000000\nm,host=d a=4 1795575600000000000")
    assert [(r.metric, r.value) for r in decoded.readings] == [("m.a", 4.0)]
    assert [p.reason for p in decoded.problems] == ["malformed"]
    assert "line 1, column 16: field 'b'" in decoded.problems[0].detail
    assert decoded.problems[0].device == "d"


# ---------------------------------------------------------------- strings and the mapping


@pytest.mark.parametrize(
    ("written", "text"),
    [
        (r'"\"string\" within a string"', '"string" within a string'),  # v2 §Special Characters
        (r'"a \\ b"', "a \\ b"),
        (r'"C:\temp\new"', r"C:\temp\new"),  # a backslash before anything else is itself
        ('"14 days, 11:07"', "14 days, 11:07"),  # commas and spaces need no escape inside quotes
        ('"a=b"', "a=b"),
        ('""', ""),
        ('"Launch 🚀"', "Launch 🚀"),
        ('"tab\there"', "tab\there"),
    ],
)
def test_string_fields_are_unescaped(written: str, text: str) -> None:
    assert _one(f"m s={written} 1795575600000000000", mapping=_states("m.s")).value == text


@pytest.mark.parametrize("n", range(1, 7))
def test_backslashes_in_a_string_as_the_reference_counts_them(n: int) -> None:
    """v2 §Escaping backslashes: 1 or 2 backslashes are read as 1, 3 or 4 as 2, 5 or 6 as 3."""
    reading = _one('m s="' + "\\" * n + 'x" 1795575600000000000', mapping=_states("m.s"))
    assert reading.value == "\\" * ((n + 1) // 2) + "x"


def test_what_a_string_becomes_is_the_mappings_call() -> None:
    mapping = SourceMapping(rules=(("m.state", MetricRule(state=True)),), value_map={"ON": 1.0, "OFF": False})
    payload = 'm state="idle",power="ON",relay="OFF",level="21.5",note="hello" 1795575600000000000'
    decoded = _decode(payload, mapping=mapping)
    assert [(r.metric, r.value) for r in decoded.readings] == [
        ("m.state", "idle"), ("m.power", 1.0), ("m.relay", False), ("m.level", 21.5)]
    assert decoded.ignored == 1  # "hello": not a reading
    assert not decoded.problems


def test_a_quoted_boolean_is_a_string() -> None:
    """v1 reference: 'InfluxDB assumes that all double quoted field values are strings'."""
    assert _decode('mymeas value="true"').ignored == 1


# ---------------------------------------------------------------- names and escapes


def test_escapes_per_element() -> None:
    reading = _one(r"a\,b\ c\=d,k\,\=\ =v\,\=\  f\,\=\ =1 1795575600000000000")
    assert reading.device == r"a,b c\=d"  # '=' needs no escape in a measurement: \= stays
    assert reading.metric == r"a,b c\=d.f,= "


def test_a_backslash_before_a_non_escape_character_is_itself() -> None:
    """v1 reference §Special characters: 'the field key is field_k\\ey'."""
    reading = _one(r"wea\ther,host=a\b field_k\ey=1 1795575600000000000")
    assert (reading.device, reading.metric) == (r"a\b", r"wea\ther.field_k\ey")


def test_two_backslashes_in_a_name_are_two_and_the_second_may_escape() -> None:
    # Only the element's escape characters are escapes in names; \\ is two backslashes (as InfluxDB keeps
    # them), so in a\\,b the second one escapes the comma.
    assert _one(r"a\\,b f=1 1795575600000000000").device == r"a\,b"


def test_a_name_cannot_end_in_a_backslash_before_its_separator() -> None:
    """v1.7 reference: 'Tag values cannot end with the backslash character, even if it is escaped'."""
    reason, detail = _problem(r"m,tag=value\ f=1")
    assert reason == "malformed"
    assert "unescaped '=' in the value of the tag 'tag'" in detail  # the space was escaped: 'value f' runs on


def test_quotes_in_names_are_part_of_the_name() -> None:
    """v2 §Quotes: quotes in measurements, tag keys and values and field keys are part of the name."""
    reading = _one("\"m\",'host'='a\"b' 'f\"=1 1795575600000000000")
    assert (reading.device, reading.metric) == ("\"m\"", "\"m\".'f\"")


def test_a_hash_is_a_comment_only_at_the_start_of_a_line() -> None:
    decoded = _decode("   # an indented comment\na#b f=1 1795575600000000000\n#c f=2")
    assert [r.metric for r in decoded.readings] == ["a#b.f"]


# ---------------------------------------------------------------- line structure


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (",a=b f=1", "column 1: no measurement name"),
        ("m", "column 2: no field set"),
        ("m,a=b", "column 6: no field set"),
        ("m ", "column 3: no field set"),
        ("m, a=b f=1", "column 3: expected a tag key after ','"),
        ("m,a f=1", "column 4: expected '=' after the tag key 'a'"),
        ("m,a= f=1", "column 5: the tag 'a' has no value"),
        ("m,a=b=c f=1", "column 6: an unescaped '=' in the value of the tag 'a'"),
        ("m,a=b,a=c f=1", "column 7: the tag key 'a' is repeated"),
        ("m =1", "column 3: expected a field key"),
        ("m f", "column 4: expected '=' after the field key 'f'"),
        ("m f=", "column 5: the field 'f' has no value"),
        ("m f=1,", "column 7: expected a field key"),
        ("m f=1,,g=2", "column 7: expected a field key"),
        ('m f="x"y', "column 8: unexpected 'y' after the value of the field 'f'"),
        ('m f="abc 1', "column 5: the string has no closing double quote"),
        ("m f=1 1 2", "column 9: unexpected text after the timestamp"),
        ("m\tf=1", "column 2: control character '\\t'"),
        ("m f=1\x00", "column 6: control character '\\x00'"),
        ("m,a=b\rc f=1", "column 6: control character '\\r'"),
        ("#\x07 bell", "column 2: control character '\\x07' in a comment"),
    ],
)
def test_malformed_lines_name_line_and_column(text: str, message: str) -> None:
    decoded = _decode("m ok=1 1795575600000000000\n" + text)
    assert [r.metric for r in decoded.readings] == ["m.ok"]
    assert [p.reason for p in decoded.problems] == ["malformed"]
    assert decoded.problems[0].detail.startswith("line 2, ")
    assert message in decoded.problems[0].detail


def test_spaces_the_grammar_allows() -> None:
    """line-protocol.ebnf: leading spaces, one or more spaces between sections, trailing spaces."""
    decoded = _decode("   m,a=b   f=1,g=2   1795575600000000000   \n  m2  f=3  ")
    assert [(r.metric, r.value, r.flags) for r in decoded.readings] == [
        ("m.f", 1.0, 0), ("m.g", 2.0, 0), ("m2.f", 3.0, FLAG_RECEIVE_TIME)]


def test_line_endings_and_blank_lines() -> None:
    decoded = _decode("m f=1 1795575600000000000\r\n\r\n\n   \nm g=2 1795575600000000000\r")
    assert [r.metric for r in decoded.readings] == ["m.f", "m.g"]
    assert not decoded.problems


def test_a_newline_ends_a_line_even_inside_a_string() -> None:
    """v2: 'Line protocol does not support the newline character \\n in tag or field values.'"""
    decoded = _decode('m s="one\ntwo" 1795575600000000000', mapping=_states("*"))
    assert not decoded.readings
    assert [p.detail.split(":")[0] for p in decoded.problems] == ["line 1, column 5", "line 2, column 25"]


# ---------------------------------------------------------------- time


@pytest.mark.parametrize(
    ("precision", "stamp"),
    [("ns", "1795575600123456789"), ("us", "1795575600123456"), ("ms", "1795575600123"), ("s", "1795575600")],
)
def test_each_precision(precision: str, stamp: str) -> None:
    expected = {"ns": T0.replace(microsecond=123456), "us": T0.replace(microsecond=123456),
                "ms": T0.replace(microsecond=123000), "s": T0}[precision]
    reading = _one(f"m f=1 {stamp}", options={"precision": precision})
    assert reading.time == expected
    assert reading.time.tzinfo is UTC
    assert reading.flags == 0


def test_nanoseconds_round_down_to_the_microsecond() -> None:
    assert _one("m f=1 1556813561098999999").time == datetime(2019, 5, 2, 16, 12, 41, 98999, tzinfo=UTC)
    assert _one("m f=1 -1").time == datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def test_no_timestamp_is_the_receive_time_flagged() -> None:
    received = datetime(2026, 11, 25, 10, 0, 5, tzinfo=UTC).astimezone()  # any zone in, UTC out
    ctx = DecodeContext(topic="t", received_at=received, options=line.Options().model_dump())
    reading = line.decode(b"m f=1", ctx).readings[0]
    assert reading.time == received
    assert reading.time.tzinfo is UTC
    assert reading.flags == FLAG_RECEIVE_TIME


@pytest.mark.parametrize(
    ("stamp", "precision", "ok"),
    [
        ("9223372036854775806", "ns", True), ("-9223372036854775806", "ns", True),  # v2 §Unix timestamp bounds
        ("9223372036854775807", "ns", False), ("-9223372036854775807", "ns", False),
        ("9223372036", "s", True), ("9223372037", "s", False),
        ("1" + "0" * 30, "ns", False), ("0" * 30 + "1", "s", True), ("-" + "0" * 5000 + "1", "s", True),
        ("9" * 5000, "s", False),
    ],
)  # fmt: skip
def test_timestamp_range(stamp: str, precision: str, ok: bool) -> None:
    decoded = _decode(f"m f=1 {stamp}", options={"precision": precision})
    assert bool(decoded.readings) is ok
    assert [p.reason for p in decoded.problems] == ([] if ok else ["bad_time"])


@pytest.mark.parametrize("stamp", ["1556813561.098", '"1466625759000000000"', "12abc", "1e9", "+1", "١٢"])
def test_a_timestamp_that_is_not_an_integer_is_bad_time(stamp: str) -> None:
    reason, detail = _problem(f"m,host=d f=1 {stamp}")
    assert reason == "bad_time"
    assert detail.startswith("line 1, column 14: timestamp ")


def test_lines_sharing_a_timestamp_share_the_instant() -> None:
    decoded = _decode("a f=1 1795575600000000000\nb f=1 1795575600000000000")
    assert decoded.readings[0].time is decoded.readings[1].time


# ---------------------------------------------------------------- device


@pytest.mark.parametrize(
    ("tags", "device"),
    [
        (",device=d1,host=h1,id=i1", "d1"), (",id=i1,host=h1", "h1"), (",id=i1,site=s", "i1"),
        (",site=s", "m"), ("", "m"),
    ],
)  # fmt: skip
def test_device_from_tags_then_measurement(tags: str, device: str) -> None:
    assert _one(f"m{tags} f=1").device == device


def test_device_tag_option_names_the_tag() -> None:
    assert _one("m,host=h,room=Living\\ Room f=1", options={"device_tag": "room"}).device == "Living Room"


def test_device_tag_option_missing_is_no_device_unless_the_topic_names_it() -> None:
    decoded = _decode("m,host=h f=1\nm,room=k f=2", options={"device_tag": "room"})
    assert [r.device for r in decoded.readings] == ["k"]
    assert [(p.reason, p.detail) for p in decoded.problems] == [
        ("no_device", "line 1: no tag 'room' (options.device_tag) names the device")]
    assert _one("m,host=h f=1", options={"device_tag": "room"}, device="k").device == "k"


def test_the_topic_device_wins_over_the_measurement_and_must_agree_with_tags() -> None:
    decoded = _decode("m f=1 1\nm,host=dev-a g=2 1", device="dev-a")
    assert [r.device for r in decoded.readings] == ["dev-a", "dev-a"]
    with pytest.raises(DecodeError) as refused:
        _decode("m f=1 1\nm,host=dev-b g=2 1", device="dev-a")
    assert refused.value.reason == "device_mismatch"
    assert "line 2: tag 'host' names device 'dev-b' but the topic says 'dev-a'" in refused.value.detail
    with pytest.raises(DecodeError):
        _decode("m,room=dev-b f=1", device="dev-a", options={"device_tag": "room"})


def test_other_tags_are_not_stored() -> None:
    reading = _one("cpu,cpu=cpu0,host=loaner usage_idle=68.75")
    assert (reading.device, reading.metric, reading.unit) == ("loaner", "cpu.usage_idle", None)


# ---------------------------------------------------------------- one (device, metric, time), twice


def test_the_same_series_again_the_later_value_wins() -> None:
    """v2 §Duplicate points: conflicts favour the new field set. Tag order does not make another series."""
    decoded = _decode("m,a=1,b=2 f=1,g=1 5000\nm,b=2,a=1 f=2 5999\nm f=1,f=3 6000")
    assert [(r.metric, r.value, r.time.microsecond) for r in decoded.readings] == [
        ("m.f", 2.0, 5), ("m.g", 1.0, 5), ("m.f", 3.0, 6)]
    assert decoded.ignored == 2
    assert not decoded.problems


def test_another_series_at_the_same_time_is_a_problem_not_an_overwrite() -> None:
    decoded = _decode("m,room=a f=1,g=1 5\nm,room=b f=2,h=2 5")
    assert [(r.metric, r.value) for r in decoded.readings] == [("m.f", 1.0), ("m.g", 1.0), ("m.h", 2.0)]
    assert [p.reason for p in decoded.problems] == ["schema"]
    assert decoded.problems[0].detail.startswith("line 2: 'm.f': device 'm' has a value at this time from line 1")
    assert "options.device_tag" in decoded.problems[0].detail


# ---------------------------------------------------------------- whole payloads and limits


@pytest.mark.parametrize("payload", [b"", b"\n\n", b"# only\n  # comments\n", b"   "])
def test_no_points_is_empty(payload: bytes) -> None:
    with pytest.raises(DecodeError) as refused:
        _decode(payload)
    assert refused.value.reason == "empty"


def test_not_utf8_is_malformed() -> None:
    with pytest.raises(DecodeError) as refused:
        _decode(b"m f=1\nm,host=\xc3\x28 f=1")
    assert refused.value.reason == "malformed"
    assert "at byte 13 (line 2)" in refused.value.detail


def test_lines_and_fields_are_counted_before_values_are_read() -> None:
    with pytest.raises(DecodeError) as refused:
        _decode("m f=1\n" * 4, max_readings=3)
    assert refused.value.reason == "too_many_readings"
    assert "4 lines" in refused.value.detail
    with pytest.raises(DecodeError) as refused:
        _decode("m f=1,g=2\nm f=x,g=y", max_readings=3)  # counted before the bad values are read
    assert "4 fields" in refused.value.detail
    assert len(_decode("m f=1,g=2,h=3", max_readings=3).readings) == 3


def test_every_line_bad_still_returns_the_problems() -> None:
    decoded = _decode("m\nn f=\n")
    assert not decoded.readings
    assert [p.reason for p in decoded.problems] == ["malformed", "malformed"]


# ---------------------------------------------------------------- properties


_PLAIN = st.text(st.characters(codec="utf-8", exclude_characters=' ,="\\#\n\r', exclude_categories=["Cc", "Cs"]),
                 min_size=1, max_size=8)  # what the fast path reads: no separators, quotes or backslashes
_NAME = st.text(st.characters(codec="utf-8", exclude_characters="\\\n\r", exclude_categories=["Cc", "Cs"]),
                min_size=1, max_size=8)
_VALUES = st.sampled_from(["1", "-2.5e3", "7i", "8u", "T", "false"])
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\n", exclude_categories=["Cs"]), max_size=12)


def _escape(text: str, chars: str) -> str:
    for char in chars:
        text = text.replace(char, "\\" + char)
    return text


@settings(max_examples=300, deadline=None, database=None)
@given(measurement=_PLAIN, tags=st.dictionaries(_PLAIN, _PLAIN, max_size=3),
       fields=st.dictionaries(_PLAIN, _VALUES, min_size=1, max_size=3),
       stamp=st.one_of(st.none(), st.integers(-(10**18), 10**18).map(str)))
def test_the_fast_path_reads_plain_lines_as_the_scanner_does(
    measurement: str, tags: dict[str, str], fields: dict[str, str], stamp: str | None
) -> None:
    text = measurement + "".join(f",{k}={v}" for k, v in tags.items()) + " "
    text += ",".join(f"{k}={v}" for k, v in fields.items()) + ("" if stamp is None else f" {stamp}")
    fast = line._fast(text)
    assert fast is not None, text
    assert fast._replace(columns=None) == line._scan(text)._replace(columns=None)


@settings(max_examples=300, deadline=None, database=None)
@given(measurement=_NAME.filter(lambda s: not s.startswith(("#", " "))), device=_NAME,
       key=_NAME.filter(lambda k: k != "s"), text=_TEXT)
def test_names_and_strings_escaped_as_the_reference_says_read_back(
    measurement: str, device: str, key: str, text: str
) -> None:
    payload = (f"{_escape(measurement, ', ')},device={_escape(device, ',= ')} "
               f"{_escape(key, ',= ')}=1,s=\"{_escape(text, chr(92) + chr(34))}\" 1795575600000000000")
    decoded = _decode(payload, mapping=_states("*.s"))
    assert not decoded.problems, (payload, decoded.problems)
    assert [(r.device, r.metric, r.value) for r in decoded.readings] == [
        (device, f"{measurement}.{key}", 1.0), (device, f"{measurement}.s", text)]


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(st.sampled_from(list('ab,= "\\#\t\r\n1i.e-uTf')), max_size=60))
def test_line_protocol_like_text_never_raises_anything_but_decode_error(payload: str) -> None:
    try:
        decoded = _decode(payload)
    except DecodeError as exc:  # only a payload of comments and blank lines is refused whole
        assert exc.reason == "empty", exc  # noqa: PT017
        return
    for problem in decoded.problems:
        assert problem.detail.startswith("line ")
    for reading in decoded.readings:
        assert reading.metric
        assert reading.device
        assert reading.time.tzinfo is UTC


@pytest.mark.parametrize("payload", [b"[" * 100_000, b'{"readings":' * 50_000, b"[" * 33 + b"]" * 33])
def test_deeply_nested_json_is_one_malformed_line(payload: bytes) -> None:
    """Line protocol has no nesting: JSON sent to a line source is a malformed line, read in linear time
    (the fast path's possessive quantifiers, the scanner's regex searches)."""
    decoded = _decode(payload)
    assert not decoded.readings
    assert [p.reason for p in decoded.problems] == ["malformed"]


def _reference_element(text: str, separators: str, escapable: str) -> tuple[str, int] | None:
    """The reference's rule, one character at a time: a backslash before an escape character is that
    character, before anything else it is itself. None when the element ends at a control character."""
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            if text[i + 1 : i + 2] and text[i + 1] in escapable:
                out.append(text[i + 1])
                i += 2
            else:
                out.append("\\")
                i += 1
            continue
        if char in separators:
            break
        if char < " ":
            return None
        out.append(char)
        i += 1
    return "".join(out), i


def _reference_string(text: str) -> tuple[str, int] | None:
    out, i = [], 1
    while i < len(text):
        char = text[i]
        if char == '"':
            return "".join(out), i + 1
        if char == "\\" and text[i + 1 : i + 2] in ('"', "\\"):
            out.append(text[i + 1])
            i += 2
            continue
        out.append(char)
        i += 1
    return None


_SCRAMBLE = st.text(st.sampled_from(list('a\\\\\\,= "\t')), max_size=24)


@settings(max_examples=1000, deadline=None, database=None)
@given(text=_SCRAMBLE)
def test_the_scanner_unescapes_names_and_strings_as_the_reference_rule(text: str) -> None:
    for element, escapes, separators in ((line._MEASUREMENT, line._MEASUREMENT_ESCAPES, ", "),
                                         (line._KEY, line._KEY_ESCAPES, ",= ")):
        expected = _reference_element(text, separators, separators)
        if expected is None:
            with pytest.raises(line._Malformed):
                line._take(text, 0, element, escapes)
        else:
            assert line._take(text, 0, element, escapes) == expected
    quoted = '"' + text
    expected_string = _reference_string(quoted)
    if expected_string is None:
        with pytest.raises(line._Malformed):
            line._string(quoted, 0)
    else:
        assert line._string(quoted, 0) == expected_string
