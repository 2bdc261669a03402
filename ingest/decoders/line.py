"""Decoder of InfluxDB line protocol (the ``line`` format).

The syntax is the InfluxDB v2 "Line protocol" reference's
(https://docs.influxdata.com/influxdb/v2/reference/syntax/line-protocol/), with the grammar of
influxdata/line-protocol (line-protocol.ebnf) where the prose is silent:

- One point per line: ``<measurement>[,<tag key>=<tag value>...] <field key>=<value>[,...] [<timestamp>]``,
  sections separated by unescaped spaces. Lines end at ``\\n`` (a ``\\r`` before it is dropped); blank lines
  and lines whose first non-space character is ``#`` (comments) are skipped. A newline ends a line even
  inside a quoted string: the reference does not support newlines in field values.
- Escapes (§ Special characters): a backslash escapes comma and space in a measurement; comma, equals sign
  and space in tag keys, tag values and field keys; double quote and backslash in string field values.
  Before any other character a backslash is a backslash (``field_k\\ey`` is the key ``field_k\\ey``).
- Field values: floats (``1``, ``1.``, ``-1.234456e+78``; NaN and infinities are not floats here),
  integers (``1i``, int64), unsigned integers (``1u``, uint64), booleans (t, T, true, True, TRUE and the
  same for false), double-quoted strings. Names beginning with ``_`` are reserved by InfluxDB for its own
  columns; this service has no such columns and accepts them.

How points become readings (this project's rules):

- metric = ``<measurement>.<field key>``. Numbers become floats (an integer beyond 2**53 loses precision,
  as every reading does in the double-precision column); booleans stay booleans; a string is whatever the
  source's mapping makes of it (a value_map entry, a state's text, a decimal number), else it is not a
  reading and is counted as ignored.
- device = the tag named by options.device_tag, else the first of the tags ``device``, ``host``, ``id``;
  a line with none of them belongs to the topic's {device}, else to its measurement. A tag that names
  another device than the topic's fails the whole message (device_mismatch). No other tag is stored.
- time = the timestamp in options.precision (ns by default), rounded down to the microsecond (so two
  timestamps within one microsecond are one time); a line without one gets the receive time
  (FLAG_RECEIVE_TIME).
- A line is the unit of rejection: one that cannot be read, or holds a value out of range, is one problem
  and the other lines are kept.
- Two values for one (device, metric, time): from lines with the same tags, the later one wins and the
  earlier is counted as ignored (the reference's "Duplicate points"; InfluxDB also gives every line of a
  request without a timestamp the same time). From lines whose tags differ, which InfluxDB would keep as two
  series, the later values are a problem of their line (its other values are kept): only the device tag is
  stored, so one series would overwrite the other.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from ingest.decoders.base import DecodeContext, Decoded
from ingest.decoders.jsonutil import check_count, resolve_device, shorten
from ingest.errors import DecodeError
from ingest.model import FLAG_RECEIVE_TIME, Reading, Rejection

__all__ = ["DEVICE_TAGS", "Options", "decode"]

DEVICE_TAGS: Final = ("device", "host", "id")  # tried in this order when options.device_tag is not set

_NS_PER_UNIT: Final = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
# The reference's timestamp range, in nanoseconds whatever the precision it is written in.
_MIN_TIME_NS: Final = -9223372036854775806
_MAX_TIME_NS: Final = 9223372036854775806
_INT_RANGE: Final = {"i": (-(2**63), 2**63 - 1, "a 64-bit integer"), "u": (0, 2**64 - 1, "a 64-bit unsigned integer")}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_BOOLEANS: Final = {
    "t": True, "T": True, "true": True, "True": True, "TRUE": True,
    "f": False, "F": False, "false": False, "False": False, "FALSE": False,
}  # fmt: skip
_NOT_FINITE_WORDS: Final = frozenset({"nan", "inf", "infinity"})

# [0-9], not \d: \d also matches other scripts' digits, which line protocol does not.
_INTEGER = re.compile(r"-?[0-9]+")

# The fast path: a line without backslashes, quotes or control characters, read by one regex (possessive
# quantifiers, so that a line that does not match fails in linear time). Anything it does not match goes
# to the scanner, which reads the rest and says what is wrong and where.
_PLAIN = r'[^ ,=\\"\x00-\x1f\x7f]++'
_FAST_LINE = re.compile(
    r' *+([^ ,\\"#\x00-\x1f\x7f][^ ,\\"\x00-\x1f\x7f]*+)'  # measurement ('=' is allowed in it)
    rf"((?:,{_PLAIN}={_PLAIN})*+)"  # tags
    rf" ++({_PLAIN}={_PLAIN}(?:,{_PLAIN}={_PLAIN})*+)"  # fields
    r"(?: ++(-?[0-9]++))? *+"  # timestamp
)
# The scanner's elements, each read by one regex: runs of plain characters, a backslash and the character
# after it (an escape, or a backslash that is itself before anything but an escape character), or a
# backslash alone (before another backslash, which starts anew). An element ends at an unescaped
# separator, a control character (an error) or the line's end.
_MEASUREMENT = re.compile(r"(?:[^\\, \x00-\x1f\x7f]++|\\[^\\\x00-\x1f\x7f]|\\)*+")
_KEY = re.compile(r"(?:[^\\,= \x00-\x1f\x7f]++|\\[^\\\x00-\x1f\x7f]|\\)*+")  # tag keys and values, field keys
_STRING = re.compile(r'(?:[^"\\]++|\\.)*+', re.DOTALL)
_MEASUREMENT_ESCAPES = ("\\,", "\\ ")
_KEY_ESCAPES = ("\\,", "\\=", "\\ ")
_VALUE_STOP = re.compile(r"[, \x00-\x1f\x7f]")
_COMMENT_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a comment may hold a tab, no other control


class Options(BaseModel):
    """The format's options (`options = {...}` of a source).

    precision:  the unit of the timestamps, as InfluxDB's write API takes it.
    device_tag: the tag that names the device, instead of device / host / id. A line without that tag is
                a problem (no_device), unless the topic names the device.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # "no" is not false

    precision: Literal["ns", "us", "ms", "s"] = Field(
        "ns", description="unit of the timestamps (as InfluxDB's write API takes it): ns, us, ms or s"
    )
    device_tag: str | None = Field(
        None,
        min_length=1,
        description="the tag that names the device, instead of device / host / id; a line without it is a "
        "problem (no_device) unless the topic names the device",
    )


