"""Values that flow through the pipeline. Frozen, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

__all__ = [
    "FLAG_RECEIVE_TIME",
    "FLAG_SUSPECT",
    "Clock",
    "RawMessage",
    "Reading",
    "Rejection",
    "utc_now",
]

# readings.flags bits: the reading is kept but a consumer should know this about it.
FLAG_SUSPECT = 1  # implausible but possible value (outside the metric's plausible range)
FLAG_RECEIVE_TIME = 2  # the payload carried no usable time: the service's receive time was used

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message as it arrived, before any decoding.

    ``mid`` and ``epoch`` identify it for the acknowledgement: a message is acknowledged only on the
    broker connection (epoch) it arrived on. ``seq`` is its arrival position on that connection.
    """

    topic: str
    payload: bytes
    received_at: datetime
    qos: int = 1
    mid: int = 0
    epoch: int = 0
    seq: int = 0
    redelivered: bool = False
    # The subscription identifiers the broker sent it for, when the service subscribed with them
    # (overlapping filters, see ingest.mqtt); () otherwise.
    subscriptions: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Reading:
    """One decoded value of one metric of one device at one time.

    ``value`` is a float for numbers, a bool for booleans (stored as 1/0) and a str only when it
    came from an explicit string slot (SenML ``vs``, a text value-per-topic payload): those are
    stored in ``states``. ``time`` is always timezone-aware; ``flags`` uses the FLAG_* bits.
    """

    device: str
    metric: str
    time: datetime
    value: float | bool | str
    unit: str | None = None
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message (or some of its readings) was not stored, kept with the raw bytes."""

    reason: str
    detail: str
    device: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
