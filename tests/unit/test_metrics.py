"""HoldTimer: the seconds the data path was held back, overlapping reasons counted once."""

from __future__ import annotations

from ingest.metrics import HoldTimer, Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_overlapping_reasons_count_once_and_flush_moves_the_total_during_a_hold() -> None:
    clock, added = Clock(), []
    timer = HoldTimer(added.append, clock)
    timer.hold("broker connection suspended")
    clock.now += 2
    timer.hold("write queue full")  # overlaps: adds no time of its own
    clock.now += 3
    timer.flush()  # a long outage shows while it lasts
    assert sum(added) == 5
    timer.release("write queue full")
    clock.now += 1
    assert timer.reasons == {"broker connection suspended"}
    timer.release("broker connection suspended")
    assert sum(added) == 6
    clock.now += 10  # nothing held: nothing counted
    timer.flush()
    timer.release("never held")
    assert sum(added) == 6
    assert timer.reasons == frozenset()


def test_held_time_reaches_the_prometheus_counter() -> None:
    metrics = Metrics()
    clock = Clock()
    metrics.held = HoldTimer(metrics.backpressure.inc, clock)  # the wiring of Metrics, on a test clock
    metrics.held.hold("receive window full")
    clock.now += 2.5
    metrics.held.release("receive window full")
    value = metrics.registry.get_sample_value("sensor_ingest_backpressure_seconds_total")
    assert value == 2.5