class _Point(NamedTuple):
    """One line as written, before its values are converted. A tuple: built once per line on the hot path."""

    measurement: str
    tags: dict[str, str] | None
    fields: list[tuple[str, str, bool]]  # (key, value text, quoted); a quoted value already unescaped
    time: str | None
    columns: list[int] | None  # 0-based columns of each field value, then of the time; None from the fast path


class _Malformed(Exception):
    """A line that is not line protocol; ``column`` is 0-based."""

    def __init__(self, column: int, message: str) -> None:
        self.column = column
        self.message = message
        super().__init__(message)


def decode(payload: bytes, ctx: DecodeContext) -> Decoded:
    """The readings of a line protocol payload; a line that cannot be read is a problem, the others are kept."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = payload.count(b"\n", 0, exc.start) + 1
        raise DecodeError("malformed", f"not UTF-8: {exc.reason} at byte {exc.start} (line {where})") from exc
    precision = ctx.options.get("precision", "ns")
    ns_per_unit = _NS_PER_UNIT.get(precision) if isinstance(precision, str) else None
    device_tag = ctx.options.get("device_tag")
    if ns_per_unit is None or not (device_tag is None or isinstance(device_tag, str)):
        # Options are validated at start-up; a context built without them gets a clear refusal.
        raise DecodeError("unsupported", f"line options not understood: {dict(ctx.options)!r}")

    # Lines in payload order, each a point's (number, text) or the problem of a bad comment.
    lines: list[tuple[int, str] | Rejection] = []
    count = 0
    for number, line in enumerate(text.split("\n"), 1):
        if line.endswith("\r"):
            line = line[:-1]
        start = line.lstrip(" ")
        if not start:
            continue
        if start[0] == "#":
            bad = _COMMENT_CONTROL.search(line)
            if bad is not None:
                message = f"control character {bad.group()!r} in a comment"
                lines.append(_malformed(number, bad.start(), message, ctx.device))
            continue
        lines.append((number, line))
        count += 1
    if not lines:
        raise DecodeError("empty", "the payload holds no line protocol points (only blank lines or comments)")
    if count > ctx.max_lines:
        raise DecodeError("too_many_lines", f"the message holds {count} lines (limit "
                          f"ingest.max_lines_per_message = {ctx.max_lines}); none of them is stored")
    check_count(count, ctx, "lines")

    parsed: list[tuple[int, str, _Point] | Rejection] = []
    fields = 0
    for entry in lines:
        if isinstance(entry, Rejection):
            parsed.append(entry)
            continue
        number, line = entry
        try:
            point = _fast(line) or _scan(line)
        except _Malformed as exc:
            parsed.append(_malformed(number, exc.column, exc.message, ctx.device))
            continue
        fields += len(point.fields)
        parsed.append((number, line, point))
    check_count(fields, ctx, "fields")

    return _readings(parsed, ctx, ns_per_unit, device_tag)


# (device, metric, microseconds since 1970 or None for the receive time): what one message says once.
_SeriesTime = tuple[str, str, int | None]


def _readings(
    lines: list[tuple[int, str, _Point] | Rejection], ctx: DecodeContext, ns_per_unit: int, device_tag: str | None
) -> Decoded:
    """The readings of the parsed lines, and the problems of those that give none.

    One function with local state rather than an object with methods: it runs once per line of every
    message, and attribute look-ups and calls are what Python's time goes to here.
    """
    received = ctx.received_at.astimezone(UTC)
    topic_device = ctx.device
    mapping = ctx.mapping
    readings: list[Reading] = []
    problems: list[Rejection] = []
    ignored = 0
    seen: dict[_SeriesTime, tuple[int, dict[str, str] | None, int]] = {}  # -> (index in readings, tags, line)
    times: dict[str, tuple[datetime, int]] = {}  # a message's lines often share their timestamp

    for entry in lines:
        if isinstance(entry, Rejection):
            problems.append(entry)
            continue
        number, line, (measurement, tags, fields, stamp, columns) = entry
        # The problem that keeps the whole line out: (reason, slot, message, device), where slot indexes
        # the line's columns (its field values', then its time's) when the problem has a place.
        problem: tuple[str, int | None, str, str | None] | None = None

        named, tag = _named_device(tags, device_tag)
        if named is not None:
            if topic_device is not None and named != topic_device:
                resolve_device(named, ctx, f"line {number}: tag {shorten(tag)}")  # raises device_mismatch
            device = named
        elif device_tag is not None and topic_device is None:
            problem = ("no_device", None, f"no tag {shorten(device_tag)} (options.device_tag) names the device", None)
            device = measurement
        else:
            device = topic_device if topic_device is not None else measurement

        micros: int | None = None
        when, flags = received, FLAG_RECEIVE_TIME
        if stamp is not None and problem is None:
            timed = times.get(stamp)
            if timed is None:
                outcome = _instant(stamp, ns_per_unit)
                if isinstance(outcome, str):
                    problem = ("bad_time", len(fields), outcome, device)
                else:
                    timed = times[stamp] = outcome
            if timed is not None:
                (when, micros), flags = timed, 0

        values: list[tuple[str, float | bool | str]] = []
        strings_ignored = 0
        for k, (key, raw, quoted) in enumerate(fields):
            if problem is not None:
                break
            metric = f"{measurement}.{key}"
            value = mapping.text(metric, raw) if quoted else _value(raw)
            if value is None and mapping.expects_number(metric):
                problem = ("wrong_type", k, mapping.wrong_type(metric, raw, device).detail, device)
            elif value is None:
                strings_ignored += 1  # a string the mapping makes no reading of
            elif isinstance(value, tuple):
                reason, message = value
                problem = (reason, k, f"field {shorten(key)}: {message}", device)
            else:
                values.append((metric, value))

        if problem is None:
            ignored += strings_ignored
            collided: list[str] = []
            first_line = 0
            for metric, value in values:
                series = (device, metric, micros)
                earlier = seen.get(series)
                if earlier is None:
                    seen[series] = (len(readings), tags, number)
                    readings.append(Reading(device, metric, when, value, None, flags))
                elif earlier[1] == tags:
                    # The same series again (the reference's "Duplicate points"): the later value wins.
                    readings[earlier[0]] = Reading(device, metric, when, value, None, flags)
                    ignored += 1
                else:
                    collided.append(metric)
                    first_line = first_line or earlier[2]
            if collided:
                names = ", ".join(shorten(m) for m in collided[:5]) + (", …" if len(collided) > 5 else "")
                problem = (
                    "schema",
                    None,
                    f"{names}: device {shorten(device)} has a value at this time from line {first_line} already, "
                    "whose tags differ; only the device tag is stored, so one series would overwrite the other "
                    "(name the distinguishing tag in options.device_tag)",
                    device,
                )

        if problem is not None:
            reason, slot, message, where_device = problem
            where = f"line {number}"
            if slot is not None:
                if columns is None:
                    columns = _columns(line)
                if slot < len(columns):
                    where += f", column {columns[slot] + 1}"
            problems.append(Rejection(reason, f"{where}: {message}", where_device))
    return Decoded(readings=readings, problems=problems, ignored=ignored)


def _named_device(tags: dict[str, str] | None, device_tag: str | None) -> tuple[str | None, str]:
    """The device a line's tags name, and the tag that names it."""
    if tags is None:
        return None, ""
    if device_tag is not None:
        return tags.get(device_tag), device_tag
    for tag in DEVICE_TAGS:
        named = tags.get(tag)
        if named is not None:
            return named, tag
    return None, ""


