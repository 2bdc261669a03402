"""NewKeyBudget: at most `limit` new keys per source in each one-minute window."""

from __future__ import annotations

from ingest.budget import NewKeyBudget


def test_each_source_has_its_own_budget_per_window() -> None:
    b = NewKeyBudget(2, window=60)
    assert [b.admit("a", 0.0) for _ in range(3)] == [True, True, False]
    assert b.admit("b", 1.0)
    assert not b.admit("a", 59.9)
    assert b.admit("a", 60.0)  # a new window
    assert b.admit("a", 61.0)
    assert not b.admit("a", 62.0)


def test_a_refused_key_does_not_consume_the_next_window() -> None:
    b = NewKeyBudget(1, window=60)
    assert b.admit("a", 0.0)
    for t in range(1, 60):
        assert not b.admit("a", float(t))
    assert b.admit("a", 60.0)
