"""The message shapes of issue #17's drain targets, and how a stored reading names its message.

Three shapes, each a gateway or sensor of a kind a city runs, all through the metric catalog:

- ``senml1``: a SenML pack (RFC 8428, JSON) of one record, a temperature in ``Cel``:
  ``[{"bn":"<device>:","bt":<epoch>,"n":"temperature","u":"Cel","v":21.5}]``.
- ``json5``: a native message (this project's JSON, ingest.wire) of 5 readings: temperature in degF
  (converted to degC), humidity (bare, the catalog's %), pressure in hPa, pm2_5 in ug/m3, pm10 (bare).
- ``senml50``: a SenML pack of 50 records: 10 samples, 1 ms apart (``t`` 0 to 0.009), of the five
  metrics above in their SenML units (Cel, %RH, hPa, ug/m3).

The device is the pack's ``bn`` (without its one trailing ':') and the topic's ``{device}`` both, so
the SenML decoder checks the one against the other (ingest.decoders.senml). Every metric is one the
catalog binds (ingest.catalog.quantities): each reading is unit-checked, converted where needed and
range-checked.

A stored reading names its message through its time, since a SenML record has nowhere else to carry a
sequence number: message ``seq`` of a publisher process has the time ``base + seq * 10 ms``, its
``j``-th sample ``j`` ms after that (j < 10), so ``round((time - base) / 1 ms) // 10`` is ``seq`` and
the device names the process. ``base`` is a whole second chosen by the runner in the past (all
readings are older than alerts.lateness, so the write path judges them in the batch, and none is
ahead of the receive time).

Temperatures stay between 20.0 and 27.9 degC, except every 997th message of a process (so the devices
vary), whose first sample is 50.0 degC: above every threshold of the runner's 20 rules (30 to 49
degC), which that device's next sample (or next message) resolves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["SHAPES", "SPIKE_DEGC", "STEP_MS", "Shape", "message_key", "message_time"]

STEP_MS = 10  # ms between the times of consecutive messages of one publisher process
SAMPLES = 10  # samples per metric in a senml50 pack, 1 ms apart (< STEP_MS)
SPIKE_EVERY = 997  # a prime, so the spikes land on different devices (seq % 500 varies)
SPIKE_DEGC = 50.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def message_time(base: float, seq: int, sample: int = 0) -> float:
    """Epoch seconds of sample ``sample`` of message ``seq``."""
    return base + (seq * STEP_MS + sample) / 1000


def message_key(base: float, t: float) -> int:
    """The ``seq`` of the message a reading at epoch seconds ``t`` belongs to (inverse of message_time)."""
    return round((t - base) * 1000) // STEP_MS


def _temperature(seq: int, sample: int = 0) -> float:
    if sample == 0 and seq % SPIKE_EVERY == 0:
        return SPIKE_DEGC
    return round(20 + (seq + sample) % 80 / 10, 1)


def _others(seq: int, sample: int) -> dict[str, float]:
    k = seq + sample
    return {"humidity": float(40 + k % 50), "pressure": float(1000 + k % 20), "pm2_5": float(10 + k % 90),
            "pm10": float(20 + k % 120)}


def _senml1(uid: str, seq: int, base: float) -> bytes:
    record = {"bn": f"{uid}:", "bt": message_time(base, seq), "n": "temperature", "u": "Cel", "v": _temperature(seq)}
    return json.dumps([record], separators=(",", ":")).encode()


_SENML_UNITS = {"temperature": "Cel", "humidity": "%RH", "pressure": "hPa", "pm2_5": "ug/m3", "pm10": "ug/m3"}


def _senml50(uid: str, seq: int, base: float) -> bytes:
    records: list[dict[str, object]] = []
    for j in range(SAMPLES):
        values = {"temperature": _temperature(seq, j), **_others(seq, j)}
        for metric, value in values.items():
            record: dict[str, object] = {"n": metric, "u": _SENML_UNITS[metric], "v": value}
            if j:
                record["t"] = j / 1000
            records.append(record)
    records[0] = {"bn": f"{uid}:", "bt": message_time(base, seq), **records[0]}
    return json.dumps(records, separators=(",", ":")).encode()


def _json5(uid: str, seq: int, base: float) -> bytes:
    o = _others(seq, 0)
    at = _EPOCH + timedelta(milliseconds=seq * STEP_MS) + timedelta(seconds=base)
    readings = {
        "temperature": {"value": round(_temperature(seq) * 9 / 5 + 32, 2), "unit": "degF"},
        "humidity": o["humidity"],
        "pressure": {"value": o["pressure"], "unit": "hPa"},
        "pm2_5": {"value": o["pm2_5"], "unit": "ug/m3"},
        "pm10": o["pm10"],
    }
    return json.dumps({"device": uid, "time": at.isoformat(), "readings": readings}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Shape:
    name: str
    format: str  # the service's source format
    suffix: str  # last topic level: <prefix>/<device>/<suffix>
    readings: int  # per message
    payload: Callable[[str, int, float], bytes]  # (device uid, seq, base) -> bytes


SHAPES = {
    "senml1": Shape("senml1", "senml", "senml", 1, _senml1),
    "json5": Shape("json5", "native", "up", 5, _json5),
    "senml50": Shape("senml50", "senml", "senml", 5 * SAMPLES, _senml50),
}