def _columns(line: str) -> list[int]:
    """The columns of a line the fast path read (it keeps none): read again, for a problem's detail."""
    try:
        columns = _scan(line).columns
    except _Malformed:  # not expected: the fast path reads only lines the scanner reads too
        return []
    return columns if columns is not None else []


def _malformed(number: int, column: int, message: str, device: str | None) -> Rejection:
    return Rejection("malformed", f"line {number}, column {column + 1}: {message}", device)


def _fast(line: str) -> _Point | None:
    """A plain line (no escapes, quotes or control characters), or None for the scanner to read."""
    match = _FAST_LINE.fullmatch(line)
    if match is None:
        return None
    measurement, tag_text, field_text, stamp = match.groups()
    tags: dict[str, str] | None = None
    if tag_text:
        tags = {}
        for pair in tag_text[1:].split(","):
            key, _, value = pair.partition("=")
            if key in tags:
                return None  # a repeated tag key: the scanner says which
            tags[key] = value
    fields: list[tuple[str, str, bool]] = []
    for pair in field_text.split(","):
        key, _, value = pair.partition("=")
        fields.append((key, value, False))
    return _Point(measurement, tags, fields, stamp, None)


def _scan(line: str) -> _Point:
    """Any line, escapes and quoted strings included; raises _Malformed saying where it goes wrong."""
    end = len(line)
    i = _skip_spaces(line, 0)
    measurement, i = _take(line, i, _MEASUREMENT, _MEASUREMENT_ESCAPES)
    if not measurement:
        raise _Malformed(i, "no measurement name")
    tags: dict[str, str] | None = None
    while i < end and line[i] == ",":
        key_at = i + 1
        key, i = _take(line, key_at, _KEY, _KEY_ESCAPES)
        if not key:
            raise _Malformed(key_at, "expected a tag key after ','")
        if i == end or line[i] != "=":
            raise _Malformed(i, f"expected '=' after the tag key {shorten(key)}")
        value, i = _take(line, i + 1, _KEY, _KEY_ESCAPES)
        if not value:
            raise _Malformed(i, f"the tag {shorten(key)} has no value")
        if i < end and line[i] == "=":
            raise _Malformed(i, f"an unescaped '=' in the value of the tag {shorten(key)}")
        if tags is None:
            tags = {}
        elif key in tags:
            raise _Malformed(key_at, f"the tag key {shorten(key)} is repeated")
        tags[key] = value
    i = _skip_spaces(line, i)
    if i == end:
        raise _Malformed(i, "no field set (a point needs at least one field)")

    fields: list[tuple[str, str, bool]] = []
    columns: list[int] = []
    while True:
        key, i = _take(line, i, _KEY, _KEY_ESCAPES)
        if not key:
            raise _Malformed(i, "expected a field key")
        if i == end or line[i] != "=":
            raise _Malformed(i, f"expected '=' after the field key {shorten(key)}")
        i += 1
        columns.append(i)
        if i < end and line[i] == '"':
            text, i = _string(line, i)
            fields.append((key, text, True))
        else:
            stop = _VALUE_STOP.search(line, i)
            value_end = stop.start() if stop is not None else end
            if value_end < end and line[value_end] not in ", ":
                raise _Malformed(value_end, f"control character {line[value_end]!r}")
            if value_end == i:
                raise _Malformed(i, f"the field {shorten(key)} has no value")
            fields.append((key, line[i:value_end], False))
            i = value_end
        if i < end and line[i] == ",":
            i += 1
            continue
        if i < end and line[i] != " ":
            raise _Malformed(i, f"unexpected {line[i]!r} after the value of the field {shorten(key)}")
        break

    stamp: str | None = None
    i = _skip_spaces(line, i)
    columns.append(i)
    if i < end:
        stamp_end = line.find(" ", i)
        stamp_end = end if stamp_end < 0 else stamp_end
        stamp = line[i:stamp_end]
        after = _skip_spaces(line, stamp_end)
        if after < end:
            raise _Malformed(after, "unexpected text after the timestamp")
    return _Point(measurement, tags, fields, stamp, columns)


