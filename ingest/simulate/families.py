"""Payload families of the simulated fleet: one encoder function each, and the sources they need.

A family is what a make of device publishes: a payload encoding and a topic convention. The fleet
publishes family ``F`` of a device ``uid`` in district ``d`` on ``<prefix>/<d>/<uid>/<suffix>``, and
the service reads it with a source ``<prefix>/{district}/{device}/<suffix>`` of format ``F``.

Adding a family (tasmota, z2m, lorawan, line, value, as their decoders land) is one encoder here and
one line in FAMILIES; the fleet spreads its devices over every registered family.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ingest.simulate.patterns import HANOI

__all__ = [
    "FAMILIES",
    "Family",
    "Sample",
    "encode_native",
    "encode_senml",
    "source_name",
    "source_template",
    "sources_toml",
    "topic",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SampleValue = float | bool | str


@dataclass(frozen=True, slots=True)
class Sample:
    """What one device says at one time, before it is encoded.

    ``values`` holds (metric, value, unit or None). A str value is never a reading of the fleet: only
    the ``wrong-type`` fault puts one there, and the encoders write it where the number belongs.
    """

    device: str
    time: datetime
    values: tuple[tuple[str, SampleValue, str | None], ...]


Encoder = Callable[[Sample], bytes]


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    format: str  # the service's decoder format that reads it
    suffix: str  # last topic level
    encode: Encoder


def _dumps(body: Any) -> bytes:
    # allow_nan: the NaN / Infinity faults rely on json writing those (invalid JSON) literals.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode()


def encode_native(sample: Sample) -> bytes:
    """This project's JSON: the map form, local time with its offset and milliseconds."""
    readings: dict[str, Any] = {}
    for metric, value, unit in sample.values:
        readings[metric] = {"value": value, "unit": unit} if unit else value
    return _dumps({
        "device": sample.device,
        "time": sample.time.astimezone(HANOI).isoformat(timespec="milliseconds"),
        "readings": readings,
    })


def encode_senml(sample: Sample) -> bytes:
    """RFC 8428 SenML JSON: bn = "<uid>:", bt = epoch seconds with milliseconds, one record a metric.

    A bt below 2**28 (1978) means "relative to now" in SenML: a clock stuck in 1970 thus reads as
    a time far in the future, which the service rejects as bad_time all the same.
    """
    records: list[dict[str, Any]] = []
    for metric, value, unit in sample.values:
        record: dict[str, Any] = {"n": metric}
        if unit:
            record["u"] = unit
        record["vb" if isinstance(value, bool) else "v"] = value
        records.append(record)
    bt = round((sample.time - _EPOCH).total_seconds(), 3)
    records[0] = {"bn": f"{sample.device}:", "bt": bt, **records[0]}
    return _dumps(records)


FAMILIES: dict[str, Family] = {
    "native": Family("native", "native", "up", encode_native),
    "senml": Family("senml", "senml", "senml", encode_senml),
}


def topic(prefix: str, district_slug: str, uid: str, family: str) -> str:
    return f"{prefix}/{district_slug}/{uid}/{FAMILIES[family].suffix}"


def source_template(prefix: str, family: str) -> str:
    return f"{prefix}/{{district}}/{{device}}/{FAMILIES[family].suffix}"


def source_name(prefix: str, family: str) -> str:
    """``<prefix>-<family>``: distinct from the names of the example config's sources."""
    return f"{prefix.replace('/', '-')}-{family}"[-64:]


def sources_toml(prefix: str, families: tuple[str, ...] | None = None) -> str:
    """The [[sources]] an ingest config needs to read the fleet published under ``prefix``."""
    lines = [f"# sources for `sensor-ingest simulate --prefix {prefix}`"]
    for name in families or tuple(FAMILIES):
        lines += [
            "",
            "[[sources]]",
            f"name = {json.dumps(source_name(prefix, name))}",
            f"topic = {json.dumps(source_template(prefix, name))}",
            f"format = {json.dumps(FAMILIES[name].format)}",
        ]
    return "\n".join(lines) + "\n"
