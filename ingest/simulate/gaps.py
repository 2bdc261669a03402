"""Scripted losses and backfill windows of the simulated fleet: what a data-quality check must find (pure).

- ``--gap DEVICE:FROM-TO``: a device silent for a window, given as durations from the start of the
  run or as RFC 3339 times (``DEVICE:FROM..TO``);
- ``--drop P``: each message lost with probability P, from a random stream of its own;
- ``--backfill``: a past window cut into buckets of ``--interval`` aligned to the Unix epoch, each device
  timed once per bucket at its own fixed phase, so the completeness a script implies is exact.

Every message is generated before the script decides whether it goes out, and the drop stream is drawn
once per message whatever the gaps say: a gap or a drop rate therefore changes no value, fault or
drop decision of the other messages.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from ingest.alerts.model import parse_duration

__all__ = ["Gap", "GapSpec", "Script", "Skip", "Window", "parse_gap", "parse_time"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

Skip = Literal["gap", "dropped"]
Bound = timedelta | datetime


def parse_time(text: str) -> datetime:
    """An RFC 3339 time with its offset (``Z`` or ``+07:00``), as UTC; ValueError otherwise."""
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time such as 2026-11-25T07:00:00+07:00") from None
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; add Z or +hh:mm")
    return when.astimezone(UTC)


def _bound(text: str) -> Bound:
    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration from the start of the run (10m, 1.5h) nor an "
                         "RFC 3339 time with an offset (2026-11-25T07:00:00+07:00)") from None


@dataclass(frozen=True, slots=True)
class Gap:
    """``device`` publishes nothing timed in [start, end)."""

    device: str
    start: datetime
    end: datetime

    def covers(self, device: str, t: datetime) -> bool:
        return device == self.device and self.start <= t < self.end


@dataclass(frozen=True, slots=True)
class GapSpec:
    """A gap as written: each bound a duration from the run's start or an absolute time."""

    device: str
    start: Bound
    end: Bound
    text: str

    def resolve(self, origin: datetime) -> Gap:
        """The gap of a run that starts at ``origin``; ValueError when it would be empty."""
        start = origin + self.start if isinstance(self.start, timedelta) else self.start
        end = origin + self.end if isinstance(self.end, timedelta) else self.end
        if end <= start:
            raise ValueError(f"{self.text!r}: the gap would end ({end.isoformat()}) before it starts "
                             f"({start.isoformat()})")
        return Gap(self.device, start, end)


def parse_gap(text: str) -> GapSpec:
    """``DEVICE:FROM-TO`` (durations) or ``DEVICE:FROM..TO`` (durations or RFC 3339 times).

    Device ids hold neither ``:`` nor ``@`` (``@`` is accepted in place of ``:``); times hold ``-``,
    hence ``..`` between them. ValueError with the accepted forms.
    """
    cut = min((i for i in (text.find(":"), text.find("@")) if i >= 0), default=-1)
    device, rest = (text[:cut].strip(), text[cut + 1:].strip()) if cut >= 0 else ("", "")
    if not device or not rest:
        raise ValueError(f"{text!r}: write DEVICE:FROM-TO, e.g. hn-aq-0001:10m-40m, or DEVICE:FROM..TO with "
                         "RFC 3339 times, e.g. hn-aq-0001:2026-11-25T07:00+07:00..2026-11-25T08:00+07:00")
    if ".." in rest:
        first, _, last = rest.partition("..")
    elif rest.count("-") == 1:
        first, _, last = rest.partition("-")
    else:
        raise ValueError(f"{text!r}: separate the bounds with '..' (FROM-TO is for durations only, e.g. 10m-40m)")
    spec = GapSpec(device, _bound(first), _bound(last), text)
    # Bounds of one kind can be checked now; a duration against a time only once the run's start is known.
    if isinstance(spec.start, timedelta) == isinstance(spec.end, timedelta):
        try:
            spec.resolve(_EPOCH)
        except ValueError:
            raise ValueError(f"{text!r}: TO must come after FROM") from None
    return spec


class Script:
    """Decides for each generated message whether it is published, skipped by a gap, or dropped."""

    def __init__(self, gaps: Iterable[Gap], *, drop: float, seed: int) -> None:
        if not 0.0 <= drop <= 1.0:
            raise ValueError(f"drop rate {drop} is not a probability between 0 and 1")
        self.drop = drop
        self._gaps: dict[str, list[Gap]] = {}
        for gap in gaps:
            self._gaps.setdefault(gap.device, []).append(gap)
        self._rng = random.Random(f"{seed}/drop")

    def verdict(self, device: str, t: datetime) -> Skip | None:
        """None to publish the message of ``device`` timed ``t``; else why it is not."""
        lost = self._rng.random() < self.drop  # drawn for every message: gaps do not shift the stream
        if any(g.covers(device, t) for g in self._gaps.get(device, ())):
            return "gap"
        return "dropped" if lost else None


@dataclass(frozen=True, slots=True)
class Window:
    """A backfill: [start, end) in buckets of ``interval_ms``, both ends on multiples of it since the epoch."""

    start: datetime
    end: datetime
    interval_ms: int

    @classmethod
    def ending(cls, end: datetime, duration_s: float, interval_s: float) -> Window:
        """The window of ``duration_s`` before ``end``: end floored to the interval, then start floored."""
        step = round(interval_s * 1000)
        if step < 1000 or abs(step - interval_s * 1000) > 1e-6:
            raise ValueError(f"interval {interval_s:g} s: use at least 1 s, in whole milliseconds")
        if not duration_s > 0:
            raise ValueError("a backfill needs a duration above 0, e.g. 2h")
        end_ms = _ms(end) // step * step
        start_ms = (end_ms - round(duration_s * 1000)) // step * step
        return cls(_EPOCH + start_ms * _MS, _EPOCH + end_ms * _MS, step)

    @property
    def interval(self) -> timedelta:
        return self.interval_ms * _MS

    @property
    def intervals(self) -> int:
        """Buckets in the window: each device's expected message count."""
        return (_ms(self.end) - _ms(self.start)) // self.interval_ms

    def phase_ms(self, seed: int, device: str) -> int:
        """The device's fixed offset into each bucket: whole ms in [1, interval / 2), from the seed.

        Never 0, so no message sits on a bucket boundary, and below half a bucket, so a clock that
        rounds to the nearest bucket still puts it in its own.
        """
        return random.Random(f"{seed}/phase/{device}").randrange(1, (self.interval_ms + 1) // 2)

    def slots(self, seed: int, devices: Sequence[str]) -> Iterator[tuple[str, datetime]]:
        """(device, time) of every message, in time order: bucket by bucket, each device once per bucket."""
        phased = sorted((self.phase_ms(seed, uid), uid) for uid in devices)
        for k in range(self.intervals):
            base = self.start + k * self.interval
            for phase, uid in phased:
                yield uid, base + phase * _MS


def _ms(t: datetime) -> int:
    return (t - _EPOCH) // _MS