def _skip_spaces(line: str, i: int) -> int:
    end = len(line)
    while i < end and line[i] == " ":
        i += 1
    return i


def _take(line: str, i: int, element: re.Pattern[str], escapes: tuple[str, ...]) -> tuple[str, int]:
    """The element starting at ``i``, unescaped, and where it ends (at a separator or the line's end)."""
    found = element.match(line, i)
    j = found.end() if found is not None else i
    if j < len(line) and (line[j] < " " or line[j] == "\x7f"):
        raise _Malformed(j, f"control character {line[j]!r}")
    text = line[i:j]
    if "\\" in text:
        # A backslash is never the escaped character in a name, so every backslash-and-escape-character
        # pair is an escape, whatever precedes it: plain replacing reads them exactly.
        for escape in escapes:
            text = text.replace(escape, escape[1])
    return text, j


def _string(line: str, opening: int) -> tuple[str, int]:
    """The double-quoted string at ``opening``, unescaped, and the index after its closing quote."""
    found = _STRING.match(line, opening + 1)
    j = found.end() if found is not None else opening + 1
    if j == len(line) or line[j] != '"':
        raise _Malformed(opening, "the string has no closing double quote (a string cannot span lines)")
    text = line[opening + 1 : j]
    if "\\" in text:
        # Backslashes pair from the left (\\ is one backslash); in what is left, \" is a quote.
        text = "\\".join(part.replace('\\"', '"') for part in text.split("\\\\"))
    return text, j + 1


