"""Alert evaluation on event time (ingest.alerts.evaluate), the rule model (ingest.alerts.model) and
the rule contract (ingest.alerts.settings): pure, no I/O, scripted series with their exact events."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.alerts.evaluate import Event, State, evaluate
from ingest.alerts.model import Rule
from ingest.alerts.settings import RuleSettings, WebhookSettings, compile_alerts

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def above(level: float, clear: float | None = None, for_: float = 0.0) -> Rule:
    return Rule("r", "pm2_5", "above", level, clear=clear, for_seconds=for_)


def below(level: float, clear: float | None = None, for_: float = 0.0) -> Rule:
    return Rule("r", "level", "below", level, clear=clear, for_seconds=for_)


def outside(low: float, high: float, clear: tuple[float, float] | None = None, for_: float = 0.0) -> Rule:
    cl, ch = clear if clear is not None else (None, None)
    return Rule("r", "temp", "outside", low, high, cl, ch, for_seconds=for_)


def fire(t: float, start: float, value: float, threshold: float) -> Event:
    return Event("firing", at(t), at(start), value, threshold)


def resolve(t: float, start: float, value: float, threshold: float) -> Event:
    return Event("resolved", at(t), at(start), value, threshold)


@dataclass(frozen=True)
class Case:
    rule: Rule
    series: list[tuple[float, float]]  # (seconds after T0, value), in event-time order
    events: list[Event]
    final: State


def ok(last: float, value: float) -> State:
    return State("ok", None, at(last), value)


def firing(start: float, last: float, value: float) -> State:
    return State("firing", at(start), at(last), value)


def pending(start: float, last: float, value: float) -> State:
    return State("pending", at(start), at(last), value)


CASES = {
    # above, clear = the threshold: fires once at the first breach, resolves once at the first value <= 50.
    "above fires once and resolves once": Case(
        above(50), [(0, 10), (60, 60), (120, 70), (180, 50.5), (240, 50), (300, 45), (360, 49)],
        [fire(60, 60, 60, 50), resolve(240, 60, 50, 50)], ok(360, 49)),
    # A value equal to the threshold is not a breach (above is strict).
    "above: the threshold itself does not fire": Case(above(50), [(0, 50), (60, 50)], [], ok(60, 50)),
    # Hysteresis: firing at 56, the band (50, 55.5] keeps it firing; 49.9 ends it; the band does not
    # start another episode; 56 does.
    "above with hysteresis never flaps": Case(
        above(55.5, clear=50), [(0, 40), (10, 56), (20, 52), (30, 55.4), (40, 50.1), (50, 57), (60, 51),
                                (70, 49.9), (80, 52), (90, 55.5), (100, 50.2), (110, 54), (120, 56)],
        [fire(10, 10, 56, 55.5), resolve(70, 10, 49.9, 55.5), fire(120, 120, 56, 55.5)], firing(120, 120, 56)),
    # Values oscillating inside the band from the start never fire at all.
    "the band alone never fires": Case(
        above(55.5, clear=50), [(i * 10, 50.5 + (i % 2) * 5) for i in range(20)], [], ok(190, 55.5)),
    # clear = 50 is reached exactly: the episode ends (cleared is value <= clear).
    "above: exactly the clear level resolves": Case(
        above(55.5, clear=50), [(0, 60), (10, 50)], [fire(0, 0, 60, 55.5), resolve(10, 0, 50, 55.5)], ok(10, 50)),
    "below with hysteresis": Case(
        below(10, clear=12), [(0, 15), (10, 9), (20, 11), (30, 11.9), (40, 10), (50, 12), (60, 10.5), (70, 9.5)],
        [fire(10, 10, 9, 10), resolve(50, 10, 12, 10), fire(70, 70, 9.5, 10)], firing(70, 70, 9.5)),
    "below: the threshold itself does not fire": Case(below(10), [(0, 10)], [], ok(0, 10)),
    # outside [10, 80], clear [20, 70]: each event's threshold is the nearer bound.
    "outside with a clear range": Case(
        outside(10, 80, clear=(20, 70)),
        [(0, 50), (10, 85), (20, 75), (30, 71), (40, 70), (50, 5), (60, 15), (70, 19.9), (80, 20), (90, 80), (100, 10)],
        [fire(10, 10, 85, 80), resolve(40, 10, 70, 80), fire(50, 50, 5, 10), resolve(80, 50, 20, 10)],
        ok(100, 10)),
    # Without clear, outside clears anywhere inside [low, high]; the bounds themselves are inside.
    "outside without clear": Case(
        outside(10, 80), [(0, 80), (10, 80.1), (20, 80), (30, 9.9), (40, 10)],
        [fire(10, 10, 80.1, 80), resolve(20, 10, 80, 80), fire(30, 30, 9.9, 10), resolve(40, 30, 10, 10)],
        ok(40, 10)),
    # A breach from high straight to below low is the same episode (not inside the clear range).
    "outside: high then low is one episode": Case(
        outside(10, 80), [(0, 90), (10, 0), (20, 50)],
        [fire(0, 0, 90, 80), resolve(20, 0, 50, 80)], ok(20, 50)),
    # for = 2 minutes: a spike of 90 s does not fire, and leaves no state behind.
    "for: a short spike does not fire": Case(
        above(50, for_=120), [(0, 40), (30, 60), (60, 70), (119, 90), (120, 40), (200, 45)], [], ok(200, 45)),
    # A sustained breach fires once, at the first reading 120 s (event time) after the episode began,
    # with starts_at = the episode's start and the value of the reading that fired it.
    "for: a sustained breach fires once": Case(
        above(50, for_=120), [(0, 40), (30, 60), (60, 70), (149, 65), (150, 61), (160, 90), (300, 55), (400, 30)],
        [fire(150, 30, 61, 50), resolve(400, 30, 30, 50)], ok(400, 30)),
    # Sparse readings: the first reading after the duration fires, however late it comes.
    "for: the next reading after the duration fires": Case(
        above(50, for_=120), [(0, 60), (3600, 60)], [fire(3600, 0, 60, 50)], firing(0, 3600, 60)),
    # A dip below the threshold during pending resets it: the episode starts again at 100.
    "for: a dip during pending resets it": Case(
        above(50, for_=120), [(0, 60), (60, 60), (90, 40), (100, 60), (180, 60), (219, 60), (220, 60)],
        [fire(220, 100, 60, 50)], firing(100, 220, 60)),
    # With hysteresis, pending ends at the threshold, not at clear (a value in the band is not a breach).
    "for: a dip into the band during pending resets it": Case(
        above(55.5, clear=50, for_=60), [(0, 60), (30, 52), (70, 60), (100, 60)], [], pending(70, 100, 60)),
    # Once firing, `for` plays no part in resolving: the first cleared value ends it.
    "for: resolving is immediate": Case(
        below(10, for_=60), [(0, 5), (60, 5), (61, 10)], [fire(60, 0, 5, 10), resolve(61, 0, 10, 10)], ok(61, 10)),
    "for: still pending at the end": Case(above(50, for_=120), [(0, 60), (119, 60)], [], pending(0, 119, 60)),
    "outside with for": Case(
        outside(10, 80, for_=60), [(0, 90), (30, 5), (60, 50), (70, 0), (130, 2)],
        [fire(130, 70, 2, 10)], firing(70, 130, 2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_scripted_series_gives_exactly_its_events(name: str) -> None:
    case = CASES[name]
    state, events, late = evaluate(case.rule, State(), [(at(s), v) for s, v in case.series])
    assert events == case.events
    assert state == case.final
    assert late == 0


@pytest.mark.parametrize("name", list(CASES))
def test_state_carried_across_calls_gives_the_same_events_at_every_split(name: str) -> None:
    case = CASES[name]
    points = [(at(s), v) for s, v in case.series]
    for cut in range(len(points) + 1):
        first, events1, late1 = evaluate(case.rule, State(), points[:cut])
        final, events2, late2 = evaluate(case.rule, first, points[cut:])
        assert (events1 + events2, final, late1 + late2) == (case.events, case.final, 0), cut


@pytest.mark.parametrize("name", list(CASES))
def test_readings_out_of_order_in_one_call_are_evaluated_in_event_time_order(name: str) -> None:
    case = CASES[name]
    points = [(at(s), v) for s, v in case.series]
    for seed in range(5):
        shuffled = points[:]
        random.Random(seed).shuffle(shuffled)
        assert evaluate(case.rule, State(), shuffled) == (case.final, case.events, 0)


def test_a_shuffled_batch_fires_and_resolves_in_event_time_order() -> None:
    # In arrival order, 40 (t=120) would come first and nothing would resolve.
    rule = above(50)
    state, events, _ = evaluate(rule, State(), [(at(120), 40.0), (at(60), 60.0), (at(180), 70.0)])
    assert events == [fire(60, 60, 60, 50), resolve(120, 60, 40, 50), fire(180, 180, 70, 50)]
    assert state == firing(180, 180, 70)


def test_times_in_other_zones_are_ordered_by_the_instant() -> None:
    hanoi = timezone(timedelta(hours=7))
    points = [((T0 + timedelta(seconds=10)).astimezone(hanoi), 40.0), (T0, 60.0)]
    state, events, late = evaluate(above(50), State(), points)
    assert events == [fire(0, 0, 60, 50), resolve(10, 0, 40, 50)]
    assert (state.status, state.last_time, late) == ("ok", at(10), 0)


def test_a_reading_at_or_before_last_time_is_skipped_and_counted_late() -> None:
    rule = above(50)
    start = ok(100, 10)
    # 200 at t=50 and t=100 would fire; they are history: skipped, counted; t=150 is evaluated.
    state, events, late = evaluate(rule, start, [(at(50), 200.0), (at(100), 200.0), (at(150), 20.0)])
    assert (state, events, late) == (ok(150, 20), [], 2)


def test_a_late_reading_does_not_resolve_a_firing_episode() -> None:
    state, events, late = evaluate(above(50), firing(10, 100, 60), [(at(99), 0.0), (at(100), 0.0)])
    assert (state, events, late) == (firing(10, 100, 60), [], 2)


def test_only_late_readings_leave_the_state_as_it_was() -> None:
    start = pending(0, 100, 60)
    assert evaluate(above(50, for_=60), start, [(at(1), 0.0), (at(30), 99.0)]) == (start, [], 2)


def test_a_duplicate_time_in_one_call_is_counted_late() -> None:
    state, events, late = evaluate(above(50), State(), [(at(10), 60.0), (at(10), 60.0), (at(20), 40.0)])
    assert (events, late) == ([fire(10, 10, 60, 50), resolve(20, 10, 40, 50)], 1)
    assert state == ok(20, 40)


def test_nothing_to_evaluate_keeps_the_state() -> None:
    assert evaluate(above(50), State(), []) == (State(), [], 0)
    assert evaluate(above(50), firing(0, 10, 60), []) == (firing(0, 10, 60), [], 0)


def test_a_pending_episode_carried_across_calls_fires_on_event_time_only() -> None:
    rule = above(50, for_=120)
    state, events, _ = evaluate(rule, State(), [(at(0), 60.0)])
    assert (state, events) == (pending(0, 0, 60), [])
    # However much wall time passes between calls, only the readings' times count.
    state, events, _ = evaluate(rule, state, [(at(119), 60.0)])
    assert (state, events) == (pending(0, 119, 60), [])
    state, events, _ = evaluate(rule, state, [(at(120), 61.0)])
    assert (state, events) == (firing(0, 120, 61), [fire(120, 0, 61, 50)])
    state, events, _ = evaluate(rule, state, [(at(500), 99.0)])
    assert (state, events) == (firing(0, 500, 99), [])


def test_a_firing_state_from_the_database_resolves_with_its_episode_start() -> None:
    state, events, _ = evaluate(above(50), firing(5, 10, 60), [(at(20), 30.0)])
    assert (state, events) == (ok(20, 30), [resolve(20, 5, 30, 50)])


# -- a property: any split of a series into calls, each call's points in any order, gives the same
# events and state as one call; events alternate firing/resolved and a resolution keeps its episode.


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    kind = draw(st.sampled_from(["above", "below", "outside"]))
    for_ = draw(st.sampled_from([0.0, 30.0, 120.0]))
    if kind == "above":
        return above(50, clear=draw(st.sampled_from([None, 50.0, 45.0])), for_=for_)
    if kind == "below":
        return below(10, clear=draw(st.sampled_from([None, 10.0, 14.0])), for_=for_)
    return outside(10, 50, clear=draw(st.sampled_from([None, (15.0, 45.0), (10.0, 50.0)])), for_=for_)


@st.composite
def series(draw: st.DrawFn) -> list[tuple[datetime, float]]:
    gaps = draw(st.lists(st.integers(1, 90), min_size=0, max_size=40))
    values = draw(st.lists(st.sampled_from([0.0, 5.0, 9.9, 10.0, 12.0, 14.0, 15.0, 30.0, 45.0, 47.0,
                                            50.0, 50.1, 60.0]), min_size=len(gaps), max_size=len(gaps)))
    t = 0
    out = []
    for gap, v in zip(gaps, values, strict=True):
        t += gap
        out.append((at(t), v))
    return out


@settings(max_examples=300, deadline=None)
@given(rule=rules(), points=series(), cuts=st.lists(st.integers(0, 40), max_size=6), seed=st.integers(0, 2**16))
def test_splitting_a_series_into_calls_never_changes_its_events(
    rule: Rule, points: list[tuple[datetime, float]], cuts: list[int], seed: int
) -> None:
    whole_state, whole_events, whole_late = evaluate(rule, State(), points)
    assert whole_late == 0
    bounds = sorted({min(c, len(points)) for c in cuts} | {0, len(points)})
    state, events, late = State(), [], 0
    rng = random.Random(seed)
    for lo, hi in itertools.pairwise(bounds):
        chunk = points[lo:hi]
        rng.shuffle(chunk)
        state, new, skipped = evaluate(rule, state, chunk)
        events += new
        late += skipped
    assert (state, events, late) == (whole_state, whole_events, 0)
    # Once per episode: firing, resolved, firing, ...; a resolution carries its firing's start.
    assert [e.status for e in events] == ["firing", "resolved"] * (len(events) // 2) + ["firing"] * (len(events) % 2)
    for f in events[::2]:
        assert f.event_time - f.starts_at >= timedelta(seconds=rule.for_seconds)
        assert rule.breached(f.value)
    for f, r in zip(events[::2], events[1::2], strict=False):
        assert r.starts_at == f.starts_at
        assert rule.cleared(r.value)
    assert (state.status == "firing") if len(events) % 2 else (state.status in ("ok", "pending"))
    assert (state.episode_start is None) == (state.status == "ok")
    assert state.last_time == (points[-1][0] if points else None)


# -- the rule model


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5.0, 10.0), (9.99, 10.0), (10.0, 10.0), (30.0, 10.0), (44.9, 10.0), (45.0, 10.0), (45.1, 80.0),
     (70.0, 80.0), (80.0, 80.0), (81.0, 80.0), (1000.0, 80.0), (-1000.0, 10.0)],
)
def test_threshold_of_outside_is_the_nearer_bound(value: float, expected: float) -> None:
    assert outside(10, 80).threshold_of(value) == expected


def test_threshold_of_above_and_below_is_the_level() -> None:
    assert [above(50, clear=40).threshold_of(v) for v in (0.0, 45.0, 99.0)] == [50.0, 50.0, 50.0]
    assert [below(10, clear=12).threshold_of(v) for v in (0.0, 11.0, 99.0)] == [10.0, 10.0, 10.0]


def test_breached_and_cleared_at_the_edges() -> None:
    r = outside(10, 80, clear=(20, 70))
    assert [r.breached(v) for v in (9.99, 10.0, 80.0, 80.01)] == [True, False, False, True]
    assert [r.cleared(v) for v in (19.99, 20.0, 70.0, 70.01)] == [False, True, True, False]
    a = above(55.5, clear=50)
    assert [(a.breached(v), a.cleared(v)) for v in (50.0, 50.01, 55.5, 55.51)] == [
        (False, True), (False, False), (False, False), (True, False)]
    b = below(10)
    assert [(b.breached(v), b.cleared(v)) for v in (9.99, 10.0)] == [(True, False), (False, True)]


def test_selects_by_device_globs() -> None:
    r = Rule("r", "pm2_5", "above", 1, devices=("hn-aq-*", "sg-?"))
    assert [r.selects(d, None) for d in ("hn-aq-1", "hn-aq-", "HN-AQ-1", "hn-aqx", "sg-1", "sg-12")] == [
        True, True, False, False, True, False]
    assert Rule("r", "pm2_5", "above", 1).selects("anything", None) is True


def test_selects_by_where_attributes() -> None:
    r = Rule("r", "pm2_5", "above", 1, devices=("hn-*",), where=(("district", "hoan-kiem"), ("floor", "5")))
    assert r.selects("hn-1", {"district": "hoan-kiem", "floor": "5", "other": "x"}) is True
    assert r.selects("hn-1", {"district": "hoan-kiem", "floor": 5}) is True  # a JSON number in devices.attributes
    assert r.selects("hn-1", {"district": "hoan-kiem", "floor": "5.0"}) is False  # as the config wrote it
    assert r.selects("hn-1", {"district": "hoan-kiem", "floor": 5.0}) is False
    assert r.selects("hn-1", {"district": "ba-dinh", "floor": "5"}) is False
    assert r.selects("hn-1", {"district": "hoan-kiem"}) is False
    assert r.selects("hn-1", None) is False
    assert r.selects("sg-1", {"district": "hoan-kiem", "floor": "5"}) is False  # the glob still applies


def test_where_on_a_missing_attribute_never_matches() -> None:
    # str(None) == "None": a device without the attribute must not match a config that wrote "None".
    r = Rule("r", "pm2_5", "above", 1, where=(("district", "None"),))
    assert r.selects("d", {}) is False
    assert r.selects("d", {"district": None}) is False
    assert r.selects("d", {"district": "None"}) is True


def test_where_with_a_boolean_matches_json_and_captured_booleans() -> None:
    (rule,), _, problems = compile_alerts([RuleSettings(name="r", metric="m", above=1, where={"indoor": True})], [],
                                          env={})
    assert (problems, rule.where) == ([], (("indoor", "true"),))
    assert rule.selects("d", {"indoor": "true"}) is True  # a topic capture stores text
    assert rule.selects("d", {"indoor": True}) is True  # a JSON boolean in devices.attributes
    assert rule.selects("d", {"indoor": False}) is False
    assert rule.selects("d", {"indoor": "false"}) is False


# -- the config contract (RuleSettings, compile_alerts)

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes


def hook() -> WebhookSettings:
    return WebhookSettings(name="city-ops", url="http://127.0.0.1:9000/hook", secret_env="HOOK_SECRET")


def compiled(**rule: object) -> Rule:
    written = RuleSettings.model_validate({"name": "pm25-high", "metric": "pm2_5", "webhooks": ["city-ops"], **rule})
    rules, hooks, problems = compile_alerts([written], [hook()], env={"HOOK_SECRET": SECRET})
    assert problems == []
    assert list(hooks) == ["city-ops"]
    (only,) = rules
    return only


def test_the_issue_example_compiles_to_its_rule() -> None:
    rule = compiled(devices=["hn-aq-*"], where={"district": "hoan-kiem"}, above=55.5, clear=50.0, **{"for": "2m"},
                    severity="warning", summary="PM2.5 at {device} is {value} (threshold {threshold})",
                    labels={"team": "environment"})
    assert rule == Rule("pm25-high", "pm2_5", "above", 55.5, None, 50.0, None, 120.0, "warning", ("city-ops",),
                        "PM2.5 at {device} is {value} (threshold {threshold})", (("team", "environment"),),
                        ("hn-aq-*",), (("district", "hoan-kiem"),))


@pytest.mark.parametrize(("written", "seconds"), [("2m", 120.0), ("90s", 90.0), ("1.5h", 5400.0), (30, 30.0),
                                                  (0, 0.0), ("500ms", 0.5)])
def test_for_is_the_key_and_takes_durations(written: object, seconds: float) -> None:
    assert compiled(above=1, **{"for": written}).for_seconds == seconds


def test_for_defaults_to_zero() -> None:
    assert compiled(above=1).for_seconds == 0.0


@pytest.mark.parametrize("written", ["2 minutes", "-5s", -5, True, "m"])
def test_a_bad_for_names_the_key(written: object) -> None:
    with pytest.raises(ValidationError, match="for"):
        RuleSettings.model_validate({"name": "r", "metric": "m", "above": 1, "for": written})


def test_clear_defaults_to_the_threshold() -> None:
    a = compiled(above=55.5)
    assert (a.clear, a.cleared(55.5), a.cleared(55.51), a.breached(55.51)) == (None, True, False, True)
    b = compiled(below=0.5)
    assert (b.clear, b.cleared(0.5), b.cleared(0.49), b.breached(0.49)) == (None, True, False, True)
    o = compiled(outside=[10, 80])
    assert (o.kind, o.threshold, o.high, o.clear, o.clear_high) == ("outside", 10.0, 80.0, None, None)
    assert [o.cleared(v) for v in (9.9, 10, 80, 80.1)] == [False, True, True, False]


def test_outside_takes_a_clear_range() -> None:
    o = compiled(outside=[10, 80], clear=[20, 70])
    assert (o.threshold, o.high, o.clear, o.clear_high) == (10.0, 80.0, 20.0, 70.0)


def test_an_integer_clear_is_kept() -> None:
    assert compiled(above=55, clear=50).clear == 50.0


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ({"above": 1, "below": 2}, "above and below"),
        ({}, "none of above, below, outside"),
        ({"outside": [5, 5]}, "is not a range"),
        ({"outside": [1, 9], "clear": 5}, "clear is a range"),
        ({"outside": [1, 9], "clear": [0, 5]}, "must lie inside"),
        ({"above": 50, "clear": 51}, "above the threshold"),
        ({"below": 10, "clear": 9}, "below the threshold"),
        ({"above": 50, "clear": [1, 2]}, "only with outside"),
        ({"above": 50, "summary": "{nope}"}, "not a field"),
        ({"above": 50, "fro": "2m"}, "fro"),
    ],
)
def test_a_bad_rule_is_refused_with_its_name(rule: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        RuleSettings.model_validate({"name": "pm25-high", "metric": "pm2_5", **rule})


def test_where_keeps_numbers_as_the_config_wrote_them() -> None:
    rule = compiled(above=1, where={"floor": 5, "ratio": 0.5, "big": 5.0, "name": "5"})
    assert rule.where == (("big", "5.0"), ("floor", "5"), ("name", "5"), ("ratio", "0.5"))


def test_compile_reports_unknown_webhooks_and_duplicate_rules() -> None:
    r = RuleSettings(name="a", metric="m", above=1, webhooks=["nope"])
    twice = RuleSettings(name="b", metric="m", above=1)
    rules, _, problems = compile_alerts([r, twice, twice], [hook()], env={"HOOK_SECRET": SECRET})
    assert [x.name for x in rules] == ["b"]
    assert len(problems) == 2
    assert problems[0].startswith("rules[0] (a).webhooks: no [[webhooks]] entry is named 'nope'")
    assert problems[1].startswith("rules[2] (b): a second rule named 'b'")
