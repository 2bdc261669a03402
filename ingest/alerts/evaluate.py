"""Pure evaluation of one series (rule, device, metric) on event time.

The state machine. ok -> pending (the condition holds, ``for`` not yet elapsed) -> firing -> ok
(resolved). With hysteresis, a firing episode ends only when the judged value is back past
``clear``; a pending one ends as soon as the condition stops holding (a short spike does not fire).

What is judged (``Rule.signal``), each an observation (time, value) fed to the machine in order:

- value: each reading, at its time.
- rate: at each reading t, the change per minute since the reference, the oldest reading in
  [t - over, t): (v - v_ref) / minutes(t - t_ref). Judged only when the reference is at least
  over / 2 older than t (two readings a second apart say nothing of a ten-minute rise); a reading
  without one is not judged (``Judged.uncovered`` counts it: readings sparser than over / 2 never
  give a rate).
- window, align = "rolling": at each reading t, the aggregate of the readings in (t - over, t].
- window, align = "clock": the windows [k * over, (k + 1) * over) of the UTC epoch; a window is judged
  once, at its end (the observation's time), when the watermark has passed its end; an empty
  window is never judged.
- A window (either alignment) is not judged when ``coverage`` > 0 and it holds fewer than coverage x
  over / interval readings, ``interval`` being the device's expected interval; with coverage > 0 and
  no interval known, no window is judged (``Judged.uncovered`` counts them, the caller warns).
- no_data: the silence since the last reading. ``judge(..., silent=True)`` (the no-data job, one
  worker at a time, after its grace, on series from which nothing has arrived for ``threshold``
  seconds either, so that a device whose clock runs behind is not silent while it reports) fires
  when the watermark is more than ``threshold`` seconds past the last reading: event time last
  reading + threshold (so every worker that could judge it gives the same time), value the seconds
  of silence at the watermark; ``Event.current`` is set, since the series is silent now, whatever
  the age of that event time. The first reading after it resolves it, at its time (never before the
  episode's start: a reading from inside the gap that came later than the lateness ends it at its
  start), value the length of the gap, ``current`` too: a receiver is never left with a silence
  that does not end. A gap that a reading fills before the job judges it (a backlog redelivered
  after an outage) never fires.

Watermark and lateness. ``to``, the watermark, is the service's clock minus alerts.lateness: rows
after it are not judged yet (``Judged.due`` says when they can be), so that readings of a series that
reach several workers out of order are judged in event-time order. A reading at or before the
state's last judged time (clock windows: before the end of the last judged window) arrives too late
(``is_late``): stored, never judged, counted by the caller.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from ingest.alerts.model import Rule

__all__ = ["Event", "Judged", "State", "ValuesJudged", "clock_window", "due", "evaluate", "is_late", "judge",
           "judge_values", "since"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class State:
    status: Literal["ok", "pending", "firing"] = "ok"
    episode_start: datetime | None = None
    last_time: datetime | None = None  # the event time of the last reading judged
    last_value: float | None = None  # the last value judged (a reading, a rate, an aggregate, a silence)
    evaluated_to: datetime | None = None  # clock windows: the end of the last window judged


@dataclass(frozen=True, slots=True)
class Event:
    status: Literal["firing", "resolved"]
    event_time: datetime
    starts_at: datetime
    value: float
    threshold: float
    current: bool = False  # judged on the present (no_data firing): notified whatever its event time's age


@dataclass(frozen=True, slots=True)
class Judged:
    state: State
    events: list[Event]
    due: datetime | None = None  # the watermark the next judgement needs (None: no row given waits)
    uncovered: int = 0  # windows (rate: readings) not judged for too little data
    unknown_interval: bool = False  # coverage asked for and no expected interval known
    judged: int = field(default=0)  # observations fed to the state machine


def window_end(rule: Rule, t: datetime) -> datetime:
    """The end of the clock window holding t."""
    span = rule.over
    k = math.floor((t - _EPOCH).total_seconds() / span)
    return _EPOCH + timedelta(seconds=(k + 1) * span)


def clock_window(rule: Rule) -> bool:
    return rule.signal == "window" and rule.align == "clock"


_clock = clock_window


def due(rule: Rule, t: datetime) -> datetime:
    """The watermark a reading at t waits for before it can be judged."""
    return window_end(rule, t) if _clock(rule) else t


def is_late(rule: Rule, state: State, t: datetime) -> bool:
    """A reading at t that can no longer be judged: its place in the series was judged already."""
    if _clock(rule):
        return state.evaluated_to is not None and t < state.evaluated_to
    return state.last_time is not None and t <= state.last_time


def since(rule: Rule, state: State, due_at: datetime) -> datetime:
    """The earliest event time of the stored rows ``judge`` needs, given the series' state and its
    due time (for a series never judged, the due time of its earliest reading)."""
    if _clock(rule):
        return state.evaluated_to if state.evaluated_to is not None else due_at - timedelta(seconds=rule.over)
    base = state.last_time if state.last_time is not None else due_at
    if rule.signal in ("rate", "window"):
        return base - timedelta(seconds=rule.over)
    return base


def _machine(rule: Rule, state: State, observations: Iterable[tuple[datetime, float]]) -> tuple[State, list[Event]]:
    """The state machine over (time, judged value) in time order; last_time/value follow the last one."""
    status, start, last_t, last_v = state.status, state.episode_start, state.last_time, state.last_value
    hold = timedelta(seconds=rule.for_seconds)
    events: list[Event] = []
    for t, v in observations:
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
    return State(status, start, last_t, last_v, state.evaluated_to), events


def evaluate(rule: Rule, state: State, points: Iterable[tuple[datetime, float]]) -> tuple[State, list[Event], int]:
    """A value rule over readings in any order: (the new state, the events in order, how many points
    were no newer than the state and skipped)."""
    late = 0
    fresh: list[tuple[datetime, float]] = []
    last = state.last_time
    for t, v in sorted(points, key=lambda p: p[0]):
        if last is not None and t <= last:
            late += 1
            continue
        fresh.append((t, v))
        last = t
    new, events = _machine(rule, state, fresh)
    return new, events, late


def _aggregate(rule: Rule, values: Sequence[float]) -> float:
    if rule.agg == "avg":
        return math.fsum(values) / len(values)
    if rule.agg == "min":
        return min(values)
    if rule.agg == "max":
        return max(values)
    return float(len(values))


def _covered(rule: Rule, n: int, interval: float | None) -> bool | None:
    """Enough readings in a window (None: coverage asked for, and no interval to judge it by)."""
    if rule.coverage <= 0:
        return True
    if interval is None or interval <= 0:
        return None
    return n >= rule.coverage * (rule.over / interval) - 1e-9


def _window(rule: Rule, t: datetime, values: Sequence[float],
            interval: float | None) -> tuple[tuple[datetime, float] | None, bool]:
    """A window's observation at t (None: too few readings for its coverage), and whether coverage
    could not be judged for want of an interval."""
    ok = _covered(rule, len(values), interval)
    return ((t, _aggregate(rule, values)) if ok else None), ok is None


def judge(rule: Rule, state: State, rows: Sequence[tuple[datetime, float]], to: datetime, *,
          interval: float | None = None, silent: bool = False, quiet: bool = True) -> Judged:
    """Judge a series up to the watermark ``to``.

    ``rows``: the stored readings of the series from ``since(rule, state, due)`` on, in time order,
    any number after ``to`` (they wait: ``Judged.due``); rows at or before the state's last judged
    time serve as history (rate, windows) and are not judged again. ``interval``: the device's
    expected interval in seconds (window coverage). ``silent``: judge the silence at ``to`` too
    (no_data rules; the no-data job only). ``quiet``: no reading of the series has arrived for
    alerts.lateness (the service's clock); until then the clock window holding the latest row waits
    unless a row after it is stored, so that a past window being back-filled over several batches is
    judged whole, not on its first batch."""
    if rule.signal == "no_data":
        return _no_data(rule, state, rows, to, silent)
    if _clock(rule):
        return _clock_windows(rule, state, rows, to, interval, quiet)
    last = state.last_time
    fresh = [(t, v) for t, v in rows if (last is None or t > last) and t <= to]
    waiting = next((t for t, _ in rows if t > to and (last is None or t > last)), None)  # not history
    pending = None if waiting is None else due(rule, waiting)
    if rule.signal == "value":
        new, events = _machine(rule, state, fresh)
        return Judged(new, events, pending, judged=len(fresh))
    span = timedelta(seconds=rule.over)
    observations: list[tuple[datetime, float]] = []
    uncovered = 0
    unknown = False
    times = [t for t, _ in rows]
    lo = 0
    for t, v in fresh:
        if rule.signal == "rate":
            while lo < len(times) and times[lo] < t - span:
                lo += 1
            t_ref, v_ref = rows[lo]
            if t_ref < t and (t - t_ref) >= span / 2:
                observations.append((t, (v - v_ref) / ((t - t_ref).total_seconds() / 60.0)))
            else:
                uncovered += 1  # no reference old enough: readings too sparse for this span (or the first ones)
            continue
        while lo < len(times) and times[lo] <= t - span:  # rolling window (t - over, t]
            lo += 1
        seen, no_interval = _window(rule, t, [val for _, val in rows[lo:bisect_right(times, t)]], interval)
        unknown |= no_interval
        if seen is None:
            uncovered += 1
        else:
            observations.append(seen)
    new, events = _machine(rule, state, observations)
    if fresh and new.last_time != fresh[-1][0]:  # the last reading was not judged (no reference, too few)
        new = State(new.status, new.episode_start, fresh[-1][0], new.last_value, new.evaluated_to)
    return Judged(new, events, pending, uncovered, unknown, len(observations))


@dataclass(frozen=True, slots=True)
class ValuesJudged:
    """The judgement of a series by all of its value rules at once (``judge_values``)."""

    last_time: datetime | None  # the event time of the last reading judged (the series' own state)
    last_value: float | None
    changed: dict[str, State]  # rule name -> its new state, for the rules whose state moved or is not ok
    events: list[tuple[Rule, Event]]
    due: datetime | None  # the watermark the next judgement needs (None: no row given waits)
    judged: int  # readings judged


def judge_values(rules: Sequence[Rule], states: dict[str, State], last_time: datetime | None,
                 last_value: float | None, rows: Sequence[tuple[datetime, float]], to: datetime) -> ValuesJudged:
    """Judge one series up to ``to`` by every value rule in ``rules`` at once: what ``judge`` gives for
    each rule, given the series' last judged reading (``last_time``, ``last_value``, shared by all of
    its value rules) and the states of the rules that are not ok (``states``; a rule missing from it
    is ok). The readings are filtered once; a rule that is ok and that no reading breaches stays ok
    without running its state machine, so 20 rules on a metric cost little more than one."""
    fresh = [(t, v) for t, v in rows if (last_time is None or t > last_time) and t <= to]
    waiting = next((t for t, _ in rows if t > to and (last_time is None or t > last_time)), None)
    if not fresh:
        return ValuesJudged(last_time, last_value, {}, [], waiting, 0)
    changed: dict[str, State] = {}
    events: list[tuple[Rule, Event]] = []
    ok = State("ok", None, last_time, last_value)
    values = [v for _, v in fresh]
    low, high = min(values), max(values)
    for rule in rules:
        state = states.get(rule.name)
        if state is None:
            if not rule.breached_within(low, high):
                continue
            state = ok
        else:
            state = State(state.status, state.episode_start, last_time, last_value, state.evaluated_to)
        new, fired = _machine(rule, state, fresh)
        changed[rule.name] = new
        events += [(rule, e) for e in fired]
    t, v = fresh[-1]
    return ValuesJudged(t, v, changed, events, waiting, len(fresh))


def _clock_windows(rule: Rule, state: State, rows: Sequence[tuple[datetime, float]], to: datetime,
                   interval: float | None, quiet: bool) -> Judged:
    start = state.evaluated_to
    windows: dict[datetime, list[float]] = {}
    last_t = state.last_time
    pending: datetime | None = None
    latest = rows[-1][0] if rows else None
    for t, v in rows:
        if start is not None and t < start:
            continue
        end = window_end(rule, t)
        if end > to or (not quiet and latest is not None and latest < end):
            # after the watermark; or the window of the latest row while readings still arrive
            pending = end if pending is None else min(pending, end)
            continue
        windows.setdefault(end, []).append(v)
        last_t = t if last_t is None or t > last_t else last_t
    observations: list[tuple[datetime, float]] = []
    uncovered = 0
    unknown = False
    for end in sorted(windows):
        seen, no_interval = _window(rule, end, windows[end], interval)
        unknown |= no_interval
        if seen is None:
            uncovered += 1
        else:
            observations.append(seen)
    new, events = _machine(rule, state, observations)
    evaluated_to = max(windows) if windows else state.evaluated_to
    return Judged(State(new.status, new.episode_start, last_t, new.last_value, evaluated_to), events, pending,
                  uncovered, unknown, len(observations))


def _no_data(rule: Rule, state: State, rows: Sequence[tuple[datetime, float]], to: datetime, silent: bool) -> Judged:
    status, start, last = state.status, state.episode_start, state.last_time
    events: list[Event] = []
    value = state.last_value
    gap = timedelta(seconds=rule.threshold)
    judged = 0
    waiting: datetime | None = None
    for t, _ in rows:
        if last is not None and t <= last:
            continue
        if t > to:
            waiting = t
            break
        judged += 1
        if status == "firing":
            assert start is not None
            value = (t - last).total_seconds() if last is not None else 0.0
            # A reading from inside the gap that came after the job fired (later than alerts.lateness):
            # the device was not silent after all; the episode ends where it began, never before. Sent
            # whatever its age, as its firing was: a receiver is never left with a silence that never ends.
            events.append(Event("resolved", max(t, start), start, value, rule.threshold, current=True))
            status, start = "ok", None
        last = t
    if silent and waiting is None and status == "ok" and last is not None and to - last > gap:
        start = last + gap
        value = (to - last).total_seconds()
        events.append(Event("firing", start, start, value, rule.threshold, current=True))
        status = "firing"
    return Judged(State(status, start, last, value, state.evaluated_to), events, waiting, judged=judged)
