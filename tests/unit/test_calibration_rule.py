"""The calibration rule the writer applies to a new reading (ingest.store.calibration), pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingest.store.calibration import Calibration, Calibrations

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
