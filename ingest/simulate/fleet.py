"""The simulated city fleet: its devices, built from a seed, and the messages they publish.

Pure: no sockets, no clock of its own. ``build_fleet(seed, size)`` gives the same devices for the
same arguments; ``Simulator`` turns (wall time, fleet time) into messages, and the same seed with
the same sequence of times gives the same messages.

Two clocks, on purpose:
- the *fleet clock* (``FleetClock``: a start and a speed) drives the daily pattern, so a demo can
  live through a Hanoi day in minutes;
- a message's *timestamp* is the wall-clock time it is sent. The service rejects readings timed
  more than ingest.max_future (600 s) ahead of their receive time or before ingest.earliest_time,
  so timestamps that followed a sped-up fleet clock would turn into rejections within seconds.
A backfill (``Simulator.message_at``) is the exception: it publishes a past window, so both clocks
are the message's own time there (gaps.Window says which times).
A device's timestamps are in whole milliseconds and strictly increasing, so no two of its messages
share the service's unique key (device, metric, time).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ingest.simulate.families import FAMILIES, Sample, SampleValue, topic
from ingest.simulate.faults import (
    FaultConfig,
    choose_fault,
    spike_values,
    spoil_clock,
    spoil_payload,
    spoil_values,
)
from ingest.simulate.patterns import readings_of

__all__ = [
    "DEFAULT_DEVICES",
    "DISTRICTS",
    "KINDS",
    "Device",
    "District",
    "FleetClock",
    "KindSpec",
    "SimMessage",
    "Simulator",
    "build_fleet",
]


@dataclass(frozen=True, slots=True)
class District:
    name: str
    slug: str  # its topic level


DISTRICTS = tuple(
    District(name, name.lower().replace(" ", "-"))
    for name in ("Hoan Kiem", "Ba Dinh", "Dong Da", "Hai Ba Trung", "Cau Giay",
                 "Tay Ho", "Long Bien", "Hoang Mai", "Thanh Xuan", "Ha Dong")
)


@dataclass(frozen=True, slots=True)
class KindSpec:
    name: str
    code: str  # the middle part of the device uid: hn-<code>-0001
    metrics: tuple[tuple[str, str | None], ...]  # (metric, unit); None for booleans


KINDS: dict[str, KindSpec] = {k.name: k for k in (
    KindSpec("air_quality", "aq", (("pm25", "ug/m3"), ("pm10", "ug/m3"), ("no2", "ug/m3"), ("o3", "ug/m3"),
                                   ("co", "mg/m3"), ("temperature", "Cel"), ("humidity", "%RH"))),
    KindSpec("noise", "noise", (("laeq_db", "dB"),)),
    KindSpec("water_level", "water", (("level_cm", "cm"), ("flood", None))),
    KindSpec("rain", "rain", (("rain_mm", "mm"),)),
    KindSpec("traffic", "traffic", (("vehicles", "count"),)),
    KindSpec("smart_meter", "meter", (("energy_kwh", "kWh"), ("power_w", "W"))),
    KindSpec("street_light", "light", (("on", None), ("dimming_pct", "%"))),
)}
DEFAULT_DEVICES = 10 * len(KINDS)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Device:
    uid: str
    kind: str
    district: District
    family: str
    scale: float = 1.0  # a busy junction or a quiet lane
    base_level_cm: float = 0.0  # water_level: dry-weather level
    flood_level_cm: float = 0.0  # water_level: the level at which the street floods
    energy_start_kwh: float = 0.0  # smart_meter: the register when the simulation starts
    light_offset_h: float = 0.0  # street_light: its photocell's switching offset


def build_fleet(seed: int, size: int = DEFAULT_DEVICES, families: Sequence[str] | None = None) -> list[Device]:
    """``size`` devices, deterministic in (seed, size, families).

    Kinds take turns (device i is of kind i mod 7), and within a kind the families take turns, so a
    fleet of 7 x (number of families) devices or more has every kind in every family. A kind's
    devices walk through the districts from a seeded start, so each district gets every kind.
    """
    if size < 1:
        raise ValueError("a fleet needs at least one device")
    names = list(families or FAMILIES)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown payload family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
    rng = random.Random(seed)
    kinds = list(KINDS.values())
    start = {k.name: rng.randrange(len(DISTRICTS)) for k in kinds}
    devices: list[Device] = []
    for i in range(size):
        kind = kinds[i % len(kinds)]
        n = i // len(kinds)  # this device's number among its kind, from 0
        flood = round(rng.uniform(180.0, 260.0), 0)
        devices.append(Device(
            uid=f"hn-{kind.code}-{n + 1:04d}",
            kind=kind.name,
            district=DISTRICTS[(start[kind.name] + n) % len(DISTRICTS)],
            family=names[n % len(names)],
            scale=round(rng.uniform(0.8, 1.25), 3),
            base_level_cm=round(rng.uniform(40.0, 110.0), 0) if kind.name == "water_level" else 0.0,
            flood_level_cm=flood if kind.name == "water_level" else 0.0,
            energy_start_kwh=round(rng.uniform(1000.0, 20000.0), 1) if kind.name == "smart_meter" else 0.0,
            light_offset_h=round(rng.uniform(-0.3, 0.3), 3) if kind.name == "street_light" else 0.0,
        ))
    return devices


@dataclass(frozen=True, slots=True)
class FleetClock:
    """Fleet time = ``start`` + (wall time - ``origin``) x ``speed``."""

    start: datetime
    origin: datetime
    speed: float = 1.0

    def at(self, wall: datetime) -> datetime:
        return self.start + (wall - self.origin) * self.speed


@dataclass(frozen=True, slots=True)
class SimMessage:
    topic: str
    payload: bytes
    family: str
    kind: str
    fault: str | None  # one of faults.MESSAGE_FAULTS, or None
    variant: str | None = None  # which kind of that fault (faults.BAD_PAYLOAD_VARIANTS, ...)
    device: str = ""
    time: datetime | None = None  # the timestamp written in the payload
    values: dict[str, SampleValue] = field(default_factory=dict)  # as meant, before any spoiling
    at: datetime | None = None  # the device's own time of the message: ``time`` before a bad-clock fault


@dataclass(slots=True)
class _DeviceState:
    energy_kwh: float
    last_fleet: datetime | None = None
    last_ms: int = -1
    sent: int = 0
    silent_after: int | None = None  # messages it sends before going quiet (the silent fault)


class Simulator:
    """Messages of a fleet: round-robin over the devices, so each device's messages are evenly spaced.

    Three random streams, all from the seed: values, faults, and the silent plan. Switching a fault on
    or off therefore leaves the values of the other messages as they were.
    """

    def __init__(self, devices: Sequence[Device], *, seed: int, prefix: str = "city",
                 faults: FaultConfig | None = None) -> None:
        self.devices = list(devices)
        self.seed = seed
        self.prefix = prefix
        self.faults = faults or FaultConfig()
        self._values = random.Random(f"{seed}/values")
        self._faults = random.Random(f"{seed}/faults")
        order = random.Random(f"{seed}/order")
        self._order = list(range(len(self.devices)))
        order.shuffle(self._order)  # neighbours in the list do not publish back to back
        self._next = 0
        self._state = {d.uid: _DeviceState(d.energy_start_kwh) for d in self.devices}
        self.silenced: list[str] = []  # in the order they went quiet
        if "silent" in self.faults.enabled:
            plan = random.Random(f"{seed}/silent")
            count = max(1, round(self.faults.rate * len(self.devices)))
            for device in plan.sample(self.devices, min(count, len(self.devices))):
                self._state[device.uid].silent_after = plan.randint(2, 10)

    @property
    def planned_silent(self) -> list[str]:
        """Devices that will go quiet (after their own number of messages)."""
        return [uid for uid, s in self._state.items() if s.silent_after is not None]

    def next_message(self, wall: datetime, fleet_time: datetime) -> SimMessage | None:
        """The next device's message, sent at ``wall``; None once every device has gone quiet."""
        for _ in range(len(self._order)):
            device = self.devices[self._order[self._next]]
            self._next = (self._next + 1) % len(self._order)
            if self._gone_silent(device):
                continue
            return self.message(device, wall, fleet_time)
        return None

    def message_at(self, device: Device, t: datetime) -> SimMessage | None:
        """``device``'s message timed ``t``, its values as at ``t`` (a backfill); None once it went silent."""
        return None if self._gone_silent(device) else self.message(device, t, t)

    def _gone_silent(self, device: Device) -> bool:
        state = self._state[device.uid]
        if state.silent_after is None or state.sent < state.silent_after:
            return False
        if device.uid not in self.silenced:
            self.silenced.append(device.uid)
        return True

    def message(self, device: Device, wall: datetime, fleet_time: datetime | None = None) -> SimMessage:
        """``device``'s message sent at ``wall``, its values as at ``fleet_time`` (default: ``wall``)."""
        fleet_time = wall if fleet_time is None else fleet_time
        state = self._state[device.uid]
        values = self._values_at(device, state, fleet_time)
        sent_ms = max(_ms(wall), state.last_ms + 1)  # strictly increasing: a unique key per message
        state.last_ms = sent_ms
        state.sent += 1
        when = _EPOCH + timedelta(milliseconds=sent_ms)

        choice = choose_fault(self._faults, self.faults)
        fault, variant = choice if choice else (None, None)
        if fault == "spike":
            spiked = spike_values(device.kind, values, self._faults, device.flood_level_cm)
            if spiked is None:
                fault = variant = None
            else:
                values = spiked
        sample = Sample(device.uid, when, tuple((m, values[m], u) for m, u in KINDS[device.kind].metrics))
        if fault == "bad-clock" and variant:
            sample = spoil_clock(sample, variant, self._faults)
        if fault == "bad-payload" and variant:
            sample = spoil_values(sample, variant)
        payload = FAMILIES[device.family].encode(sample)
        if fault == "bad-payload" and variant:
            payload = spoil_payload(payload, variant, self._faults)
        return SimMessage(
            topic=topic(self.prefix, device.district.slug, device.uid, device.family),
            payload=payload, family=device.family, kind=device.kind, fault=fault, variant=variant,
            device=device.uid, time=sample.time, values=values, at=when,
        )

    def _values_at(self, device: Device, state: _DeviceState, t: datetime) -> dict[str, SampleValue]:
        values: dict[str, SampleValue] = dict(readings_of(
            device.kind, t=t, rng=self._values, seed=self.seed, district=device.district.slug,
            scale=device.scale, base_level_cm=device.base_level_cm, flood_level_cm=device.flood_level_cm,
            light_offset_h=device.light_offset_h,
        ))
        if device.kind == "smart_meter":
            # The register only counts up: the energy of the fleet time since the last message.
            power = float(values["power_w"])
            if state.last_fleet is not None and t > state.last_fleet:
                state.energy_kwh += power * (t - state.last_fleet).total_seconds() / 3600 / 1000
            values = {"energy_kwh": round(state.energy_kwh, 3), **values}
        state.last_fleet = t if state.last_fleet is None else max(state.last_fleet, t)
        return values


def _ms(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(milliseconds=1)
