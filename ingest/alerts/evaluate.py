"""Pure evaluation of one series (rule, device, metric) on event time.

ok -> pending (the condition holds, ``for`` not yet elapsed) -> firing -> ok (resolved). A reading
no newer than the series' last evaluated time does not rewrite history: it is skipped (counted by
the caller). With hysteresis, a firing episode ends only when the value is back past ``clear``; a
pending one ends as soon as the condition stops holding (a short spike does not fire).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from ingest.alerts.model import Rule

__all__ = ["Event", "State", "evaluate"]


@dataclass(frozen=True, slots=True)
class State:
    status: Literal["ok", "pending", "firing"] = "ok"
    episode_start: datetime | None = None
    last_time: datetime | None = None
    last_value: float | None = None


@dataclass(frozen=True, slots=True)
class Event:
    status: Literal["firing", "resolved"]
    event_time: datetime
    starts_at: datetime
    value: float
    threshold: float


def evaluate(rule: Rule, state: State, points: Iterable[tuple[datetime, float]]) -> tuple[State, list[Event], int]:
    """(the new state, the events in order, how many points were older than the state and skipped)."""
    status, start, last_t, last_v = state.status, state.episode_start, state.last_time, state.last_value
    hold = timedelta(seconds=rule.for_seconds)
    events: list[Event] = []
    late = 0
    for t, v in sorted(points, key=lambda p: p[0]):
        if last_t is not None and t <= last_t:
            late += 1
            continue
        if status == "ok":
            if rule.breached(v):
                start = t
                if hold:
                    status = "pending"
                else:
                    status = "firing"
                    events.append(Event("firing", t, t, v, rule.threshold_of(v)))
        elif status == "pending":
            assert start is not None
            if not rule.breached(v):
                status, start = "ok", None
            elif t - start >= hold:
                status = "firing"
                events.append(Event("firing", t, start, v, rule.threshold_of(v)))
        elif rule.cleared(v):  # firing
            assert start is not None
            events.append(Event("resolved", t, start, v, rule.threshold_of(v)))
            status, start = "ok", None
        last_t, last_v = t, v
    return State(status, start, last_t, last_v), events, late
