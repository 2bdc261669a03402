"""The rule kinds of #16 (rate, rolling and clock windows, no_data) and the watermark
(ingest.alerts.evaluate.judge, since, due, is_late): pure, no I/O, scripted series with their exact
events, and properties that simulate the store (rows fetched from ``since``, rows after the watermark
wait) to show that a series gives the same events however its judgement is split into calls and
whatever order its readings were stored in."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.alerts.evaluate import Event, Judged, State, due, is_late, judge, since, window_end
from ingest.alerts.model import Agg, Rule

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)  # on the hour: clock windows of up to a day start here
MIN = 60.0
HOUR = 3600.0
US = timedelta(microseconds=1)

Kind = Literal["above", "below", "outside"]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def rows_at(series: list[tuple[float, float]]) -> list[tuple[datetime, float]]:
    return [(at(s), v) for s, v in series]


def fire(t: float, start: float, value: float, threshold: float, *, current: bool = False) -> Event:
    return Event("firing", at(t), at(start), value, threshold, current)


def resolve(t: float, start: float, value: float, threshold: float) -> Event:
    return Event("resolved", at(t), at(start), value, threshold)


def value_rule(kind: Kind, level: float, *, high: float | None = None, clear: float | None = None,
               for_: float = 0.0) -> Rule:
    return Rule("level", "pm2_5", kind, level, high, clear, for_seconds=for_)


def rate(kind: Literal["above", "below"], level: float, *, over: float = 10 * MIN, clear: float | None = None,
         for_: float = 0.0) -> Rule:
    return Rule("river-rise", "level_cm", kind, level, clear=clear, for_seconds=for_, signal="rate", over=over)


def window(kind: Kind, level: float, *, agg: Agg = "avg", over: float = HOUR,
           align: Literal["clock", "rolling"] = "clock", coverage: float = 0.0, high: float | None = None,
           clear: float | None = None, clear_high: float | None = None, for_: float = 0.0) -> Rule:
    return Rule("pm25-hour", "pm2_5", kind, level, high, clear, clear_high, for_seconds=for_, signal="window",
                over=over, agg=agg, align=align, coverage=coverage)


def no_data(seconds: float, *, per: Literal["series", "device"] = "series") -> Rule:
    return Rule("quiet", "" if per == "device" else "pm2_5", "above", seconds, signal="no_data", per=per)


def state(status: Literal["ok", "pending", "firing"], start: float | None, last: float | None,
          value: float | None, evaluated_to: float | None = None) -> State:
    return State(status, None if start is None else at(start), None if last is None else at(last), value,
                 None if evaluated_to is None else at(evaluated_to))


def every(step: float, start: float, values: list[float]) -> list[tuple[float, float]]:
    """Readings every ``step`` seconds from ``start`` on."""
    return [(start + i * step, v) for i, v in enumerate(values)]


def river(rise: float) -> list[tuple[float, float]]:
    """A reading a minute for 40 minutes: level for 10 minutes, then ``rise`` cm per minute for 10,
    then level again (a rise of 10 x rise cm in 10 minutes)."""
    out = []
    for k in range(41):
        level = 100.0 + rise * min(max(k - 10, 0), 10)
        out.append((k * MIN, level))
    return out


def hour(h: int, values: list[float]) -> list[tuple[float, float]]:
    """Readings every 5 minutes from the start of the h-th hour after T0."""
    return every(5 * MIN, h * HOUR, values)


@dataclass(frozen=True)
class Case:
    rule: Rule
    series: list[tuple[float, float]]  # (seconds after T0, value), in event-time order
    events: list[Event]
    final: State
    judged: int  # observations fed to the state machine
    to: float | None = None  # the watermark (default: the last reading)
    interval: float | None = None
    uncovered: int | None = None  # default: none, except rate readings without a reference (not judged)

    @property
    def not_judged(self) -> int:
        if self.uncovered is not None:
            return self.uncovered
        return len(self.series) - self.judged if self.rule.signal == "rate" else 0

    @property
    def watermark(self) -> datetime:
        return at(self.to if self.to is not None else self.series[-1][0])


CASES = {
    # -- rate: per minute over `over`, at each reading, from the oldest reading in [t - over, t).
    # 5 cm in 10 minutes: the rate over 10 minutes at minute k of the rise is 0.05 (k - 10); it first
    # exceeds 0.4 at minute 19 (0.45; minute 18 gives 0.4, not above) and is back to 0.4 at minute 22,
    # once the level has been flat long enough. Minutes 1 to 4 have no reference 5 minutes older.
    "rate: a river rising 5 cm in 10 minutes fires once and resolves once": Case(
        rate("above", 0.4), river(0.5),
        [fire(19 * MIN, 19 * MIN, 0.45, 0.4), resolve(22 * MIN, 19 * MIN, 0.4, 0.4)],
        state("ok", None, 40 * MIN, 0.0), judged=36),
    "rate: below for a fall": Case(
        rate("below", -0.4), river(-0.5),
        [fire(19 * MIN, 19 * MIN, -0.45, -0.4), resolve(22 * MIN, 19 * MIN, -0.4, -0.4)],
        state("ok", None, 40 * MIN, 0.0), judged=36),
    # clear = 0.2: the rates 0.4, 0.35, 0.3, 0.25 of minutes 22 to 25 keep it firing; 0.2 ends it.
    "rate: clear holds the episode until the rise has slowed to it": Case(
        rate("above", 0.4, clear=0.2), river(0.5),
        [fire(19 * MIN, 19 * MIN, 0.45, 0.4), resolve(26 * MIN, 19 * MIN, 0.2, 0.4)],
        state("ok", None, 40 * MIN, 0.0), judged=36),
    # for = 2 minutes: above 0.4 at minutes 19, 20, 21: fires at 21 with the episode's start, 19.
    "rate: for holds it 2 minutes in event time": Case(
        rate("above", 0.4, for_=2 * MIN), river(0.5),
        [fire(21 * MIN, 19 * MIN, 0.45, 0.4), resolve(22 * MIN, 19 * MIN, 0.4, 0.4)],
        state("ok", None, 40 * MIN, 0.0), judged=36),
    "rate: a rise shorter than for never fires": Case(
        rate("above", 0.4, for_=4 * MIN), river(0.5), [], state("ok", None, 40 * MIN, 0.0), judged=36),
    # 100 -> 110 a minute later is not judged (the reference is not 5 minutes older), nor at 299 s;
    # at 300 s it is: 2 per minute. At 1000 s the window [400 s, 1000 s) holds no reading (the one at
    # 300 s is older than `over`): not judged. At 1300 s the reference is 1000 s: 0 per minute.
    "rate: judged only from a reference at least over/2 older and at most over": Case(
        rate("above", 0.4), [(0, 100), (60, 110), (299, 110), (300, 110), (1000, 110), (1300, 110)],
        [fire(300, 300, 2.0, 0.4), resolve(1300, 300, 0.0, 0.4)], state("ok", None, 1300, 0.0), judged=2),
    # The last reading not judged (no reference) still moves last_time: it is not judged again.
    "rate: the last reading without a reference still counts as judged": Case(
        rate("above", 0.4), [(0, 100), (300, 110), (1000, 500)],
        [fire(300, 300, 2.0, 0.4)], state("firing", 300, 1000, 2.0), judged=1),
    # -- rolling windows: at each reading, the aggregate of (t - over, t].
    # The reading of 60 at t = 60 is in the window of t = 300, out of the window (60, 360] of t = 360.
    "rolling max: fires at the reading, resolves when the peak leaves the window": Case(
        window("above", 50, agg="max", over=300, align="rolling"), every(60, 0, [10, 60, 10, 10, 10, 10, 10]),
        [fire(60, 60, 60, 50), resolve(360, 60, 10, 50)], state("ok", None, 360, 10.0), judged=7),
    "rolling min": Case(
        window("below", 5, agg="min", over=300, align="rolling"), every(60, 0, [10, 2, 10, 10, 10, 10, 10]),
        [fire(60, 60, 2, 5), resolve(360, 60, 10, 5)], state("ok", None, 360, 10.0), judged=7),
    # Means 0, 50 (not above), 200/3, 50 (cleared), 40, 20, 20.
    "rolling avg": Case(
        window("above", 50, agg="avg", over=300, align="rolling"), every(60, 0, [0, 100, 100, 0, 0, 0, 0]),
        [fire(120, 120, 200 / 3, 50), resolve(180, 120, 50.0, 50)], state("ok", None, 360, 20.0), judged=7),
    # More than 3 readings a minute (a chattering sensor): counts 1, 2, 3, 4, 5, then 1.
    "rolling count": Case(
        window("above", 3, agg="count", over=60, align="rolling"), [(0, 1), (20, 1), (40, 1), (50, 1), (55, 1),
                                                                    (200, 1)],
        [fire(50, 50, 4.0, 3), resolve(200, 50, 1.0, 3)], state("ok", None, 200, 1.0), judged=6),
    # coverage 0.8 of a 5-minute window at one reading a minute: 4 readings needed. The first three
    # readings are not judged; after the gap, the mean of 40 at 1200, 1260, 1320 would resolve it but
    # is not judged: the window holds too few readings; 1380 (4 readings) resolves it.
    "rolling avg with coverage: a window with too little data is not judged": Case(
        window("above", 50, over=300, align="rolling", coverage=0.8),
        every(60, 0, [60] * 11) + every(60, 1200, [40] * 4),
        [fire(180, 180, 60, 50), resolve(1380, 180, 40, 50)], state("ok", None, 1380, 40.0),
        judged=9, interval=60, uncovered=6),
    # -- clock windows: [k over, (k + 1) over) of the UTC epoch, judged at their end.
    # PM2.5 hourly mean above 55.5 (clear 50), readings every 5 minutes, coverage 0.75 (9 of 12):
    # 40 | 60 (fires at the hour's end) | 52 (in the band: still firing) | 45 (resolves at its end) |
    # 80 from 8 readings (too few: not judged) | 80 from 9 readings (fires).
    "clock avg: the PM2.5 hourly mean fires at the end of the hour": Case(
        window("above", 55.5, clear=50, coverage=0.75),
        hour(0, [40] * 12) + hour(1, [50, 70] * 6) + hour(2, [52] * 12) + hour(3, [45] * 12) + hour(4, [80] * 8)
        + hour(5, [80] * 9),
        [fire(2 * HOUR, 2 * HOUR, 60, 55.5), resolve(4 * HOUR, 2 * HOUR, 45, 55.5),
         fire(6 * HOUR, 6 * HOUR, 80, 55.5)],
        state("firing", 6 * HOUR, 5 * HOUR + 40 * MIN, 80.0, 6 * HOUR), judged=5, to=6 * HOUR, interval=300,
        uncovered=1),
    # An empty hour is never judged: the episode of the first hour resolves at the end of the third.
    "clock: an empty window is never judged": Case(
        window("above", 50), [(10 * MIN, 60), (2 * HOUR + 10 * MIN, 40)],
        [fire(HOUR, HOUR, 60, 50), resolve(3 * HOUR, HOUR, 40, 50)], state("ok", None, 2 * HOUR + 10 * MIN, 40.0,
                                                                           3 * HOUR),
        judged=2, to=3 * HOUR),
    "clock max": Case(
        window("above", 25, agg="max", over=15 * MIN), [(0, 10), (60, 30), (120, 20), (15 * MIN, 20)],
        [fire(15 * MIN, 15 * MIN, 30, 25), resolve(30 * MIN, 15 * MIN, 20, 25)],
        state("ok", None, 15 * MIN, 20.0, 30 * MIN), judged=2, to=30 * MIN),
    "clock min": Case(
        window("below", 15, agg="min", over=15 * MIN), [(0, 10), (60, 30), (120, 20), (15 * MIN, 20)],
        [fire(15 * MIN, 15 * MIN, 10, 15), resolve(30 * MIN, 15 * MIN, 20, 15)],
        state("ok", None, 15 * MIN, 20.0, 30 * MIN), judged=2, to=30 * MIN),
    "clock count": Case(
        window("above", 2, agg="count", over=15 * MIN), [(0, 10), (60, 30), (120, 20), (15 * MIN, 20)],
        [fire(15 * MIN, 15 * MIN, 3.0, 2), resolve(30 * MIN, 15 * MIN, 1.0, 2)],
        state("ok", None, 15 * MIN, 1.0, 30 * MIN), judged=2, to=30 * MIN),
    # outside [10, 50], clear [15, 45], for 30 minutes, 15-minute windows: the 9 of the first window
    # starts an episode that the 47 of the second ends (inside [10, 50]: no breach); 5, 60, 55 breach
    # three windows in a row: fires at the end of the third, 30 minutes after the end of the first.
    # 48 is outside the clear range (still firing); 30 resolves it (the nearer bound: 10).
    "clock outside with for": Case(
        window("outside", 10, agg="min", over=15 * MIN, high=50, clear=15, clear_high=45, for_=30 * MIN),
        [(0, 9), (15 * MIN, 47), (30 * MIN, 5), (45 * MIN, 60), (60 * MIN, 55), (75 * MIN, 48), (90 * MIN, 30)],
        [fire(75 * MIN, 45 * MIN, 55, 50), resolve(105 * MIN, 45 * MIN, 30, 10)],
        state("ok", None, 90 * MIN, 30.0, 105 * MIN), judged=7, to=105 * MIN),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_scripted_series_gives_exactly_its_events(name: str) -> None:
    case = CASES[name]
    out = judge(case.rule, State(), rows_at(case.series), case.watermark, interval=case.interval)
    assert out.events == case.events
    assert out.state == case.final
    assert (out.judged, out.uncovered, out.unknown_interval, out.due) == (case.judged, case.not_judged, False,
                                                                         None)


@pytest.mark.parametrize("name", list(CASES))
def test_a_scripted_series_judged_at_every_watermark_on_the_way_gives_the_same_events(name: str) -> None:
    case = CASES[name]
    rows = rows_at(case.series)
    marks = sorted({t for t, _ in rows} | {t - US for t, _ in rows} | {due(case.rule, t) for t, _ in rows})
    for mark in [m for m in marks if m < case.watermark]:
        store = Store(case.rule, case.interval)
        store.write(rows)  # every reading stored at once: those after the watermark wait
        store.judge(mark)
        store.judge(case.watermark)
        assert (store.events, store.state, store.due_at) == (case.events, case.final, None), mark
        assert (store.judged, store.uncovered, store.late) == (case.judged, case.not_judged, 0), mark


# -- rate


def test_rate_is_per_minute_from_the_oldest_reading_of_the_span() -> None:
    # At 600 s the span [0, 600) holds 0 s and 300 s: the reference is the oldest, 0 s.
    out = judge(rate("above", 100.0), State(), rows_at([(0, 0), (300, 50), (600, 60)]), at(600))
    assert (out.judged, out.state.last_value) == (2, 6.0)  # 50 / 5 min at 300 s, 60 / 10 min at 600 s


def test_rate_takes_a_reference_exactly_over_older_and_not_one_older_than_that() -> None:
    r = rate("above", 0.4)
    assert judge(r, State(), rows_at([(0, 100), (600, 110)]), at(600)).events == [fire(600, 600, 1.0, 0.4)]
    out = judge(r, State(), rows_at([(0, 100), (600.5, 110)]), at(601))
    assert (out.events, out.judged, out.state.last_time) == ([], 0, at(600.5))


def test_rate_history_before_the_last_judged_reading_serves_as_reference_only() -> None:
    r = rate("above", 0.4)
    first = judge(r, State(), rows_at([(0, 100), (60, 100)]), at(60))
    assert (first.events, first.judged, first.state.last_time) == ([], 0, at(60))
    # The store fetches from since(): last_time - over; 0 s is the reference of 300 s, not judged again.
    lo = since(r, first.state, at(300))
    assert lo == at(60 - 600)
    out = judge(r, first.state, rows_at([(0, 100), (60, 100), (300, 105)]), at(300))
    assert (out.events, out.judged) == ([fire(300, 300, 1.0, 0.4)], 1)


# -- windows


def test_a_rolling_window_is_open_at_its_start_and_closed_at_its_end() -> None:
    r = window("above", 1, agg="count", over=300, align="rolling")
    out = judge(r, State(), rows_at([(0, 1), (300, 1)]), at(300))  # (0, 300] holds only 300
    assert (out.events, out.state.last_value) == ([], 1.0)
    out = judge(r, State(), rows_at([(0.5, 1), (300, 1)]), at(300))
    assert out.events == [fire(300, 300, 2.0, 1)]


@pytest.mark.parametrize("align", ["clock", "rolling"])
def test_coverage_without_an_expected_interval_judges_nothing(align: Literal["clock", "rolling"]) -> None:
    r = window("above", 50, align=align, coverage=0.5, over=600)
    rows = rows_at(every(60, 0, [99] * 30))  # three full 10-minute windows of 99
    out = judge(r, State(), rows, at(1800), interval=None)
    assert (out.events, out.judged, out.unknown_interval) == ([], 0, True)
    assert out.uncovered == (3 if align == "clock" else 30)
    assert out.state.status == "ok"
    # The same rows with the interval known fire.
    known = judge(r, State(), rows, at(1800), interval=60)
    # (rolling: the first 4 readings have fewer than 5 in the 10 minutes up to them)
    assert (len(known.events), known.uncovered, known.unknown_interval) == (1, 0 if align == "clock" else 4, False)


def test_coverage_zero_judges_a_window_of_one_reading_without_an_interval() -> None:
    out = judge(window("above", 50, over=600), State(), rows_at([(0, 60)]), at(600), interval=None)
    assert (out.events, out.unknown_interval, out.uncovered) == ([fire(600, 600, 60, 50)], False, 0)


def test_coverage_counts_the_readings_the_interval_promises() -> None:
    r = window("above", 50, over=HOUR, coverage=0.75)
    nine, eight = rows_at(hour(0, [60] * 9)), rows_at(hour(0, [60] * 8))
    assert judge(r, State(), nine, at(HOUR), interval=300).events == [fire(HOUR, HOUR, 60, 50)]
    out = judge(r, State(), eight, at(HOUR), interval=300)
    assert (out.events, out.uncovered, out.judged) == ([], 1, 0)
    # A window not judged for too little data is passed all the same: is_late from its end.
    assert out.state.evaluated_to == at(HOUR)


def test_a_clock_window_ending_after_the_watermark_waits_until_its_end() -> None:
    r = window("above", 55.5, clear=50)
    rows = rows_at(hour(0, [40] * 12) + hour(1, [60] * 12))
    out = judge(r, State(), rows, at(2 * HOUR) - US)
    assert (out.events, out.judged, out.due) == ([], 1, at(2 * HOUR))  # the first hour judged (40)
    assert out.state.evaluated_to == at(HOUR)
    # The next judgement fetches from the end of the window judged.
    assert since(r, out.state, at(2 * HOUR)) == at(HOUR)
    later = judge(r, out.state, [(t, v) for t, v in rows if t >= at(HOUR)], at(2 * HOUR))
    assert (later.events, later.due) == ([fire(2 * HOUR, 2 * HOUR, 60, 55.5)], None)


def test_a_reading_in_an_open_window_before_the_watermark_waits_for_the_window_end() -> None:
    r = window("above", 50, over=HOUR)
    out = judge(r, State(), rows_at([(10 * MIN, 60), (HOUR + 10 * MIN, 60)]), at(HOUR + 30 * MIN))
    assert (out.events, out.due) == ([fire(HOUR, HOUR, 60, 50)], at(2 * HOUR))


def test_a_clock_window_judged_is_not_judged_again_by_its_late_readings() -> None:
    r = window("above", 50, over=HOUR)
    out = judge(r, State(), rows_at([(10 * MIN, 40)]), at(HOUR))
    assert out.state.evaluated_to == at(HOUR)
    assert is_late(r, out.state, at(50 * MIN))  # after the last judged reading, in the judged window
    # Given to judge anyway, the late 99 is skipped (the store only counts it).
    again = judge(r, out.state, rows_at([(10 * MIN, 40), (50 * MIN, 99)]), at(2 * HOUR))
    assert (again.events, again.judged, again.state) == ([], 0, out.state)


def test_clock_windows_are_epoch_aligned_in_utc_whatever_the_zone_of_the_times() -> None:
    hanoi = timezone(timedelta(hours=7))
    r = window("above", 50, over=HOUR)
    assert window_end(r, at(0)) == at(HOUR)
    assert window_end(r, at(HOUR) - US) == at(HOUR)
    assert window_end(r, at(HOUR)) == at(2 * HOUR)
    assert window_end(r, at(10 * MIN).astimezone(hanoi)) == at(HOUR)
    day = window("above", 50, over=86400)
    assert window_end(day, at(0)) == datetime(2026, 11, 26, tzinfo=UTC)  # 07:00 in Hanoi
    assert window_end(window("above", 50, over=15 * MIN), at(16 * MIN)) == at(30 * MIN)


# -- no_data


def test_no_data_fires_once_and_resolves_once() -> None:
    r = no_data(15 * MIN)
    seen = judge(r, State(), rows_at([(0, 1), (60, 1)]), at(100))
    assert (seen.events, seen.state, seen.judged) == ([], state("ok", None, 60, None), 2)
    # Silent for exactly the threshold at the watermark: not yet.
    assert judge(r, seen.state, [], at(60 + 15 * MIN), silent=True).events == []
    # The no-data job: event time last + threshold, value the silence at the watermark, current.
    fired = judge(r, seen.state, [], at(1000), silent=True)
    assert fired.events == [fire(960, 960, 940.0, 900.0, current=True)]
    assert fired.state == state("firing", 960, 60, 940.0)
    # Judged again while it fires: nothing more.
    again = judge(r, fired.state, [], at(5000), silent=True)
    assert (again.events, again.state) == ([], fired.state)
    # A reading resolves it at its time, value the length of the gap.
    back = judge(r, again.state, rows_at([(3000, 1), (3060, 1)]), at(3100))
    assert back.events == [replace(resolve(3000, 960, 2940.0, 900.0), current=True)]
    assert back.state == state("ok", None, 3060, 2940.0)
    # The regular judgement (not the job) never fires on silence.
    assert judge(r, back.state, [], at(10**6)).events == []


def test_no_data_a_reading_the_job_sees_before_judging_prevents_the_firing() -> None:
    r = no_data(15 * MIN)
    before = state("ok", None, 60, None)
    # A backlog redelivered after an outage: gaps of 940 s and 1000 s, filled before the job judged them.
    out = judge(r, before, rows_at([(1000, 1), (2000, 1), (2500, 1)]), at(2600), silent=True)
    assert (out.events, out.state.last_time, out.judged) == ([], at(2500), 3)
    # A reading stored after the watermark fills the gap too: it waits, and nothing fires.
    waiting = judge(r, before, rows_at([(1500, 1)]), at(1000), silent=True)
    assert (waiting.events, waiting.state, waiting.due) == ([], before, at(1500))
    # But silent past the threshold since the last reading: fires at that reading + threshold.
    late = judge(r, before, rows_at([(1000, 1)]), at(2000), silent=True)
    assert late.events == [fire(1900, 1900, 1000.0, 900.0, current=True)]


def test_no_data_never_fires_for_a_series_never_seen() -> None:
    assert judge(no_data(60), State(), [], at(10**6), silent=True) == Judged(State(), [], None)


def test_no_data_per_device_takes_readings_of_every_metric_once_per_time() -> None:
    r = no_data(60, per="device")
    assert r.per_device
    out = judge(r, state("firing", 60, 0, 100.0), rows_at([(100, 0), (100, 0), (130, 0)]), at(200))
    assert out.events == [replace(resolve(100, 60, 100.0, 60), current=True)]
    assert (out.judged, out.state.last_time) == (2, at(130))


# -- since, due, is_late for each kind

KINDS: dict[str, Rule] = {
    "value": value_rule("above", 50),
    "rate": rate("above", 0.4, over=600),
    "rolling": window("above", 50, over=600, align="rolling"),
    "clock": window("above", 50, over=600),
    "no_data": no_data(600),
}


@pytest.mark.parametrize(("kind", "first", "later"), [
    # never judged: from the due time of the earliest reading (less the span a judgement looks back);
    # judged: from the last judged reading (clock: the end of the last judged window).
    ("value", 1000, 900), ("rate", 400, 300), ("rolling", 400, 300), ("clock", 400, 1200), ("no_data", 1000, 900),
])
def test_since(kind: str, first: float, later: float) -> None:
    r = KINDS[kind]
    judged = state("ok", None, 900, 1.0, 1200 if kind == "clock" else None)
    assert since(r, State(), at(1000)) == at(first)
    assert since(r, judged, at(1300)) == at(later)


@pytest.mark.parametrize("kind", list(KINDS))
def test_due(kind: str) -> None:
    r = KINDS[kind]
    if kind == "clock":
        assert [due(r, at(s)) for s in (0, 1, 599.5, 600)] == [at(600), at(600), at(600), at(1200)]
    else:
        assert [due(r, at(s)) for s in (0, 1, 599.5, 600)] == [at(0), at(1), at(599.5), at(600)]


@pytest.mark.parametrize("kind", list(KINDS))
def test_is_late(kind: str) -> None:
    r = KINDS[kind]
    assert not is_late(r, State(), at(-(10**6)))  # never judged: nothing is late
    if kind == "clock":
        judged = state("ok", None, 900, 1.0, 1200)  # windows up to 1200 judged, the last reading 900
        assert [is_late(r, judged, at(1200) + d) for d in (-US, timedelta(0), US)] == [True, False, False]
        assert is_late(r, judged, at(1000))
    else:
        judged = state("ok", None, 900, 1.0)
        assert [is_late(r, judged, at(900) + d) for d in (-US, timedelta(0), US)] == [True, True, False]


@pytest.mark.parametrize("kind", list(KINDS))
def test_due_of_a_judgement_is_the_due_time_of_its_first_waiting_reading(kind: str) -> None:
    r = KINDS[kind]
    rows = rows_at([(0, 1), (650, 1), (700, 1), (1300, 1)])
    out = judge(r, State(), rows, at(660))
    assert out.due == (at(1200) if kind == "clock" else at(700))
    assert judge(r, State(), rows, at(1800)).due is None


@pytest.mark.parametrize("kind", ["value", "rate", "rolling"])
def test_a_watermark_behind_the_last_judged_reading_waits_only_for_newer_readings(kind: str) -> None:
    # A worker whose clock is behind: the rows at or before last_time are history, not waiting.
    r = KINDS[kind]
    judged = judge(r, State(), rows_at([(0, 1), (100, 1)]), at(100)).state
    out = judge(r, judged, rows_at([(0, 1), (100, 1), (150, 1)]), at(80))
    assert (out.events, out.judged, out.due, out.state.last_time) == ([], 0, at(150), at(100))


# -- watermark properties: what lets several workers agree. A series judged in one call with the
# watermark after everything gives the same events and state as judged in many calls at increasing
# watermarks, each from the rows since() of its state, whatever order the readings were stored in,
# as long as every reading at or before a call's watermark is stored when that call judges.


@dataclass
class Store:
    """The store's side of a series (as ingest.alerts.stage does it): readings stored, counted late
    or moving due_at; a judgement fetches the rows since() and saves state and due."""

    rule: Rule
    interval: float | None = None
    rows: dict[datetime, float] = field(default_factory=dict)
    state: State = field(default_factory=State)
    due_at: datetime | None = None
    events: list[Event] = field(default_factory=list)
    late: int = 0
    judged: int = 0
    uncovered: int = 0

    def write(self, batch: list[tuple[datetime, float]]) -> None:
        for t, v in batch:
            self.rows[t] = v
            if is_late(self.rule, self.state, t):
                self.late += 1
                continue
            d = due(self.rule, t)
            self.due_at = d if self.due_at is None or d < self.due_at else self.due_at

    def judge(self, to: datetime, *, silent: bool = False) -> None:
        if not silent and (self.due_at is None or self.due_at > to):
            return
        rows: list[tuple[datetime, float]] = []
        if self.due_at is not None:
            lo = since(self.rule, self.state, self.due_at)
            rows = sorted((t, v) for t, v in self.rows.items() if t >= lo)
        out = judge(self.rule, self.state, rows, to, interval=self.interval, silent=silent)
        self.state, self.due_at = out.state, out.due
        self.events += out.events
        self.judged += out.judged
        self.uncovered += out.uncovered


PROPERTY_RULES = [
    value_rule("above", 50, clear=45),
    value_rule("outside", 10, high=50, for_=120),
    rate("above", 0.4, over=600, clear=0.2),
    rate("below", -0.4, over=300, for_=120),
    window("above", 50, over=300, align="rolling"),
    window("above", 50, agg="max", over=600, align="rolling", coverage=0.5),
    window("above", 3, agg="count", over=120, align="rolling"),
    window("below", 10, agg="min", over=300, align="rolling", for_=60),
    window("above", 45, clear=30, over=600, coverage=0.5),
    window("above", 50, agg="max", over=300),
    window("below", 3, agg="count", over=600),
    window("outside", 10, agg="min", over=900, high=50, for_=900),
    no_data(300),
]


@st.composite
def series(draw: st.DrawFn, max_gap: int = 240) -> list[tuple[datetime, float]]:
    gaps = draw(st.lists(st.integers(1, max_gap), min_size=4, max_size=40))
    values = draw(st.lists(st.sampled_from([0.0, 5.0, 9.9, 10.0, 30.0, 45.0, 50.0, 50.1, 60.0]),
                           min_size=len(gaps), max_size=len(gaps)))
    return [(at(t), v) for t, v in zip(itertools.accumulate(gaps), values, strict=True)]


def arrivals(points: list[tuple[datetime, float]], marks: list[datetime], delays: list[int], lateness: int,
             seed: int) -> tuple[list[tuple[datetime, float]], list[int]]:
    """The readings in the order they are stored, and for each watermark how many of them are stored
    when it judges. Reading i reaches the store min(delays[i], lateness) seconds after its time (ties
    in an order drawn from ``seed``); the call of watermark w runs at w + lateness: every reading at
    or before w is stored, and so are the later ones that arrived before the call (they wait)."""
    rng = random.Random(seed)
    arrival = [t + timedelta(seconds=min(d, lateness)) for (t, _), d in
               zip(points, itertools.chain(delays, itertools.repeat(0)), strict=False)]
    ties = rng.sample(range(len(points)), len(points))
    order = sorted(range(len(points)), key=lambda i: (arrival[i], ties[i]))
    counts = [sum(1 for i in order if arrival[i] <= mark + timedelta(seconds=lateness)) for mark in marks]
    return [points[i] for i in order], counts


DELAYS = st.lists(st.integers(0, 3000), max_size=40)
LATENESS = st.sampled_from([0, 60, 600, 3000])


@settings(max_examples=150, deadline=None)
@given(rule=st.sampled_from(PROPERTY_RULES), points=series(), interval=st.sampled_from([60.0, 60.0, None]),
       offsets=st.lists(st.integers(0, 10_000), min_size=1, max_size=8), delays=DELAYS, lateness=LATENESS,
       seed=st.integers(0, 2**16))
def test_judging_in_many_calls_in_any_storage_order_gives_the_events_of_one_call(
    rule: Rule, points: list[tuple[datetime, float]], interval: float | None, offsets: list[int], delays: list[int],
    lateness: int, seed: int,
) -> None:
    end = points[-1][0] + timedelta(seconds=2 * 900)  # past the end of the last clock window
    whole = judge(rule, State(), points, end, interval=interval)
    one = Store(rule, interval)
    one.write(points)
    one.judge(end)
    assert (one.events, one.state, one.judged, one.uncovered) == (whole.events, whole.state, whole.judged,
                                                                  whole.uncovered)
    marks = [*sorted(m for m in (at(s) for s in offsets) if m < end), end]
    order, counts = arrivals(points, marks, delays, lateness, seed)
    many = Store(rule, interval)
    stored = 0
    for mark, count in zip(marks, counts, strict=True):
        many.write(order[stored:count])
        stored = count
        many.judge(mark)
    assert many.late == 0  # a reading stored before its watermark is never late
    assert (many.events, many.state, many.due_at) == (whole.events, whole.state, None)
    assert (many.judged, many.uncovered) == (whole.judged, whole.uncovered)
    # Once per episode: firing, resolved, firing, ...; a resolution keeps its firing's start.
    events = many.events
    assert [e.status for e in events] == ["firing", "resolved"] * (len(events) // 2) + ["firing"] * (len(events) % 2)
    for f, r in zip(events[::2], events[1::2], strict=False):
        assert r.starts_at == f.starts_at <= r.event_time
    assert all(e.event_time <= end for e in events)


@settings(max_examples=100, deadline=None)
@given(points=series(max_gap=900), per=st.sampled_from(["series", "device"]), calls=st.lists(
    st.tuples(st.integers(0, 20_000), st.booleans()), min_size=1, max_size=10), delays=DELAYS, lateness=LATENESS,
    seed=st.integers(0, 2**16))
def test_no_data_events_depend_on_the_jobs_watermarks_alone(
    points: list[tuple[datetime, float]], per: Literal["series", "device"], calls: list[tuple[int, bool]],
    delays: list[int], lateness: int, seed: int,
) -> None:
    """The no-data job (one worker at a time) judges silences at its watermarks; the regular judgements
    between two jobs, however many, at whatever watermarks, change nothing."""
    rule = no_data(300, per=per)
    end = points[-1][0] + timedelta(hours=1)
    marks = [*sorted({(at(s), job) for s, job in calls if at(s) < end}), (end, False)]
    order, counts = arrivals(points, [m for m, _ in marks], delays, lateness, seed)
    many, jobs_only = Store(rule), Store(rule)
    stored, stored_jobs = 0, 0
    for (mark, job), count in zip(marks, counts, strict=True):
        many.write(order[stored:count])
        stored = count
        many.judge(mark, silent=job)
        if job or mark == end:
            jobs_only.write(order[stored_jobs:count])
            stored_jobs = count
            jobs_only.judge(mark, silent=job)
    assert many.late == jobs_only.late == 0
    assert (many.events, many.state) == (jobs_only.events, jobs_only.state)
    # Each firing at the last reading + threshold, each resolution at a reading's time.
    times = {t for t, _ in points}
    gap = timedelta(seconds=rule.threshold)
    for f, r in zip(many.events[::2], many.events[1::2], strict=False):
        assert f.current
        assert f.event_time - gap in times
        assert r.event_time in times
        assert r.value == (r.event_time - (f.event_time - gap)).total_seconds() > rule.threshold
    assert many.state.status == ("firing" if len(many.events) % 2 else "ok")


def test_a_reading_from_inside_the_gap_after_the_job_fired_resolves_at_the_episodes_start() -> None:
    # Later than the lateness: the job fired at 900 s of silence, then a reading timed 500 s comes.
    rule = Rule("silent", "level", "above", 900.0, signal="no_data")
    fired = judge(rule, State("ok", None, at(0), 1.0), [], at(1000), silent=True)
    assert [e.status for e in fired.events] == ["firing"]
    out = judge(rule, fired.state, [(at(500), 3.0)], at(1100))
    assert out.events == [Event("resolved", at(900), at(900), 500.0, 900.0, current=True)]
    assert out.state.status == "ok"


# -- back-fills of a past clock window (judge(..., quiet=False)): while readings of the series still
# arrive, the window holding the latest row waits, however old, unless a row after it is stored; so a
# window back-filled over several batches is judged once, whole.

DAY = 24 * HOUR


def test_while_readings_arrive_the_window_of_the_latest_row_waits_for_its_end_however_old() -> None:
    r = window("above", 30, over=HOUR)
    first_half = rows_at(hour(0, [80] * 6))  # 00:00 to 00:25, stored a day later
    out = judge(r, State(), first_half, at(DAY), quiet=False)
    assert (out.events, out.judged, out.uncovered, out.due, out.state) == ([], 0, 0, at(HOUR), State())
    assert not is_late(r, out.state, at(59 * MIN))  # the rest of the window can still come
    # Nothing has arrived for the lateness: the same rows are judged (what every batch did before).
    assert judge(r, State(), first_half, at(DAY)).events == [fire(HOUR, HOUR, 80, 30)]


def test_a_row_after_the_window_closes_it_while_readings_arrive() -> None:
    r = window("above", 30, over=HOUR)
    rows = rows_at(hour(0, [80] * 12) + hour(1, [10]))
    out = judge(r, State(), rows, at(DAY), quiet=False)
    # Hour 0 is judged (a row of hour 1 is stored); hour 1 holds the latest row and waits.
    assert (out.events, out.judged, out.due) == ([fire(HOUR, HOUR, 80, 30)], 1, at(2 * HOUR))
    assert out.state == state("firing", HOUR, 55 * MIN, 80.0, HOUR)
    # A window after the watermark waits as before, quiet or not.
    assert judge(r, State(), rows, at(HOUR) - US, quiet=False).due == at(HOUR)


@pytest.mark.parametrize("coverage", [0.0, 0.75])
def test_a_past_window_back_filled_over_two_batches_is_judged_once_on_all_its_readings(coverage: float) -> None:
    # Hour 0 arrives a day late in two batches a moment apart: 6 readings of 80, then 6 of 20. Its
    # mean is 50. Judged on the first batch it would be 80 (coverage 0.75 of 12: 6 readings are too
    # few, and the window would be passed over unjudged), and the second half would be late.
    r = window("above", 30, over=HOUR, coverage=coverage)
    first, second = rows_at(hour(0, [80] * 6)), rows_at(every(5 * MIN, 30 * MIN, [20] * 6))
    one = judge(r, State(), first, at(DAY), interval=300, quiet=False)  # the first batch
    assert (one.events, one.due, one.uncovered) == ([], at(HOUR), 0)
    assert not any(is_late(r, one.state, t) for t, _ in second)
    stored = first + second
    assert since(r, one.state, at(HOUR)) <= stored[0][0]  # the next judgement fetches the whole window
    two = judge(r, one.state, stored, at(DAY) + 5 * US, interval=300, quiet=False)  # the second batch
    assert (two.events, two.due, two.judged) == ([], at(HOUR), 0)
    three = judge(r, two.state, stored, at(DAY) + timedelta(seconds=3), interval=300)  # quiet: the evaluator
    assert (three.events, three.judged, three.uncovered, three.due) == ([fire(HOUR, HOUR, 50.0, 30)], 1, 0, None)
    assert three.state == state("firing", HOUR, 55 * MIN, 50.0, HOUR)


@pytest.mark.parametrize("kind", ["value", "rate", "rolling", "no_data"])
def test_quiet_concerns_clock_windows_alone(kind: str) -> None:
    r = KINDS[kind]
    rows = rows_at(every(60, 0, [1, 99, 99, 1, 99, 1] * 4))
    assert judge(r, State(), rows, at(DAY), quiet=False) == judge(r, State(), rows, at(DAY))