def _value(token: str) -> float | bool | tuple[str, str]:
    """An unquoted field value, or (reason, why) when it is not one."""
    boolean = _BOOLEANS.get(token)
    if boolean is not None:
        return boolean
    suffix = token[-1]
    if suffix in ("i", "u"):
        body = token[:-1]
        low, high, kind = _INT_RANGE[suffix]
        if _INTEGER.fullmatch(body) is None or (suffix == "u" and body[0] == "-"):
            return ("malformed", f"{shorten(token)} is not {kind}")
        whole = _whole(body)
        if whole is None or not low <= whole <= high:
            return ("schema", f"{shorten(token)} is out of the range of {kind} ({low} to {high})")
        return float(whole)
    # float() reads every float of the grammar, [-](digits[.[digits]] | .digits)[(e|E)[+|-]digits], and more:
    # a leading '+', '_' between digits, other scripts' digits and the words nan, inf and infinity (a token
    # holds no whitespace). Refusing those leaves the grammar, read in C and not by a regex.
    try:
        number = float(token)
    except ValueError:
        number = None
    if number is not None and token.isascii() and "_" not in token and token[0] != "+":
        if math.isfinite(number):
            return number
        if token[-1].isdigit():  # 1e400: a float of the grammar, beyond what 64 bits hold
            return ("not_finite", f"{shorten(token)} is beyond the range of a 64-bit float")
    if token.lstrip("+-").lower() in _NOT_FINITE_WORDS:
        return ("schema", f"{shorten(token)}: NaN and infinities are not line protocol floats")
    return ("malformed", f"{shorten(token)} is not a number, a boolean or a double-quoted string")


def _whole(digits: str) -> int | None:
    """A decimal integer of the grammar ([-]digits), or None past 20 significant digits: beyond every
    64-bit range, and int() refuses strings of more than 4300 digits, leading zeros included."""
    if len(digits) <= 20:
        return int(digits)
    significant = digits.lstrip("-").lstrip("0") or "0"
    if len(significant) > 20:
        return None
    return -int(significant) if digits[0] == "-" else int(significant)


def _instant(stamp: str, ns_per_unit: int) -> tuple[datetime, int] | str:
    """A timestamp -> (aware UTC datetime, microseconds since 1970), or why it is not one."""
    if _INTEGER.fullmatch(stamp) is None:
        return f"timestamp {shorten(stamp)} is not an integer (a Unix time in options.precision)"
    whole = _whole(stamp)
    nanos = whole * ns_per_unit if whole is not None else None
    if nanos is None or not _MIN_TIME_NS <= nanos <= _MAX_TIME_NS:
        return (
            f"timestamp {shorten(stamp)} is out of line protocol's range (1677-09-21 to 2262-04-11, "
            f"{_MIN_TIME_NS} to {_MAX_TIME_NS} ns)"
        )
    micros = nanos // 1000  # rounds down: the microsecond the instant falls in
    return _EPOCH + timedelta(microseconds=micros), micros
