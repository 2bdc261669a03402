"""Pure validation of decoded readings: keep what is correct, reject the rest with a reason.

Checks here apply to every format: names, finiteness, and time within [earliest_time,
received_at + max_future]. (The metric catalog with units and valid ranges comes with its own issue.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from ingest.model import Reading, Rejection

__all__ = ["Limits", "validate"]

MAX_NAME = 200
_CONTROL = re.compile("[\x00-\x1f\x7f]")  # C0 controls and DEL
MAX_TEXT = 1000


@dataclass(frozen=True, slots=True)
class Limits:
    earliest: datetime
    max_future: timedelta


def _bad_name(name: str) -> str | None:
    if not name:
        return "is empty"
    if len(name) > MAX_NAME:
        return f"is {len(name)} characters long (limit {MAX_NAME})"
    if _CONTROL.search(name):
        return "contains control characters"
    return None


def validate(
    readings: Iterable[Reading], received_at: datetime, limits: Limits
) -> tuple[list[Reading], list[Rejection]]:
    kept: list[Reading] = []
    problems: list[Rejection] = []
    latest = received_at + limits.max_future
    for r in readings:
        why = _bad_name(r.device)
        if why:
            problems.append(Rejection("bad_device", f"device id {r.device[:64]!r} {why}", r.device[:MAX_NAME]))
            continue
        why = _bad_name(r.metric)
        if why:
            problems.append(Rejection("bad_metric", f"metric name {r.metric[:64]!r} {why}", r.device))
            continue
        v = r.value
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(Rejection("not_finite", f"{r.metric}: value {v} is not a finite number", r.device))
            continue
        if isinstance(v, str) and "\x00" in v:
            problems.append(Rejection("bad_text", f"{r.metric}: text holds a NUL character", r.device))
            continue
        if isinstance(v, str) and len(v) > MAX_TEXT:
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
