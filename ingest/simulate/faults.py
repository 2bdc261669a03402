"""Faults the simulated fleet can inject, each switched on separately, and what the service should make of them.

- ``bad-payload``: a message the service must reject with a reason: truncated JSON (``malformed``),
  NaN or Infinity literals (``not_finite``), numbers sent as strings (``wrong_type``), or a payload
  over 64 KiB (``too_large``). Every value of the message is spoiled the same way (an ADC that
  failed, firmware that quotes its numbers), so the message is rejected as a whole and each
  message is either stored or rejected, which keeps the counts exact.
- ``silent``: devices that stop publishing after a few messages (a dead battery, a stolen modem).
- ``spike``: a valid value above an alert threshold (PM2.5 over 300, a river over its flood
  level); the service must store it, and alert rules will fire on it.
- ``bad-clock``: timestamps from 1970 (a clock that lost its time) or a year ahead; rejected as
  ``bad_time`` (ingest.earliest_time / ingest.max_future).

``--fault-rate`` is the probability of each message fault per message; a message carries at most one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from ingest.simulate.families import Sample, SampleValue

__all__ = [
    "ALERT_THRESHOLDS",
    "BAD_CLOCK_VARIANTS",
    "BAD_PAYLOAD_VARIANTS",
    "EXPECTED_REASONS",
    "FAULTS",
    "MESSAGE_FAULTS",
    "OVERSIZE_BYTES",
    "FaultConfig",
    "choose_fault",
    "parse_faults",
    "spike_values",
    "spoil_clock",
    "spoil_payload",
    "spoil_values",
]

FAULTS = ("bad-payload", "silent", "spike", "bad-clock")
MESSAGE_FAULTS = ("bad-payload", "spike", "bad-clock")  # decided per message; silent per device
BAD_PAYLOAD_VARIANTS = ("truncated", "nan", "infinity", "wrong-type", "oversize")
BAD_CLOCK_VARIANTS = ("1970", "year-ahead")

# The rejection reason the service gives each variant (ingest.process / ingest.validate).
EXPECTED_REASONS = {
    "truncated": "malformed",
    "nan": "not_finite",
    "infinity": "not_finite",
    "wrong-type": "wrong_type",
    "oversize": "too_large",
    "1970": "bad_time",
    "year-ahead": "bad_time",
}

# Over ingest.max_message_bytes (64 KiB by default) and under Mosquitto's message_size_limit in
# deploy/mosquitto (twice as large, by design): it reaches the service and becomes a too_large row.
OVERSIZE_BYTES = 65536 + 1024

# Thresholds an operator would alert on, per kind: (metric, threshold). A water gauge's threshold
# is its own flood level (Device.flood_level_cm). Street lights have none: a spike there is a no-op.
ALERT_THRESHOLDS: dict[str, tuple[str, float]] = {
    "air_quality": ("pm25", 300.0),  # µg/m³: "hazardous" on the US AQI scale
    "noise": ("laeq_db", 90.0),
    "rain": ("rain_mm", 20.0),  # mm in 5 minutes: a cloudburst (240 mm/h)
    "traffic": ("vehicles", 400.0),  # per minute: a jam spilling over from the next junction
    "smart_meter": ("power_w", 10000.0),
}
_SPIKE_RANGES = {
    "pm25": (320.0, 650.0),
    "laeq_db": (96.0, 112.0),
    "rain_mm": (22.0, 40.0),
    "vehicles": (420.0, 650.0),
    "power_w": (11000.0, 18000.0),
}

_EARLY_SECONDS = (2 * 86400, 300 * 86400)  # a clock counting from 1970 since its last reset


@dataclass(frozen=True, slots=True)
class FaultConfig:
    enabled: frozenset[str] = frozenset()
    rate: float = 0.02

    def __post_init__(self) -> None:
        unknown = self.enabled - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {', '.join(sorted(unknown))}; known: {', '.join(FAULTS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate {self.rate} is not a probability between 0 and 1")

    @property
    def message_faults(self) -> tuple[str, ...]:
        return tuple(f for f in MESSAGE_FAULTS if f in self.enabled)


def parse_faults(text: str) -> frozenset[str]:
    """``"all"``, ``""`` / ``"none"`` or a comma list of FAULTS; ValueError naming the known ones."""
    text = text.strip()
    if text == "all":
        return frozenset(FAULTS)
    if text in ("", "none"):
        return frozenset()
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = names - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(sorted(unknown))}; choose from {', '.join(FAULTS)} or all")
    return frozenset(names)


def choose_fault(rng: random.Random, config: FaultConfig) -> tuple[str, str] | None:
    """(fault, variant) for the next message, or None. One draw, so faults never stack on a message.

    Each enabled message fault gets probability ``rate`` (at most 1/n when n are enabled).
    """
    faults = config.message_faults
    u = rng.random()
    if not faults or config.rate <= 0:
        return None
    index = int(u / min(config.rate, 1.0 / len(faults)))
    if index >= len(faults):
        return None
    fault = faults[index]
    if fault == "bad-payload":
        return fault, rng.choice(BAD_PAYLOAD_VARIANTS)
    if fault == "bad-clock":
        return fault, rng.choice(BAD_CLOCK_VARIANTS)
    return fault, "above-threshold"


def spike_values(
    kind: str, values: dict[str, SampleValue], rng: random.Random, flood_level_cm: float
) -> dict[str, SampleValue] | None:
    """``values`` with one value over its alert threshold, or None for a kind without one."""
    out = dict(values)
    if kind == "water_level":
        out["level_cm"] = round(flood_level_cm + rng.uniform(10.0, 70.0), 1)
        out["flood"] = True
        return out
    if kind not in ALERT_THRESHOLDS:
        return None
    metric, _ = ALERT_THRESHOLDS[kind]
    low, high = _SPIKE_RANGES[metric]
    out[metric] = float(round(rng.uniform(low, high))) if metric == "vehicles" else round(rng.uniform(low, high), 1)
    return out


def spoil_values(sample: Sample, variant: str) -> Sample:
    """The value-level bad payloads: every value NaN, Infinity, or a string."""
    def spoil(value: SampleValue) -> SampleValue:
        if variant == "nan":
            return float("nan")
        if variant == "infinity":
            return float("inf")
        if variant == "wrong-type":
            return str(value).lower()  # "35.2", "true": firmware that quotes what it sends
        return value

    return replace(sample, values=tuple((m, spoil(v), u) for m, v, u in sample.values))


def spoil_payload(payload: bytes, variant: str, rng: random.Random) -> bytes:
    """The byte-level bad payloads, applied after encoding."""
    if variant == "truncated":
        # A proper prefix of a JSON object or array is never valid JSON: a connection cut mid-send.
        return payload[: rng.randint(1, len(payload) - 1)]
    if variant == "oversize":
        # Valid JSON padded with whitespace: the size is the only thing wrong with it, so the
        # rejection can only be too_large.
        return payload + b" " * max(0, OVERSIZE_BYTES - len(payload))
    return payload


def spoil_clock(sample: Sample, variant: str, rng: random.Random) -> Sample:
    if variant == "1970":
        when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.uniform(*_EARLY_SECONDS))
    else:  # a year ahead: a clock set with the wrong year
        when = sample.time + timedelta(days=365, seconds=rng.uniform(0, 86400))
    return replace(sample, time=when.replace(microsecond=when.microsecond // 1000 * 1000))
