"""Decoder of the native format: this project's own JSON (models in ingest.wire)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ingest.decoders.base import DecodeContext, Decoded
from ingest.decoders.jsonutil import BadTime, check_count, describe, load_json, parse_time, resolve_device, shorten
from ingest.errors import DecodeError
from ingest.model import FLAG_RECEIVE_TIME, Reading, Rejection
from ingest.wire import NativeMessage, describe_errors

__all__ = ["decode"]


@dataclass(frozen=True, slots=True)
class _Slot:
    """One reading as written, before its value and time are checked."""

    path: str  # JSON path of the reading, for problem details
    value_path: str  # JSON path of its value
    metric: str
    value: float | bool | str | None
    text: str | None
    unit: str | None
    time: str | float | None
    time_path: str


_FAST_PATH = True  # off only in the test that holds the fast path equal to the general one
_MESSAGE_KEYS = frozenset({"device", "time", "readings"})
_VALUE_KEYS = frozenset({"value", "unit"})


def decode(payload: bytes, ctx: DecodeContext) -> Decoded:
    data = load_json(payload, ctx.max_depth)
    if _FAST_PATH and type(data) is dict:
        fast = _fast(data, ctx)
        if fast is not None:
            return fast
    if isinstance(data, list):
        if not data:
            raise DecodeError("empty", "the batch array holds no messages")
        messages = [(f"[{i}]", item) for i, item in enumerate(data)]
    elif isinstance(data, dict):
        messages = [("", data)]
    else:
        raise DecodeError("schema", f"expected a message object or an array of them, got {describe(data)}")
    check_count(sum(len(m["readings"]) if isinstance(m, dict) and isinstance(m.get("readings"), dict | list) else 0
                    for _, m in messages), ctx)

    received = ctx.received_at.astimezone(UTC)
    readings: list[Reading] = []
    problems: list[Rejection] = []
    for prefix, raw in messages:
        message = _validate(raw, prefix)
        device = resolve_device(message.device, ctx, f"message {prefix}" if prefix else "payload")
        message_time = _MessageTime(message.time, ctx)
        for slot in _slots(message, prefix):
            reading_or_problem = _reading(slot, device, message_time, ctx, received)
            if isinstance(reading_or_problem, Reading):
                readings.append(reading_or_problem)
            else:
                problems.append(reading_or_problem)
    return Decoded(readings=readings, problems=problems)


def _fast(raw: dict[str, Any], ctx: DecodeContext) -> Decoded | None:
    """The common message without the model: one object of the map form, every reading a number or a
    boolean, bare or as {"value", "unit"}, and a time that reads. None for anything else (the general
    path words its problems), so the two give the same result wherever this one answers
    (tests/unit/test_decoders_props.py holds them equal)."""
    body = raw.get("readings")
    if type(body) is not dict or not body or not _MESSAGE_KEYS.issuperset(raw):
        return None
    device = raw.get("device", _ABSENT)
    if device is not _ABSENT and (type(device) is not str or not device):
        return None
    when_raw = raw.get("time", _ABSENT)
    if when_raw is not _ABSENT and type(when_raw) is not str and type(when_raw) is not float \
            and type(when_raw) is not int:
        return None
    check_count(len(body), ctx)
    slots: list[tuple[str, float | bool, str | None]] = []
    for metric, v in body.items():
        kind = type(v)
        unit = None
        if kind is float or kind is int:
            value: float | bool = float(v)
        elif kind is bool:
            value = v
        elif kind is dict and _VALUE_KEYS.issuperset(v):
            x = v.get("value")
            kind = type(x)
            if kind is float or kind is int:
                value = float(x)
            elif kind is bool:
                value = x
            else:
                return None
            if "unit" in v:
                unit = v["unit"]
                if type(unit) is not str or not unit:
                    return None
        else:
            return None
        if not metric:
            return None
        slots.append((metric, value, unit))
    if when_raw is _ABSENT:
        when, flags = ctx.received_at.astimezone(UTC), FLAG_RECEIVE_TIME
    else:
        try:
            when = parse_time(when_raw if type(when_raw) is str else float(when_raw), ctx.timezone)
        except BadTime:
            return None
        flags = 0
    who = resolve_device(None if device is _ABSENT else device, ctx, "payload")
    return Decoded(readings=[Reading(who, metric, when, value, unit, flags) for metric, value, unit in slots],
                   problems=[])


_ABSENT: Any = object()


def _validate(raw: Any, prefix: str) -> NativeMessage:
    where = f"{prefix}: " if prefix else ""
    if not isinstance(raw, dict):
        raise DecodeError("schema", f"{where}expected a message object, got {describe(raw)}")
    body = raw.get("readings")
    if isinstance(body, dict | list) and not body:
        raise DecodeError("empty", f"{prefix}{'.' if prefix else ''}readings: no readings")
    try:
        return NativeMessage.model_validate(raw)
    except ValidationError as exc:
        raise DecodeError("schema", describe_errors(exc, prefix)) from exc


def _slots(message: NativeMessage, prefix: str) -> Iterator[_Slot]:
    base = f"{prefix}.readings" if prefix else "readings"
    message_time_path = f"{prefix}.time" if prefix else "time"
    if isinstance(message.readings, dict):
        for metric, obj in message.readings.items():
            path = f"{base}.{metric}"
            yield _Slot(
                path=path,
                value_path=path if obj.shorthand else f"{path}.value",
                metric=metric,
                value=obj.value,
                text=obj.text,
                unit=obj.unit,
                time=None,
                time_path=message_time_path,
            )
    else:
        for i, item in enumerate(message.readings):
            path = f"{base}[{i}]"
            yield _Slot(
                path=path,
                value_path=f"{path}.value",
                metric=item.metric,
                value=item.value,
                text=item.text,
                unit=item.unit,
                time=item.time,
                time_path=f"{path}.time" if item.time is not None else message_time_path,
            )


class _MessageTime:
    """The message's own time, parsed once for all its readings that have none of their own."""

    __slots__ = ("_ctx", "_result", "raw")

    def __init__(self, raw: str | float | None, ctx: DecodeContext) -> None:
        self.raw = raw
        self._ctx = ctx
        self._result: datetime | str | None = None  # the instant, or why there is none

    def parsed(self) -> datetime:
        """Raises BadTime, every time it is asked, when the message's time cannot be read."""
        if self._result is None:
            assert self.raw is not None
            try:
                self._result = parse_time(self.raw, self._ctx.timezone)
            except BadTime as exc:
                self._result = exc.detail
        if isinstance(self._result, str):
            raise BadTime(self._result)
        return self._result


def _reading(
    slot: _Slot,
    device: str,
    message_time: _MessageTime,
    ctx: DecodeContext,
    received: datetime,
) -> Reading | Rejection:
    value: float | bool | str
    if slot.text is not None:
        value = slot.text
    elif isinstance(slot.value, str):
        return Rejection(
            "wrong_type",
            f"{slot.value_path}: expected a number or boolean, got a string ({shorten(slot.value)}); "
            'text belongs in {"text": ...}',
            device,
        )
    elif slot.value is not None:
        value = slot.value
    else:  # the model already refuses this; kept so that the type is narrowed without assert
        raise DecodeError("schema", f"{slot.path}: needs exactly one of `value` and `text`")

    flags = 0
    try:
        if slot.time is not None:
            when = parse_time(slot.time, ctx.timezone)
        elif message_time.raw is not None:
            when = message_time.parsed()
        else:
            when, flags = received, FLAG_RECEIVE_TIME
    except BadTime as exc:
        return Rejection("bad_time", f"{slot.time_path}: {exc.detail} (reading {slot.path})", device)
    return Reading(device=device, metric=slot.metric, time=when, value=value, unit=slot.unit, flags=flags)
