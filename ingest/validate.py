"""Pure validation of decoded readings: keep what is correct, reject the rest with a reason.

Checks here apply to every format: names, units and text that PostgreSQL can store, finiteness,
and time within [earliest_time, received_at + max_future], by the source's time policy. Units and
ranges are the metric catalog's (ingest.catalog), checked after this.

Every string a reading carries ends up in a query (device uid, metric name, unit, text state), and
PostgreSQL text holds neither NUL nor a lone UTF-16 surrogate (which JSON's \\udXXX escapes can
produce): such a string is rejected here, so that it never reaches the database, where it would fail
the whole batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from ingest.model import FLAG_RECEIVE_TIME, Reading, Rejection

__all__ = ["MAX_NAME", "Limits", "escape", "unstorable", "validate"]

MAX_NAME = 200
MAX_UNIT = 32
MAX_TEXT = 1000
_CONTROL = re.compile("[\x00-\x1f\x7f]")  # C0 controls and DEL
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates: not storable, not encodable as UTF-8


@dataclass(frozen=True, slots=True)
class Limits:
    earliest: datetime
    max_future: timedelta
    max_metric_name: int = MAX_NAME  # ingest.max_metric_name_length


def unstorable(text: str) -> str | None:
    """Why PostgreSQL cannot store ``text`` (a NUL or a lone surrogate), or None."""
    if "\x00" in text:
        return "holds a NUL character"
    if not text.isascii() and _SURROGATE.search(text):
        return "holds a lone UTF-16 surrogate (not valid Unicode text)"
    return None


def escape(text: str) -> str:
    """``text`` made storable for a diagnostic column (rejection detail, topic, device as written):
    NUL becomes ``\\0`` and a lone surrogate its ``\\udXXX`` escape; anything else is kept."""
    if "\x00" in text:
        text = text.replace("\x00", "\\0")
    if not text.isascii() and _SURROGATE.search(text):
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


# Names seen to be storable (not empty, no control character, no lone surrogate), whatever their
# length, which is checked on every use against its own limit: a fleet repeats a few thousand device
# ids, metric names and units on every message, so each is searched by the regexes once. Bounded:
# cleared when full (a stream of ever-new names is only checked in full again).
_STORABLE: set[str] = set()
_STORABLE_MAX = 100_000


def _remember(name: str) -> None:
    if len(_STORABLE) >= _STORABLE_MAX:
        _STORABLE.clear()
    _STORABLE.add(name)


def _bad_name(name: str, limit: int = MAX_NAME) -> str | None:
    if name in _STORABLE:
        return f"is {len(name)} characters long (limit {limit})" if len(name) > limit else None
    if not name:
        return "is empty"
    if len(name) > limit:
        return f"is {len(name)} characters long (limit {limit})"
    if _CONTROL.search(name):
        return "contains control characters"
    if not name.isascii() and _SURROGATE.search(name):
        return "holds a lone UTF-16 surrogate (not valid Unicode text)"
    _remember(name)
    return None


def _quote(text: str) -> str:
    # repr() escapes surrogates and controls, so the detail itself is always storable.
    return repr(text[:64] + ("…" if len(text) > 64 else ""))


def _retimed(readings: list[Reading], received_at: datetime, earliest: datetime, latest: datetime,
             every: bool) -> list[Reading]:
    def due(r: Reading) -> bool:
        if r.flags & FLAG_RECEIVE_TIME and r.time == received_at:
            return False  # the decoder gave it the receive time already (no time in the payload)
        return every or not earliest <= r.time <= latest

    moved = [r.time for r in readings if due(r)]
    if not moved:
        return readings
    last = max(moved)
    out: list[Reading] = []
    for r in readings:
        if due(r):
            when = received_at - (last - r.time)
            r = Reading(r.device, r.metric, when if when >= earliest else received_at, r.value, r.unit,
                        r.flags | FLAG_RECEIVE_TIME)
        out.append(r)
    return out


def validate(
    readings: Iterable[Reading], received_at: datetime, limits: Limits, time_policy: str = "device"
) -> tuple[list[Reading], list[Rejection]]:
    """``time_policy`` (a source's): "device" rejects a time outside [earliest, received_at +
    max_future] as bad_time; "receive" re-times every reading to the receive time; "device_or_receive"
    only the readings whose time lies outside that window. Re-timed readings are flagged
    FLAG_RECEIVE_TIME and keep their spacing: the latest of them gets the receive time, an earlier one
    as much earlier as its payload says (a buffer of samples kept through a power loss stays a
    series, not one instant), unless that falls before earliest_time (then the receive time)."""
    kept: list[Reading] = []
    problems: list[Rejection] = []
    latest = received_at + limits.max_future
    if time_policy != "device":
        readings = _retimed(list(readings), received_at, limits.earliest, latest, time_policy == "receive")
    storable, max_metric = _STORABLE, limits.max_metric_name
    for r in readings:
        device, metric = r.device, r.metric
        # The common case first: names already seen storable, within their limits.
        if not (device in storable and len(device) <= MAX_NAME):
            why = _bad_name(device)
            if why:
                problems.append(Rejection("bad_device", f"device id {_quote(device)} {why}", device[:MAX_NAME]))
                continue
        why = None if metric in storable and len(metric) <= max_metric else _bad_name(metric, max_metric)
        if why:
            if len(r.metric) > limits.max_metric_name:
                why = (f"is {len(r.metric)} characters long (limit ingest.max_metric_name_length = "
                       f"{limits.max_metric_name})")
            problems.append(Rejection("bad_metric", f"metric name {_quote(r.metric)} {why}", r.device))
            continue
        if r.unit is not None and not (r.unit in storable and len(r.unit) <= MAX_UNIT):
            why = _bad_name(r.unit, MAX_UNIT)
            if why:
                problems.append(Rejection("bad_text", f"{r.metric}: unit {_quote(r.unit)} {why}", r.device))
                continue
        v = r.value
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(Rejection("not_finite", f"{r.metric}: value {v} is not a finite number", r.device))
            continue
        if isinstance(v, str):
            why = unstorable(v)
            if why:
                problems.append(Rejection("bad_text", f"{r.metric}: text {why}", r.device))
                continue
            if len(v) > MAX_TEXT:
                detail = f"{r.metric}: text of {len(v)} characters (limit {MAX_TEXT})"
                problems.append(Rejection("too_long", detail, r.device))
                continue
        if r.time < limits.earliest:
            problems.append(Rejection(
                "bad_time",
                f"{r.metric}: time {r.time.isoformat()} is before earliest_time {limits.earliest.isoformat()}"
                " (device clock not set?)",
                r.device,
            ))
            continue
        if r.time > latest:
            ahead = (r.time - received_at).total_seconds()
            problems.append(Rejection(
                "bad_time",
                f"{r.metric}: time {r.time.isoformat()} is {ahead:.0f}s ahead of the receive time"
                f" (limit ingest.max_future = {limits.max_future.total_seconds():.0f}s)",
                r.device,
            ))
            continue
        kept.append(r)
    return kept, problems
