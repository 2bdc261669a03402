"""Helpers shared by the JSON decoders: strict loading, time parsing, device resolution.

Everything here is pure. Failures of a whole payload raise DecodeError; failures of one value
(a time that cannot be read) raise BadTime, which the decoders turn into a per-reading problem.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta, tzinfo
from itertools import accumulate
from typing import Any, Final

from ingest.decoders.base import DecodeContext
from ingest.errors import DecodeError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "MISSING",
    "BadTime",
    "NoZone",
    "check_count",
    "describe",
    "epoch_auto",
    "epoch_to_utc",
    "get_path",
    "is_number",
    "load_json",
    "nesting_depth",
    "offset_from",
    "parse_time",
    "parse_time_field",
    "resolve_device",
    "shorten",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DIGITS = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{1,9})?")  # ASCII digits only: "\d" takes "١٢٣"
DEFAULT_MAX_DEPTH = 32

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
# +1 for an opening bracket, -1 for a closing one (indexed by byte value).
_DELTA = tuple(1 if c in b"[{" else -1 if c in b"]}" else 0 for c in range(256))


class BadTime(ValueError):
    """A time value that cannot be turned into an instant; ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class NoZone(BadTime):
    """A local time without an offset, and no zone to read it in."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys; a silently lost reading is worse than a rejected message.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DecodeError("malformed", f"duplicate key {shorten(key)} in a JSON object")
        obj[key] = value
    return obj


# One decoder for every payload: json.loads with options builds a new JSONDecoder per call.
# parse_int=float: integers become floats, and huge ones become inf instead of raising.
_DECODER: Final = json.JSONDecoder(parse_int=float, object_pairs_hook=_no_duplicate_keys)


def nesting_depth(payload: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, brackets inside strings not counted.

    Runs in C-level loops (regex, translate, accumulate), so that a 64 KiB payload of brackets is
    measured in about a millisecond, before any parser recurses into it.
    """
    if payload.count(b"[") + payload.count(b"{") <= 1:
        return payload.count(b"[") + payload.count(b"{")
    brackets = _JSON_STRING.sub(b"", payload).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DELTA.__getitem__, brackets)), default=0)


