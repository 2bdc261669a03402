"""The value rules of a series judged together (ingest.alerts.evaluate.judge_values) give, rule by
rule, exactly what each judged alone gives (ingest.alerts.evaluate.judge): the same events, the same
state, the same watermark to wait for, over any readings, any watermarks on the way and any rules
(above, below, outside, with and without hysteresis and ``for``). And ValueRules' version moves with
any of its rules' and only with them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.alerts.evaluate import Event, State, judge, judge_values
from ingest.alerts.model import Rule, ValueRules

T0 = datetime(2026, 12, 1, tzinfo=UTC)


@st.composite
def value_rules(draw: st.DrawFn) -> list[Rule]:
    out = []
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["above", "below", "outside"]))
        level = float(draw(st.integers(0, 100)))
        hold = float(draw(st.sampled_from([0, 0, 60, 150])))
        if kind == "outside":
            high = level + draw(st.integers(1, 50))
            rule = Rule(f"r{i}", "level", "outside", level, high=high, for_seconds=hold)
        else:
            gap = draw(st.sampled_from([None, 0.0, 5.0]))
            clear = None if gap is None else (level - gap if kind == "above" else level + gap)
            rule = Rule(f"r{i}", "level", kind, level, clear=clear, for_seconds=hold)
        out.append(rule)
    return out


series = st.lists(st.tuples(st.integers(0, 600), st.integers(-20, 160)), max_size=40)


def alone(rules: list[Rule], rows: list[tuple[datetime, float]], cuts: list[datetime]) -> tuple[
        dict[str, State], list[tuple[str, Event]], datetime | None]:
    states = {r.name: State() for r in rules}
    events: list[tuple[str, Event]] = []
    due = None
    for to in cuts:
        for r in rules:
            out = judge(r, states[r.name], rows, to)
            states[r.name] = out.state
            events += [(r.name, e) for e in out.events]
            due = out.due
    return states, events, due


def together(rules: list[Rule], rows: list[tuple[datetime, float]], cuts: list[datetime]) -> tuple[
        dict[str, State], list[tuple[str, Event]], datetime | None]:
    open_: dict[str, State] = {}
    last: tuple[datetime | None, float | None] = (None, None)
    events: list[tuple[str, Event]] = []
    due = None
    for to in cuts:
        out = judge_values(rules, open_, last[0], last[1], rows, to)
        for name, s in out.changed.items():
            if s.status == "ok":
                open_.pop(name, None)
            else:
                open_[name] = s
        last = (out.last_time, out.last_value)
        events += [(r.name, e) for r, e in out.events]
        due = out.due
    states = {}
    for r in rules:
        s = open_.get(r.name, State("ok"))
        states[r.name] = State(s.status, s.episode_start, last[0], last[1], None)
    return states, events, due


@settings(max_examples=300, deadline=None)
@given(value_rules(), series, st.lists(st.integers(0, 700), min_size=1, max_size=5))
def test_value_rules_judged_together_equal_each_judged_alone(rules: list[Rule], raw: list[tuple[int, int]],
                                                              cuts: list[int]) -> None:
    rows = sorted({T0 + timedelta(seconds=t): float(v) for t, v in raw}.items())
    marks = [T0 + timedelta(seconds=c) for c in sorted(cuts)]
    a_states, a_events, a_due = alone(rules, rows, marks)
    b_states, b_events, b_due = together(rules, rows, marks)
    # Events in the order a series' rules record them: rule by rule at each judgement.
    assert sorted(b_events, key=lambda e: (e[1].event_time, e[0], e[1].status)) == \
        sorted(a_events, key=lambda e: (e[1].event_time, e[0], e[1].status))
    assert b_due == a_due
    for r in rules:
        a, b = a_states[r.name], b_states[r.name]
        assert (b.status, b.episode_start) == (a.status, a.episode_start), r
        if a.last_time is not None:  # a rule alone that judged something: the series judged the same
            assert (b.last_time, b.last_value) == (a.last_time, a.last_value)


def test_a_rule_that_no_reading_breaches_stays_without_a_row() -> None:
    quiet, loud = Rule("quiet", "level", "above", 100.0), Rule("loud", "level", "above", 5.0, clear=2.0)
    rows = [(T0 + timedelta(seconds=i), float(v)) for i, v in enumerate([1, 9, 1, 1])]
    out = judge_values([loud, quiet], {}, None, None, rows, T0 + timedelta(seconds=10))
    assert set(out.changed) == {"loud"}  # quiet never left ok: nothing to write for it
    assert [(r.name, e.status) for r, e in out.events] == [("loud", "firing"), ("loud", "resolved")]
    assert (out.last_time, out.last_value, out.judged, out.due) == (T0 + timedelta(seconds=3), 1.0, 4, None)


def test_readings_after_the_watermark_wait_and_earlier_ones_are_not_judged_again() -> None:
    rule = Rule("r", "level", "above", 5.0)
    rows = [(T0 + timedelta(seconds=i), 9.0) for i in range(4)]
    first = judge_values([rule], {}, None, None, rows, T0 + timedelta(seconds=1))
    assert (first.judged, first.due, first.last_time) == (2, T0 + timedelta(seconds=2), T0 + timedelta(seconds=1))
    opened = {"r": first.changed["r"]}
    second = judge_values([rule], opened, first.last_time, first.last_value, rows, T0 + timedelta(seconds=9))
    assert (second.judged, second.events, second.due) == (2, [], None)  # still firing: no new event
    assert second.changed["r"].status == "firing"


def test_the_version_of_the_value_rules_moves_with_any_of_them_only() -> None:
    a, b = Rule("a", "level", "above", 5.0), Rule("b", "level", "above", 6.0)
    assert ValueRules((a, b)).version == ValueRules((b, a)).version
    assert ValueRules((a, b)).version != ValueRules((a, Rule("b", "level", "above", 7.0))).version
    assert ValueRules((a, b)).version != ValueRules((a,)).version
    # What does not decide events (the summary, webhooks) does not move it, as with one rule's.
    assert ValueRules((a, b)).version == ValueRules((a, Rule("b", "level", "above", 6.0, summary="x"))).version
    assert [r.name for r in ValueRules((b, a)).on("level")] == ["a", "b"]
