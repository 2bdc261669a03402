"""Worst-case processing time of one message: `python -m bench.worst` (part of `make bench`).

Processing (route, decode, validate) runs on the event loop, which also sends the acknowledgements
and answers /readyz. A publisher chooses its payloads, so the question is how long the largest and
most awkward message the limits let through holds the loop. Each case is a payload of at most
`ingest.max_message_bytes` (64 KiB by default) built to be expensive for one part of the work:
the most readings, the deepest nesting, the most brackets, strings that must be checked character
by character. Each is processed `--repeat` times through the real Processor with the default
settings; the median and the maximum are printed, beside `ingest.batch_max_age` (the time a batch
may wait), which a single message must stay well below.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ingest.model import RawMessage
from ingest.process import Processor
from ingest.settings import IngestSettings, Settings, SourceSettings

__all__ = ["cases", "main"]

NOW = datetime.now(UTC).replace(microsecond=0)
T = (NOW - timedelta(minutes=5)).isoformat()


def _fit(build: Callable[[int], bytes], limit: int) -> bytes:
    """The largest build(n) that fits in ``limit`` bytes (n found by bisection)."""
    lo, hi = 1, 1
    while len(build(hi)) <= limit:
        if hi > 1 << 20:  # build caps n itself (at max_readings): the whole payload fits
            return build(hi)
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(build(mid)) <= limit else (lo, mid)
    return build(lo)


def cases(limit: int, max_readings: int) -> dict[str, tuple[str, bytes]]:
    """name -> (topic, payload), each payload at most ``limit`` bytes."""
    n = max_readings
    return {
        # The most readings a message may hold, in each form, with long non-ASCII names (each name is
        # checked for control characters and surrogates).
        "native map, max readings": ("city/hk/hn-aq-0001/up", json.dumps(
            {"time": T, "readings": {f"nhiệt_độ_{i:05d}": i * 0.5 for i in range(n)}}, ensure_ascii=False).encode()),
        "native list, max readings, own times": ("city/hk/hn-aq-0001/up", _fit(lambda k: json.dumps(
            {"readings": [{"metric": f"m{i}", "value": i, "unit": "ug/m3", "time": T} for i in range(min(k, n))]}
        ).encode(), limit)),
        "native text states, max size": ("city/hk/hn-aq-0001/up", _fit(lambda k: json.dumps(
            {"time": T, "readings": {f"s{i}": {"text": "trạng thái " * 90} for i in range(min(k, n))}},
            ensure_ascii=False).encode(), limit)),
        "gateway array, max readings": ("gw/gw-01", _fit(lambda k: json.dumps(
            [{"device": f"hn-gw-{i:05d}", "time": T, "readings": {"pm25": 1.5}} for i in range(min(k, n))]
        ).encode(), limit)),
        "senml pack, max records": ("senml/hn-aq-0001", _fit(lambda k: json.dumps(
            [{"bn": "hn-aq-0001:", "bt": NOW.timestamp() - 60, "bu": "Cel"},
             *({"n": f"t{i}", "v": 20 + i * 0.01, "t": -i} for i in range(min(k, n) - 1))]).encode(), limit)),
        # The metric catalog (issue #13): every record a temperature in a unit no table holds, each
        # spelled differently, so that each is parsed by pint (the conversion cache keeps 16 per metric).
        "senml pack, a different unknown unit per record (rejected, bad_unit)": (
            "senml/hn-aq-0001", _fit(lambda k: json.dumps(
                [{"bn": "hn-aq-0001:", "bt": NOW.timestamp() - 60},
                 *({"n": "temperature", "u": f"zz{i:05d}/s", "v": 20, "t": -i} for i in range(min(k, n) - 1))]
            ).encode(), limit)),
        "over max readings (rejected)": ("city/hk/hn-aq-0001/up", _fit(lambda k: json.dumps(
            {"time": T, "readings": {f"k{i}": 1 for i in range(k)}}).encode(), limit)),
        # SenML lets a record carry fields it does not define (skipped, counted): nesting just within
        # max_json_depth, repeated to the size limit, all of it measured before parsing.
        "deepest allowed nesting, many brackets": ("senml/hn-aq-0001", _fit(lambda k: json.dumps(
            [{"bn": "hn-aq-0001:", "bt": NOW.timestamp() - 60, "n": "t", "v": 1,
              "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]]]]]]]]]]]] * k}]).encode(), limit)),
        # The formats of issue #11, each through a source with a mapping.
        "json, nested, max leaves, time_field": ("tele/hn-tas-0001/SENSOR", _fit(lambda k: json.dumps(
            {"Time": T, **{f"Sensor{i // 10}": {f"Wert_{j}": j * 0.5 for j in range(10)}
                           for i in range(0, min(k, n - 10), 10)}}).encode(), limit)),
        "json, gateway array of records": ("jgw/gw-01", _fit(lambda k: json.dumps(
            [{"id": f"hn-{i:05d}", "ts": int(NOW.timestamp()) - 60, "pm25": 1.5} for i in range(min(k, n // 3))]
        ).encode(), limit)),
        "lorawan, decoded payload of max leaves": ("v3/app@ttn/devices/hn-wl-0001/up", _fit(lambda k: json.dumps(
            {"end_device_ids": {"device_id": "hn-wl-0001"}, "received_at": T,
             "uplink_message": {"decoded_payload": {f"ch{i}": i for i in range(min(k, n - 2))},
                                "rx_metadata": [{"rssi": -70 - i, "snr": 5} for i in range(8)]}}).encode(), limit)),
        "line, max lines with escapes": ("telegraf/site-1", _fit(lambda k: "".join(
            f'weather\\ station,host=hn-ws-{i % 50},loc=a\\,b t\\=x={i}.5,s="q\\"{i}" {1764039600 + i}000000000\n'
            for i in range(min(k, n // 2))).encode(), limit)),
        "line, max lines, every one bad (rejected)": ("telegraf/site-1", _fit(
            lambda k: (b"m,host=hn-ws-1 u=" + b"x" * 12 + b"\n") * min(k, n), limit)),
        # The presets of issue #12 (on by default), through their own sources.
        "preset airrohr, max name/value pairs": ("airrohr/13463000", _fit(lambda k: json.dumps(
            {"esp8266id": "13463000", "software_version": "NRZ-2020-133",
             "sensordatavalues": [{"value_type": f"SDS_P{i}", "value": f"{i}.5"} for i in range(min(k, n))]}
        ).encode(), limit)),
        "preset shelly rpc, NotifyStatus of max leaves": ("shellypro4pm-a8032ab12345/events/rpc", _fit(
            lambda k: json.dumps({"src": "shellypro4pm-a8032ab12345", "method": "NotifyStatus", "params": {
                "ts": NOW.timestamp() - 60, **{f"switch:{i}": {"apower": i * 0.5, "voltage": 230.1}
                                                for i in range(min(k, (n - 2) // 2))}}}).encode(), limit)),
        "preset homeassistant (auto), flat JSON of max leaves": ("homeassistant/sensor/hn-ha-0001/state", _fit(
            lambda k: json.dumps({f"sensor_{i}": i * 0.25 for i in range(min(k, n))}).encode(), limit)),
        "value, 64 KiB of digits (rejected, not_finite)": ("esphome/hn-noise-0001/sensor/level/state", b"7" * limit),
        "64 KiB of '[' (rejected, too_deep)": ("city/hk/hn-aq-0001/up", b"[" * limit),
        "64 KiB of binary (rejected, malformed)": ("city/hk/hn-aq-0001/up", os.urandom(limit)),
    }


def _processor(limit: int) -> Processor:
    return Processor.from_settings(Settings(
        ingest=IngestSettings(max_message_bytes=limit),
        sources=[
            SourceSettings(name="aq", topic="city/{district}/{device}/up", format="native"),
            SourceSettings(name="gw", topic="gw/{gateway}", format="native", allow_devices=["hn-*"]),
            SourceSettings(name="senml", topic="senml/{device}", format="senml"),
            SourceSettings(name="tasmota", topic="tele/{device}/SENSOR", format="json", time_field="Time",
                           rename={"Sensor0.Wert_0": "temperature"}, metrics={"Sensor1.*": {"unit": "degC"}}),
            SourceSettings(name="jgw", topic="jgw/{gateway}", format="json", device_field="id", time_field="ts",
                           allow_devices=["hn-*"]),
            SourceSettings(name="ttn", topic="v3/{application}/devices/{device}/up", format="lorawan",
                           options={"radio": True}, metrics={"ch1": {"scale": 0.1, "unit": "V"}}),
            SourceSettings(name="telegraf", topic="telegraf/{site}", format="line", allow_devices=["hn-*"],
                           states=["*.s"]),
            SourceSettings(name="esphome", topic="esphome/{device}/#", format="value"),
        ],
    ))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worst", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=30, help="times each case is processed (default 30)")
    ap.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = ap.parse_args(argv)
    defaults = IngestSettings()
    limit = defaults.max_message_bytes
    processor = _processor(limit)
    if processor.catalog is not None:
        processor.catalog.warm()  # as the service does at start-up
    rows = []
    print(f"worst-case processing of one message (max_message_bytes {limit}, max_readings_per_message "
          f"{defaults.max_readings_per_message}, {args.repeat} runs each; batch_max_age "
          f"{defaults.batch_max_age * 1000:.0f} ms)")
    print(f"{'case':44} {'bytes':>7} {'readings':>8} {'outcome':>18} {'median ms':>10} {'max ms':>8}")
    for name, (topic, payload) in cases(limit, defaults.max_readings_per_message).items():
        assert len(payload) <= limit, name
        msg = RawMessage(topic, payload, NOW)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            outcome = processor.process(msg)
            times.append((time.perf_counter() - t0) * 1000)
        verdict = outcome.rejection.reason if outcome.rejection and not outcome.readings else "stored"
        row = {"case": name, "bytes": len(payload), "readings": len(outcome.readings), "outcome": verdict,
               "median_ms": statistics.median(times), "max_ms": max(times)}
        rows.append(row)
        print(f"{name:44} {len(payload):>7} {len(outcome.readings):>8} {verdict:>18} "
              f"{row['median_ms']:>10.2f} {row['max_ms']:>8.2f}")
    worst = max(r["max_ms"] for r in rows)
    print(f"slowest single message: {worst:.1f} ms ({worst / (defaults.batch_max_age * 1000):.0%} of batch_max_age)")
    if args.json:
        args.json.write_text(json.dumps({"date": NOW.isoformat(), "repeat": args.repeat, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
