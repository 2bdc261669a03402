"""The decoder seam: bytes in, readings out.

A decoder is a pure function ``(payload, context) -> Decoded``. It raises DecodeError when the payload
as a whole cannot be read (not JSON, wrong shape, device mismatch); it reports parts it had to skip
(one bad record of a pack) as ``problems`` and still returns the good readings. It never does I/O and
never reads the clock: the receive time comes in the context.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from ingest.decoders.mapping import EMPTY, SourceMapping
from ingest.model import Reading, Rejection

__all__ = ["DecodeContext", "Decoded", "Decoder"]


@dataclass(slots=True)  # not frozen: built once per message, and a frozen __init__ costs 3x
class DecodeContext:
    """What a decoder knows besides the payload.

    device:      the topic's {device} capture, verbatim, or None when the topic template has none.
                 When it is set, a payload that names a different device is rejected
                 (reason "device_mismatch"): a device may not speak for another.
    captures:    every capture of the topic template ({device}, {metric}, {gateway}, ...).
    received_at: when the service received the message (timezone-aware, UTC); the time of readings
                 whose payload carries no time of its own (flagged FLAG_RECEIVE_TIME).
    timezone:    the zone of timestamps written without an offset; None means such timestamps are
                 rejected (reason "bad_time"), because guessing a zone shifts every reading.
    options:     the source's format options (``options = {...}`` in its [[sources]] entry), validated
                 at start-up and completed with their defaults.
    mapping:     the source's mapping (ingest.decoders.mapping): decoders ask it what a string leaf
                 is, and read its time_field / device_field; the rest is applied after decoding.
    max_depth:   JSON nested deeper is refused (reason too_deep) before it is parsed.
    max_readings: a payload holding more readings is refused (reason too_many_readings) as soon as
                 that can be counted, before the readings are validated one by one.
    fallback_device: the device of a payload that names none when the topic has no {device} either
                 (`sensor-ingest decode` without a config: the whole topic). Never checked against
                 the payload's, unlike ``device``.
    device_level: the index of the topic level the {device} capture came from, when known.
    max_lines:   a line protocol payload of more point lines is refused (reason too_many_lines).
    """

    topic: str
    received_at: datetime
    device: str | None = None
    captures: Mapping[str, str] = field(default_factory=dict)
    timezone: tzinfo | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    mapping: SourceMapping = EMPTY
    max_depth: int = 32
    max_readings: int = 2000
    fallback_device: str | None = None
    device_level: int | None = None
    max_lines: int = 2000


@dataclass(frozen=True, slots=True)
class Decoded:
    """What a decoder made of one payload.

    readings: the values to store.
    problems: parts of the payload that were skipped, each with a reason and detail.
    ignored:  leaves that are not readings (ids, versions), counted, not stored.
    skipped:  set when the message is, by design, not a carrier of readings (a LoRaWAN join event, an
              uplink its network server did not decode): it is counted under this reason and
              acknowledged, not stored as a rejection. Only meaningful when there are no readings.
    """

    readings: list[Reading]
    problems: list[Rejection] = field(default_factory=list)
    ignored: int = 0
    skipped: str | None = None


Decoder = Callable[[bytes, DecodeContext], Decoded]
