"""Decoder of SenML packs in JSON (RFC 8428).

Base fields (bn, bt, bu, bv, bs, bver) apply to their own record and every later one until changed.
A record resolves to: name = bn + n, time = bt + t (below 2**28: seconds relative to the receive
time), value = bv + v, or vs / vb as they are, or bs + s for a sum-only record; unit = u or bu.

Device and metric (DESIGN.md "Decoding"): with a bn, the device is bn without its one trailing ':'
or '/' and the metric is n; else the device is the topic's {device} and the metric is the whole name;
else the device is the whole name and the metric is "value".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ingest.decoders.base import DecodeContext, Decoded
from ingest.decoders.jsonutil import (
    BadTime,
    check_count,
    describe,
    epoch_to_utc,
    is_number,
    load_json,
    offset_from,
    resolve_device,
    shorten,
)
from ingest.errors import DecodeError
from ingest.model import FLAG_RECEIVE_TIME, Reading, Rejection

__all__ = ["MAX_VERSION", "decode"]

MAX_VERSION = 10  # RFC 8428's version; RFC 9100 features above it are not read
RELATIVE_TIME_LIMIT = 2**28  # RFC 8428 §4.5.3: smaller resolved times are relative to "now"
METRIC_OF_BARE_NAME = "value"  # metric of a record whose name is all device (DESIGN.md)

_VALUE_FIELDS = ("v", "vs", "vb", "vd")
_RECORD_FIELDS = frozenset({"n", "u", "t", "ut", "s", *_VALUE_FIELDS})
_BASE_FIELDS = frozenset({"bn", "bt", "bu", "bv", "bs", "bver"})
_KNOWN_FIELDS = _RECORD_FIELDS | _BASE_FIELDS
_NO_UNIT: Any = object()
_FAST_PATH = True  # off only in the test that holds the fast path equal to the general one
_FAST_TIME_BELOW = 253402300800  # 10000-01-01, datetime's limit: the fast path's times


@dataclass(frozen=True, slots=True)
class _Base:
    """The base fields in force at one record."""

    device: str | None = None  # bn without its one trailing separator, checked against the topic
    time: float = 0.0
    unit: str | None = None
    value: float = 0.0
    sum: float = 0.0


def decode(payload: bytes, ctx: DecodeContext) -> Decoded:
    data = load_json(payload, ctx.max_depth)
    if not isinstance(data, list):
        raise DecodeError("schema", f"expected a SenML pack (a JSON array of records), got {describe(data)}")
    if not data:
        raise DecodeError("empty", "the SenML pack holds no records")
    check_count(len(data), ctx, "records")

    received = ctx.received_at.astimezone(UTC)
    base = _Base()
    readings: list[Reading] = []
    problems: list[Rejection] = []
    ignored = 0
    known, record_fields, base_fields = _KNOWN_FIELDS, _RECORD_FIELDS, _BASE_FIELDS
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DecodeError("schema", f"[{i}]: expected a record object, got {describe(record)}")
        # One pass over the keys: a must-understand field fails the pack; fields RFC 8428 tells a
        # receiver to skip when it does not know them are counted, not stored.
        for key in record:
            if key not in known:
                if key.endswith("_"):
                    _check_understood(record, f"[{i}]")
                ignored += 1
        has_base = not base_fields.isdisjoint(record)
        if has_base:
            path = f"[{i}]"
            _check_understood(record, path)
            base = _apply_base(base, record, path, ctx)
        if "s" in record and any(f in record for f in _VALUE_FIELDS):
            ignored += 1  # a sum beside a value: the value is the reading
        if "vd" in record and not any(f in record for f in ("v", "vs", "vb")):
            ignored += 1  # opaque data is not a reading
            continue
        if has_base and record_fields.isdisjoint(record):
            continue  # a record of base fields only (a pack header) sets bases and carries no value
        outcome = _resolve(record, i, base, ctx, received)
        if isinstance(outcome, Reading):
            readings.append(outcome)
        else:
            problems.append(outcome)
    return Decoded(readings=readings, problems=problems, ignored=ignored)


def _check_understood(record: dict[str, Any], path: str) -> None:
    for key in record:
        if key.endswith("_"):
            raise DecodeError(
                "unsupported", f"{path}.{key}: a must-understand field (ends in '_') this service does not know"
            )
    if "bver" in record:
        version = record["bver"]
        if not is_number(version) or not float(version).is_integer() or version < 1:
            raise DecodeError("schema", f"{path}.bver: expected a positive integer, got {describe(version)}")
        if version > MAX_VERSION:
            raise DecodeError("unsupported", f"{path}.bver: SenML version {int(version)} is newer than {MAX_VERSION}")


def _apply_base(base: _Base, record: dict[str, Any], path: str, ctx: DecodeContext) -> _Base:
    # A wrong base field would spoil every later record, so it fails the whole pack.
    changes: dict[str, Any] = {}
    for key, attr in (("bt", "time"), ("bv", "value"), ("bs", "sum")):
        if key in record:
            if not is_number(record[key]):
                raise DecodeError("schema", f"{path}.{key}: expected a number, got {describe(record[key])}")
            changes[attr] = float(record[key])
    if "bu" in record:
        unit = record["bu"]
        if not isinstance(unit, str):
            raise DecodeError("schema", f"{path}.bu: expected a string, got {describe(unit)}")
        changes["unit"] = unit or None
    if "bn" in record:
        name = record["bn"]
        if not isinstance(name, str):
            raise DecodeError("schema", f"{path}.bn: expected a string, got {describe(name)}")
        device = name[:-1] if name.endswith((":", "/")) else name
        if name and not device:
            raise DecodeError("schema", f"{path}.bn: {shorten(name)} names no device")
        changes["device"] = resolve_device(device, ctx, f"{path}.bn") if device else None
    return replace(base, **changes) if changes else base


def _resolve(
    record: dict[str, Any], index: int, base: _Base, ctx: DecodeContext, received: datetime
) -> Reading | Rejection:
    name = record.get("n", "")
    v = record.get("v")
    # The common record first: a name, a number in v and no other value field, a unit or none, an
    # offset or none, an absolute resolved time. Anything else takes the general path below, which
    # gives the same result for this case (tests/unit/test_decoders_props.py holds them equal).
    if _FAST_PATH and (type(v) is float or type(v) is int) and type(name) is str and (name or base.device is not None) \
            and "vs" not in record and "vb" not in record and "vd" not in record:
        u = record.get("u", _NO_UNIT)
        offset = record.get("t", 0.0)
        if (u is _NO_UNIT or type(u) is str) and (type(offset) is float or type(offset) is int):
            resolved = base.time + float(offset)
            if RELATIVE_TIME_LIMIT <= resolved < _FAST_TIME_BELOW:
                if base.device is not None:
                    device, metric = base.device, name or METRIC_OF_BARE_NAME
                elif ctx.device is not None:
                    device, metric = ctx.device, name
                else:
                    device, metric = name, METRIC_OF_BARE_NAME
                return Reading(device, metric, datetime.fromtimestamp(resolved, UTC), base.value + float(v),
                               base.unit if u is _NO_UNIT else (u or None), 0)
    path = f"[{index}]"
    if not isinstance(name, str):
        return Rejection("schema", f"{path}.n: expected a string, got {describe(name)}", base.device or ctx.device)
    if base.device is not None:
        device, metric = base.device, name or METRIC_OF_BARE_NAME
    elif not name:
        return Rejection("schema", f"{path}: the record has no name (neither n nor an earlier bn)", ctx.device)
    elif ctx.device is not None:
        device, metric = ctx.device, name
    else:
        device, metric = name, METRIC_OF_BARE_NAME

    present = [f for f in _VALUE_FIELDS if f in record]
    if len(present) > 1:
        return Rejection("schema", f"{path}: more than one value field ({', '.join(present)})", device)
    if not present and "s" not in record:
        return Rejection("schema", f"{path}: the record has no value (v, vs, vb, vd or s)", device)
    field = present[0] if present else "s"
    value = _value(record[field], field, base)
    if isinstance(value, tuple):
        reason, expected = value
        return Rejection(reason, f"{path}.{field}: expected {expected}, got {describe(record[field])}", device)

    unit: str | None = base.unit
    if "u" in record:
        if not isinstance(record["u"], str):
            return Rejection("schema", f"{path}.u: expected a string, got {describe(record['u'])}", device)
        unit = record["u"] or None

    offset = record.get("t", 0.0)
    if not is_number(offset):
        return Rejection("bad_time", f"{path}.t: expected a number of seconds, got {describe(offset)}", device)
    resolved = base.time + float(offset)
    try:
        if resolved < RELATIVE_TIME_LIMIT:
            # Relative to "now", i.e. anchored on the receive time: flagged like a receive time.
            when, flags = offset_from(received, resolved), FLAG_RECEIVE_TIME
        else:
            when, flags = epoch_to_utc(resolved), 0
    except BadTime as exc:
        return Rejection("bad_time", f"{path}: time {exc.detail}", device)
    return Reading(device=device, metric=metric, time=when, value=value, unit=unit, flags=flags)


def _value(raw: object, field: str, base: _Base) -> float | bool | str | tuple[str, str]:
    """The resolved value, or (reason, what was expected) when the field holds the wrong type."""
    if field in ("v", "s"):
        if is_number(raw):
            return (base.value if field == "v" else base.sum) + float(raw)  # type: ignore[arg-type]
        hint = "a number (booleans go in vb, text in vs)" if field == "v" else "a number"
        return ("wrong_type" if isinstance(raw, str | bool) else "schema", hint)
    if field == "vs":
        return raw if isinstance(raw, str) else ("wrong_type", "a string")
    # vb; vd never gets here (not a reading)
    return raw if isinstance(raw, bool) else ("wrong_type", "a boolean")
