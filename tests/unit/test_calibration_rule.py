"""The calibration rule the writer applies to a new reading, and the rewrite's formula and range
check (ingest.store.calibration), pure."""

from __future__ import annotations

import math
import sys
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.store.calibration import Calibration, Calibrations, Factor, out_of_range, rewrite_value

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
DEV, MET = 7, 11


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def cal(i: int, minutes: float, scale: float, offset: float, *, cursor: float | None = None,
        was: tuple[float, float] = (1.0, 0.0), device: int = DEV, metric: int = MET) -> Calibration:
    return Calibration(i, device, metric, at(minutes), scale, offset, was[0], was[1],
                       None if cursor is None else at(cursor))


def test_no_calibration_of_the_series_is_none() -> None:
    table = Calibrations([cal(1, 0, 2.0, 1.0)])
    assert table.factor(DEV, MET + 1, at(5)) is None
    assert table.factor(DEV + 1, MET, at(5)) is None
    assert Calibrations().factor(DEV, MET, at(5)) is None
    assert not Calibrations()
    assert table


def test_before_the_first_calibration_is_none() -> None:
    table = Calibrations([cal(1, 10, 2.0, 1.0)])
    assert table.factor(DEV, MET, at(9.999)) is None
    assert table.factor(DEV, MET, at(10) - timedelta(microseconds=1)) is None


def test_applies_at_exactly_the_effective_time_and_after() -> None:
    table = Calibrations([cal(1, 10, 2.0, 1.0)])
    assert table.factor(DEV, MET, at(10)) == (2.0, 1.0)
    assert table.factor(DEV, MET, at(10) + timedelta(microseconds=1)) == (2.0, 1.0)
    assert table.factor(DEV, MET, at(10_000)) == (2.0, 1.0)


def test_between_two_calibrations_the_earlier_one_up_to_the_later() -> None:
    # Given out of order: the table sorts each series by effective time.
    table = Calibrations([cal(2, 20, -1.0, 5.0), cal(1, 10, 2.0, 1.0), cal(3, 0, 3.0, 0.0, device=DEV + 1)])
    assert table.factor(DEV, MET, at(15)) == (2.0, 1.0)
    assert table.factor(DEV, MET, at(20) - timedelta(microseconds=1)) == (2.0, 1.0)
    assert table.factor(DEV, MET, at(20)) == (-1.0, 5.0)
    assert table.factor(DEV, MET, at(25)) == (-1.0, 5.0)
    assert table.factor(DEV + 1, MET, at(15)) == (3.0, 0.0)


@pytest.mark.parametrize("was", [(1.0, 0.0), (4.0, -2.0)])
def test_during_a_rewrite_the_new_before_the_cursor_the_previous_at_and_after_it(was: tuple[float, float]) -> None:
    c = cal(1, 10, 2.0, 1.0, cursor=14, was=was)
    assert c.factor_at(at(10)) == (2.0, 1.0)
    assert c.factor_at(at(14) - timedelta(microseconds=1)) == (2.0, 1.0)
    assert c.factor_at(at(14)) == was
    assert c.factor_at(at(30)) == was
    table = Calibrations([c, cal(2, 20, 5.0, 0.0)])
    assert table.factor(DEV, MET, at(9)) is None
    assert table.factor(DEV, MET, at(12)) == (2.0, 1.0)
    assert table.factor(DEV, MET, at(14)) == was
    assert table.factor(DEV, MET, at(20)) == (5.0, 0.0)  # the next calibration's span: its own rule


def test_an_applied_calibration_ignores_what_it_was_rewritten_from() -> None:
    c = cal(1, 10, 2.0, 1.0, was=(4.0, -2.0))
    assert c.factor_at(at(10)) == c.factor_at(at(99)) == (2.0, 1.0)


# -- the rewrite's formula and its range check ------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [0.35, 1000.0, -3.25, 1e-300, 123456.789, 4.2])
def test_the_rewrite_from_no_calibration_is_bit_for_bit_what_the_writer_stores(raw: float) -> None:
    for scale, offset in ((-1.0, 4.2), (2.0, 0.5), (1e-3, -273.15)):
        assert rewrite_value(raw, (1.0, 0.0), (scale, offset)) == raw * scale + offset


def test_a_correction_near_zero_leaves_an_absolute_error_not_a_relative_one() -> None:
    """Why the writer compares the values of a calibrated series within 1e-9, not relatively: 0.35
    stored with offset 0.3, corrected to offset -0.35, is rewritten to about -5.55e-17; the writer
    computes 0.35 - 0.35 = 0 for the same message delivered again."""
    stored = 0.35 * 1.0 + 0.3
    again = rewrite_value(stored, (1.0, 0.3), (1.0, -0.35))
    assert again != 0.0
    assert abs(again) < 1e-16
    assert 0.35 * 1.0 + -0.35 == 0.0
    assert not math.isclose(again, 0.0, rel_tol=1e-9)


@pytest.mark.parametrize(("lo", "hi", "frm", "to", "bad"), [
    (1.0, 1e10, (1.0, 0.0), (1e300, 0.0), 1e10),  # the greatest, to +inf
    (-1e10, 3.0, (1.0, 0.0), (1e300, 0.0), -1e10),  # the least, to -inf
    (-1e10, 3.0, (1.0, 0.0), (-1e300, 0.0), -1e10),  # a negative scale turns the least into +inf
    (1.0, 1e10, (1.0, 0.0), (1e298, 1e308), 1e10),  # 1e308 + 1e308: the offset takes it over
    (1.0, 2.0, (1e-300, 0.0), (1e300, 0.0), 1.0),  # dividing the previous calibration out overflows already
    (-5.0, 1e308, (1.0, -1e308), (1e-10, 0.0), 1e308),  # 2e308 first: the exact result would fit, not the steps
], ids=["greatest", "least", "negative-scale", "offset", "division", "subtraction"])
def test_an_extreme_the_rewrite_takes_past_the_largest_double_is_named(lo: float, hi: float, frm: Factor,
                                                                      to: Factor, bad: float) -> None:
    assert out_of_range(lo, hi, frm, to) == bad


def test_a_span_within_range_is_none() -> None:
    assert out_of_range(-1e10, 1e10, (1.0, 0.0), (1e298, 0.0)) is None  # up to 1e308
    assert out_of_range(-1e300, 1e300, (2.0, 1.0), (1.0, 0.0)) is None
    assert out_of_range(1.0, 1.0, (1.0, 0.0), (sys.float_info.max, 0.0)) is None  # the largest double itself


FINITE = st.floats(allow_nan=False, allow_infinity=False)
SCALES = FINITE.filter(lambda v: v != 0)


@settings(max_examples=2000, deadline=None, database=None)
@given(values=st.lists(FINITE, min_size=1, max_size=20), frm=st.tuples(SCALES, FINITE), to=st.tuples(SCALES, FINITE))
def test_checking_the_two_extremes_is_enough(values: list[float], frm: Factor, to: Factor) -> None:
    """The formula is monotonic in the value, rounding included: when the least and the greatest value
    of a span stay finite, every value between them does."""
    bad = out_of_range(min(values), max(values), frm, to)
    if bad is None:
        assert all(math.isfinite(rewrite_value(v, frm, to)) for v in values)
    else:
        assert bad in (min(values), max(values))
        assert not math.isfinite(rewrite_value(bad, frm, to))
