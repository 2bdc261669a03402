"""Pure batching: outcomes accumulate until the batch is big enough or old enough to write."""

from __future__ import annotations

from dataclasses import dataclass, field

from ingest.process import Outcome

__all__ = ["Batch", "Batcher"]


@dataclass(slots=True)
class Batch:
    outcomes: list[Outcome] = field(default_factory=list)
    readings: int = 0
    opened_at: float = 0.0  # monotonic seconds of the first message

    def __len__(self) -> int:
        return len(self.outcomes)

    @property
    def redelivered(self) -> bool:
        return any(o.message.redelivered for o in self.outcomes)


class Batcher:
    def __init__(self, max_messages: int, max_readings: int, max_age: float) -> None:
        self.max_messages = max_messages
        self.max_readings = max_readings
        self.max_age = max_age
        self._batch = Batch()

    def add(self, outcome: Outcome, now: float) -> None:
        b = self._batch
        if not b.outcomes:
            b.opened_at = now
        b.outcomes.append(outcome)
        b.readings += len(outcome.readings)

    @property
    def empty(self) -> bool:
        return not self._batch.outcomes

    def full(self) -> bool:
        b = self._batch
        return len(b.outcomes) >= self.max_messages or b.readings >= self.max_readings

    def due_at(self) -> float | None:
        """Monotonic time at which the open batch must be written, or None when empty."""
        return None if not self._batch.outcomes else self._batch.opened_at + self.max_age

    def ready(self, now: float) -> bool:
        due = self.due_at()
        return due is not None and (self.full() or now >= due)

    def take(self) -> Batch:
        b, self._batch = self._batch, Batch()
        return b
