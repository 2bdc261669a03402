"""Daily patterns of a Hanoi street: what each kind of device reads at a given time of the fleet clock.

Pure functions of (device, fleet time, random source). The fleet clock is read in Asia/Ho_Chi_Minh
time because that is the day the city lives by: rush hours around 07:30 and 17:45, street lights
from dusk to dawn, PM2.5 that piles up at the morning rush and under the night-time inversion, and
afternoon thunderstorms in short bursts. Normal values stay below the alert thresholds of
``faults.ALERT_THRESHOLDS`` so that alerts in a demo come from the ``spike`` fault, not from noise.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

__all__ = [
    "HANOI",
    "RAIN_BLOCK_SECONDS",
    "local_hour",
    "rain_mm",
    "readings_of",
    "rush",
]

HANOI = ZoneInfo("Asia/Ho_Chi_Minh")
RAIN_BLOCK_SECONDS = 1800  # a shower is decided per district and half hour: rain comes in bursts
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Value = float | bool


def local_hour(t: datetime) -> float:
    """Hour of the day in Hanoi, 0 <= h < 24, with minutes and seconds as the fraction."""
    local = t.astimezone(HANOI)
    return local.hour + local.minute / 60 + local.second / 3600


def _bump(h: float, center: float, width: float) -> float:
    """A bell around ``center`` o'clock on the 24-hour circle (23:00 is near 01:00), peak 1."""
    d = abs(h - center) % 24
    d = min(d, 24 - d)
    return math.exp(-((d / width) ** 2))


def rush(h: float) -> float:
    """Commuter traffic: the morning and the evening rush hour, 0..1."""
    return max(_bump(h, 7.75, 1.3), _bump(h, 17.75, 1.5))


def _daytime(h: float) -> float:
    return _bump(h, 13.0, 4.5)


def _night_inversion(h: float) -> float:
    # A shallow boundary layer on calm nights traps particles near the ground.
    return _bump(h, 23.0, 3.0)


def _block_peak(seed: int, district: str, block: int) -> float:
    """Peak rain (mm per 5 minutes) of one half-hour block of one district, 0 when it is dry.

    Seeded by a string, which random.Random hashes deterministically (unlike hash()), so every gauge
    of a district sees the same shower and the same seed gives the same weather.
    """
    rng = random.Random(f"{seed}/rain/{district}/{block}")
    start = datetime.fromtimestamp(block * RAIN_BLOCK_SECONDS, UTC)
    chance = 0.10 + 0.30 * _bump(local_hour(start), 16.0, 2.5)  # afternoon thunderstorms
    if rng.random() >= chance:
        return 0.0
    return rng.uniform(0.5, 8.0)


def rain_mm(seed: int, district: str, t: datetime) -> float:
    """Rain of the last 5 minutes at ``t``: a shower rises and falls within its half hour."""
    seconds = (t - _EPOCH).total_seconds()
    block = math.floor(seconds / RAIN_BLOCK_SECONDS)
    frac = (seconds - block * RAIN_BLOCK_SECONDS) / RAIN_BLOCK_SECONDS
    return _block_peak(seed, district, block) * math.sin(math.pi * frac)


def _recent_rain(seed: int, district: str, t: datetime) -> float:
    """Rain of the last two hours, weighted by age: the water level lags the rain (runoff)."""
    block = math.floor((t - _EPOCH).total_seconds() / RAIN_BLOCK_SECONDS)
    weights = (1.0, 0.7, 0.4, 0.2)
    return sum(w * _block_peak(seed, district, block - i) for i, w in enumerate(weights))


def _noisy(rng: random.Random, value: float, spread: float) -> float:
    """``value`` times a log-normal factor: sensor readings scatter in proportion to their size."""
    return value * math.exp(rng.gauss(0.0, spread))


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def readings_of(
    kind: str,
    *,
    t: datetime,
    rng: random.Random,
    seed: int,
    district: str,
    scale: float,
    base_level_cm: float = 0.0,
    flood_level_cm: float = 0.0,
    light_offset_h: float = 0.0,
) -> dict[str, Value]:
    """The readings of a device of ``kind`` at fleet time ``t`` (without a smart meter's energy).

    ``scale`` makes devices of one kind differ (a busy junction, a quiet lane); the other keyword
    arguments are the device's own constants (see fleet.Device).
    """
    h = local_hour(t)
    if kind == "air_quality":
        washout = 1.0 - 0.5 * min(1.0, rain_mm(seed, district, t) / 4.0)  # rain scrubs particles
        pm25 = _clamp(_noisy(rng, scale * washout * (18 + 45 * _bump(h, 7.5, 1.5) + 35 * _night_inversion(h)
                                                     + 10 * rush(h)), 0.12), 2.0, 250.0)
        temperature = 24 + 5 * math.cos(2 * math.pi * (h - 15) / 24) + rng.gauss(0.0, 0.3)
        return {
            "pm25": round(pm25, 1),
            "pm10": round(_clamp(pm25 * rng.uniform(1.4, 1.9), 3.0, 400.0), 1),
            "no2": round(_noisy(rng, scale * (20 + 50 * rush(h) + 10 * _daytime(h)), 0.1), 1),
            "o3": round(_noisy(rng, scale * (15 + 85 * _bump(h, 14.0, 3.0)), 0.1), 1),  # sunlight makes ozone
            "co": round(_noisy(rng, 0.4 + 1.4 * rush(h), 0.1), 2),
            "temperature": round(temperature, 1),
            "humidity": round(_clamp(95 - 2.2 * (temperature - 19) + rng.gauss(0.0, 1.0), 35.0, 100.0), 1),
        }
    if kind == "noise":
        level = 48 + 24 * rush(h) + 8 * _daytime(h) + (scale - 1) * 20 + rng.gauss(0.0, 1.5)
        return {"laeq_db": round(_clamp(level, 35.0, 88.0), 1)}
    if kind == "water_level":
        level = base_level_cm + 6 * _recent_rain(seed, district, t) + rng.gauss(0.0, 0.8)
        level = _clamp(level, 0.0, flood_level_cm - 5)
        return {"level_cm": round(level, 1), "flood": level >= flood_level_cm}
    if kind == "rain":
        amount = rain_mm(seed, district, t)
        return {"rain_mm": round(_clamp(_noisy(rng, amount, 0.05), 0.0, 15.0), 1) if amount > 0.05 else 0.0}
    if kind == "traffic":
        vehicles = _noisy(rng, scale * (6 + 110 * rush(h) + 45 * _daytime(h)), 0.1)
        return {"vehicles": float(round(_clamp(vehicles, 0.0, 350.0)))}
    if kind == "smart_meter":
        # Households: breakfast, then air conditioning and cooking in the evening.
        power = scale * (250 + 900 * _bump(h, 7.0, 1.2) + 2200 * _bump(h, 20.0, 2.0) + 500 * _daytime(h))
        return {"power_w": round(_clamp(_noisy(rng, power, 0.08), 50.0, 8000.0), 1)}
    if kind == "street_light":
        # Each lamp's photocell switches a little earlier or later than its neighbours.
        hl = (h - light_offset_h) % 24
        on = hl >= 18 or hl < 6
        if not on:
            dimming = 0.0
        elif hl >= 23 or hl < 5:
            dimming = 50.0  # dimmed in the dead of night to save energy
        elif hl < 6:
            dimming = 80.0
        else:
            dimming = 100.0
        return {"on": on, "dimming_pct": dimming}
    raise KeyError(f"unknown device kind {kind!r}")