def load_json(payload: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse UTF-8 JSON; every JSON number becomes a float (NaN and Infinity literals included).

    JSON nested deeper than ``max_depth`` is refused (reason too_deep) before it is parsed: no real
    sensor payload nests that deep, and every later walk over the value stays shallow.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("malformed", f"not UTF-8: {exc.reason} at byte {exc.start}") from exc
    opens = payload.count(b"[") + payload.count(b"{")
    if opens > max_depth:
        depth = nesting_depth(payload)
        if depth > max_depth:
            raise DecodeError("too_deep", f"JSON nested {depth} levels deep (limit ingest.max_json_depth = "
                              f"{max_depth})")
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(
            "malformed", f"not JSON: {exc.msg}: line {exc.lineno} column {exc.colno} (char {exc.pos})"
        ) from exc
    except RecursionError as exc:
        raise DecodeError("malformed", "not JSON this service reads: nested too deeply") from exc


def check_count(count: int, ctx: DecodeContext, what: str = "readings") -> None:
    """Refuse a payload of more readings (or records, each at most one) than a message may hold,
    before any is validated."""
    if count > ctx.max_readings:
        raise DecodeError("too_many_readings", f"the message holds {count} {what} (limit "
                          f"ingest.max_readings_per_message = {ctx.max_readings}); none of them is stored")


def is_number(value: object) -> bool:
    """A JSON number as load_json returns it (a bool is not a number)."""
    return isinstance(value, float | int) and not isinstance(value, bool)


def describe(value: object) -> str:
    """The JSON type of a loaded value, for messages: 'a string', 'an array', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return f"a string ({shorten(value)})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def shorten(text: str, limit: int = 40) -> str:
    """repr() of a payload string, cut so that one bad field cannot flood a log line."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


_FROMTIMESTAMP_BELOW = 253402300800  # 10000-01-01: datetime's own limit


def epoch_to_utc(seconds: float) -> datetime:
    """Seconds since the Unix epoch -> aware UTC datetime (microsecond resolution, rounded half to even).

    ``datetime.fromtimestamp`` is about six times faster than adding a timedelta and gives the same
    instant (tests/unit/test_decoders_props.py holds them equal); it is used where it is defined, from
    1970 to datetime's limit. Anything else (before 1970, NaN, too large) takes the timedelta, which
    says what is wrong."""
    if 0 <= seconds < _FROMTIMESTAMP_BELOW:
        return datetime.fromtimestamp(seconds, UTC)
    try:
        return _EPOCH + timedelta(seconds=seconds)
    except (OverflowError, ValueError) as exc:
        raise BadTime(f"{seconds!r} is not a usable number of seconds since 1970") from exc


# Epoch magnitudes: a count below 1e11 is seconds (up to the year 5138), below 1e14 milliseconds,
# below 1e17 microseconds, else nanoseconds. Any of them for a time between 1973 and 5138 is read right.
_EPOCH_UNITS = ((1e11, 1), (1e14, 1000), (1e17, 1_000_000))
MISSING: Final = object()


def epoch_auto(count: float | int) -> datetime:
    """An epoch count in seconds, milliseconds, microseconds or nanoseconds, told apart by magnitude.

    A whole count is converted in integer arithmetic, so that nanoseconds keep their microseconds.
    """
    if isinstance(count, float) and not math.isfinite(count):
        raise BadTime(f"{count!r} is not a usable epoch time")
    per_second = next((d for limit, d in _EPOCH_UNITS if abs(count) < limit), 1_000_000_000)
    if isinstance(count, int) or count.is_integer():
        whole = int(count)
        try:
            return _EPOCH + timedelta(microseconds=whole * 1_000_000 // per_second)
        except OverflowError as exc:
            raise BadTime(f"{count!r} is not a usable epoch time") from exc
    return epoch_to_utc(count / per_second)


def parse_time_field(value: object, zone: tzinfo | None) -> datetime:
    """A time field's value: an epoch count (number, or a string of digits) in s/ms/us/ns by magnitude,
    or an RFC 3339 / ISO 8601 string (without an offset: read in ``zone``)."""
    if isinstance(value, bool) or value is None:
        raise BadTime(f"expected a time, got {describe(value)}")
    if isinstance(value, int | float):
        return epoch_auto(value)
    if isinstance(value, str):
        text = value.strip()
        if _DIGITS.fullmatch(text):
            return epoch_auto(float(text) if "." in text else int(text))
        return parse_time(value, zone)
    raise BadTime(f"expected a time, got {describe(value)}")


def get_path(data: object, path: str) -> object:
    """The value at a dotted path ("a.b.0.c": object keys, and list indexes as numbers), or MISSING.
    A key that itself holds the dots is found whole first."""
    if isinstance(data, dict) and path in data:
        return data[path]
    node = data
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def offset_from(base: datetime, seconds: float) -> datetime:
    """``base`` moved by ``seconds`` (for times relative to the receive time)."""
    try:
        return base.astimezone(UTC) + timedelta(seconds=seconds)
    except (OverflowError, ValueError) as exc:
        raise BadTime(f"{seconds!r} seconds from the receive time is not a usable time") from exc


def parse_time(value: str | float, zone: tzinfo | None) -> datetime:
    """An RFC 3339 / ISO 8601 string or epoch seconds -> aware UTC datetime.

    A string without an offset is read in ``zone``; with no zone it is refused, because guessing
    shifts every reading by hours. A date without a time of day is refused too.
    """
    if not isinstance(value, str):
        return epoch_to_utc(value)
    # RFC 3339 allows lower-case 't' and 'z'; fromisoformat does not.
    text = value.strip().upper()
    if "T" not in text and " " not in text:
        raise BadTime(f"{shorten(value)} is not a date and time (ISO 8601 / RFC 3339)")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadTime(f"{shorten(value)} is not a date and time (ISO 8601 / RFC 3339)") from exc
    if parsed.tzinfo is None:
        if zone is None:
            raise NoZone(
                f"{shorten(value)} has no UTC offset; set `timezone` on the source (or send the time with Z or +hh:mm)"
            )
        parsed = parsed.replace(tzinfo=zone)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise BadTime(f"{shorten(value)} is out of range") from exc


def resolve_device(named: str | None, ctx: DecodeContext, where: str = "payload") -> str:
    """The device of a message: the one it names, checked against the topic's, else the topic's."""
    if named is not None:
        if ctx.device is not None and named != ctx.device:
            raise DecodeError(
                "device_mismatch",
                f"{where} names device {shorten(named)} but the topic says {shorten(ctx.device)}",
            )
        return named
    if ctx.device is None:
        if ctx.fallback_device:
            return ctx.fallback_device
        raise DecodeError(
            "no_device",
            f"{where} names no device and the topic template has no {{device}} capture",
        )
    return ctx.device
