"""Batcher: outcomes accumulate until the batch holds enough messages or readings, or is old enough."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ingest.batcher import Batch, Batcher
from ingest.model import RawMessage, Reading
from ingest.process import Outcome

AT = datetime(2026, 11, 25, 3, 0, 0, tzinfo=UTC)


def _outcome(readings: int = 1, *, redelivered: bool = False, mid: int = 1) -> Outcome:
    msg = RawMessage("city/d/aq-7/up", b"{}", AT, qos=1, mid=mid, redelivered=redelivered)
    return Outcome(msg, "native", [Reading("aq-7", f"m{i}", AT, float(i)) for i in range(readings)])


def test_empty_batcher() -> None:
    b = Batcher(max_messages=3, max_readings=100, max_age=0.5)

    assert b.empty
    assert b.due_at() is None
    assert not b.full()
    assert not b.ready(1e9)


def test_flushes_on_message_count() -> None:
    b = Batcher(max_messages=3, max_readings=100, max_age=10.0)
    b.add(_outcome(), now=100.0)
    b.add(_outcome(), now=100.0)

    assert not b.full()
    assert not b.ready(100.0)

    b.add(_outcome(), now=100.0)
    assert b.full()
    assert b.ready(100.0)


def test_flushes_on_reading_count() -> None:
    b = Batcher(max_messages=100, max_readings=5, max_age=10.0)
    b.add(_outcome(readings=3), now=100.0)

    assert not b.full()
    assert not b.ready(100.0)

    b.add(_outcome(readings=2), now=100.0)
    assert b.full()
    assert b.ready(100.0)


def test_one_big_message_fills_the_batch_alone() -> None:
    b = Batcher(max_messages=100, max_readings=5, max_age=10.0)
    b.add(_outcome(readings=50), now=100.0)

    assert b.ready(100.0)


def test_messages_without_readings_count_towards_messages_only() -> None:
    b = Batcher(max_messages=2, max_readings=1, max_age=10.0)
    b.add(_outcome(readings=0), now=100.0)  # e.g. a rejection

    assert not b.ready(100.0)
    b.add(_outcome(readings=0), now=100.0)
    assert b.ready(100.0)


def test_flushes_on_age_of_the_first_message() -> None:
    b = Batcher(max_messages=100, max_readings=100, max_age=0.25)
    b.add(_outcome(), now=100.0)

    assert b.due_at() == 100.25
    assert not b.ready(100.0)
    assert not b.ready(100.24)

    # A later message does not push the deadline back.
    b.add(_outcome(), now=100.2)
    assert b.due_at() == 100.25
    assert not b.full()
    assert b.ready(100.25)
    assert b.ready(150.0)


def test_take_returns_the_batch_and_resets() -> None:
    b = Batcher(max_messages=100, max_readings=100, max_age=1.0)
    first, second = _outcome(readings=2, mid=1), _outcome(readings=3, mid=2)
    b.add(first, now=50.0)
    b.add(second, now=50.5)

    batch = b.take()

    assert isinstance(batch, Batch)
    assert batch.outcomes == [first, second]
    assert len(batch) == 2
    assert batch.readings == 5
    assert batch.opened_at == 50.0
    assert b.empty
    assert b.due_at() is None
    assert not b.ready(1e9)

    # The next batch opens with its own first message.
    b.add(_outcome(readings=1), now=70.0)
    assert b.due_at() == 71.0
    assert b.take().readings == 1


def test_take_of_an_empty_batcher_gives_an_empty_batch() -> None:
    batch = Batcher(max_messages=1, max_readings=1, max_age=1.0).take()

    assert len(batch) == 0
    assert batch.readings == 0
    assert not batch.redelivered


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([False], False),
        ([False, False, False], False),
        ([True], True),
        ([False, True, False], True),
    ],
)
def test_batch_redelivered(flags: list[bool], expected: bool) -> None:
    b = Batcher(max_messages=100, max_readings=100, max_age=1.0)
    for i, flag in enumerate(flags):
        b.add(_outcome(redelivered=flag, mid=i + 1), now=1.0)

    assert b.take().redelivered is expected
