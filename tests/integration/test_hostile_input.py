"""No single message may stop the city (issue #9): hostile payloads over the real broker, each
followed by a good message from another device. Every good message is stored, /readyz stays 200 the
whole time, and every hostile message ends as a rejection row (with its exact bytes and a reason) or
as valid readings.

The broker and the service accept payloads of up to 1 MiB here, so that the huge cases (100,000
levels of nesting, a 20,000-key map, a 3,000-device gateway array) reach the decoders instead of
being refused by the size limits in front of them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tests.integration.harness import HealthSampler, IngestProcess, Publisher, native, stored_readings, write_config
from tests.services import Mosquitto, wait_until

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
BIG = 1 << 20


@pytest.fixture
def big_broker() -> Iterator[Mosquitto]:
    server = Mosquitto(extra=f"message_size_limit {BIG}\n")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def _raw(text: str) -> bytes:
    """JSON text as written, \\u escapes kept as escapes (json.dumps would refuse lone surrogates);
    @T is the time of the readings, @BT the same in epoch seconds."""
    return text.replace("@T", T0.isoformat()).replace("@BT", str(int(T0.timestamp()))).encode()


def _hostile(prefix: str) -> list[tuple[str, str, bytes, str | None]]:
    """(what, topic, payload, expected rejection reason or None when it is stored as valid)."""
    t = T0.isoformat()
    up = f"{prefix}/hn-aq-0001/up"
    gw = f"{prefix}/gw/gw-01"  # allow_devices: hn-* (the harness's gateway source)
    gwp = f"{prefix}/gwp/gw-02"  # device_prefix gwp:
    sg = f"{prefix}/sg/gw-03"  # SenML gateway, device_prefix sg:
    cases: list[tuple[str, str, bytes, str | None]] = [
        ("surrogate device on an allow-listed gateway (the issue's report)", gw,
         _raw('{"device": "\\udc80x", "time": "@T", "readings": {"pm25": 1}}'), "bad_device"),
        ("surrogate device on a prefixed gateway", gwp,
         _raw('{"device": "\\udc80x", "time": "@T", "readings": {"pm25": 1}}'), "bad_device"),
        ("surrogate metric", up, _raw('{"time": "@T", "readings": {"pm\\ud800": 1}}'), "bad_metric"),
        ("surrogate text state", up, _raw('{"time": "@T", "readings": {"s": {"text": "\\udfff"}}}'), "bad_text"),
        ("surrogate SenML bn on a device topic", f"{prefix}/senml/hn-aq-0001",
         _raw('[{"bn": "\\udc80x:", "bt": @BT, "n": "t", "v": 1}]'), "device_mismatch"),
        ("surrogate SenML bn on a gateway", sg,
         _raw('[{"bn": "\\udc80x:", "bt": @BT, "n": "t", "v": 1}]'), "bad_device"),
        ("NUL in the device", gwp, _raw('{"device": "a\\u0000b", "time": "@T", "readings": {"x": 1}}'),
         "bad_device"),
        ("NUL in the metric", up, _raw('{"time": "@T", "readings": {"pm\\u000025": 1}}'), "bad_metric"),
        ("1e400", up, _raw('{"time": "@T", "readings": {"pm25": 1e400}}'), "not_finite"),
        ("a 30-digit integer", up, _raw('{"time": "@T", "readings": {"count": 123456789012345678901234567890}}'),
         None),
        ("100,000-deep nesting", up, b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        ("a 20,000-key map", up,
         json.dumps({"time": t, "readings": {f"k{i}": i for i in range(20_000)}}).encode(), "too_many_readings"),
        ("binary garbage", up, os.urandom(512), "malformed"),
        ("duplicate JSON keys", up, _raw('{"time": "@T", "readings": {"a": 1, "a": 2}}'), "malformed"),
        ("a 3,000-device gateway array", gw,
         json.dumps([{"device": f"hn-gw-{i:04d}", "time": t, "readings": {"pm25": 1}} for i in range(3000)]).encode(),
         "too_many_readings"),
        ("a 5,000-character device id", gwp,
         json.dumps({"device": "d" * 5000, "time": t, "readings": {"x": 1}}).encode(), "bad_device"),
        ("a 5,000-character metric name", up, json.dumps({"time": t, "readings": {"m" * 5000: 1}}).encode(),
         "bad_metric"),
    ]
    return cases


def test_hostile_messages_never_stop_the_fleet(
    tmp_path: Path, database_url: str, big_broker: Mosquitto, topic_prefix: str
) -> None:
    extra = f"""
[[sources]]
name = "gateway-prefixed"
topic = "{topic_prefix}/gwp/{{gateway}}"
format = "native"
device_prefix = "gwp:"

[[sources]]
name = "senml-gateway"
topic = "{topic_prefix}/sg/{{gateway}}"
format = "senml"
device_prefix = "sg:"

[ingest]
max_message_bytes = {BIG}
"""
    cfg = write_config(tmp_path / "c.toml", prefix=topic_prefix, database_url=database_url, mqtt_url=big_broker.url,
                       extra=extra)
    ingest = IngestProcess(cfg, tmp_path / "ingest.log")
    cases = _hostile(topic_prefix)
    messages: list[tuple[str, bytes]] = []
    good: set[tuple[str, str, str, float]] = set()
    for i, (_what, topic, payload, _reason) in enumerate(cases):
        messages.append((topic, payload))
        device = f"hn-good-{i:02d}"
        when = (T0 + timedelta(seconds=i)).isoformat()
        messages.append((f"{topic_prefix}/{device}/up", native(device, when, {"pm25": float(i)})))
        good.add((device, "pm25", when, float(i)))
    try:
        ingest.start()
        with HealthSampler(ingest, interval=0.1) as health:
            pub = Publisher(big_broker.port)
            try:
                started = time.monotonic()
                pub.publish_all(messages)
            finally:
                pub.close()
            wait_until(lambda: good <= stored_readings(database_url), 60, "every good message to be stored")
            stored_after = time.monotonic() - started
            wait_until(lambda: _rejections(database_url) >= sum(1 for c in cases if c[3]), 30, "the rejections")
        codes = {s.readyz for s in health.samples}
        assert codes == {200}, f"/readyz answered {codes} while hostile messages flowed"
        assert ingest.running

        with psycopg.connect(database_url) as c:
            rows = c.execute("SELECT topic, payload, reason, detail FROM rejected_messages").fetchall()
        by_message = {(t, bytes(p)): (r, d) for t, p, r, d in rows}
        assert len(rows) == len(by_message), "each hostile message is rejected once"
        for what, topic, payload, reason in cases:
            if reason is None:
                continue
            assert (topic, payload) in by_message, f"{what}: no rejection row with its exact bytes"
            assert by_message[topic, payload][0] == reason, f"{what}: {by_message[topic, payload]}"
        assert len(rows) == sum(1 for c in cases if c[3]), "no good message was rejected"
        stored = stored_readings(database_url)
        assert ("hn-aq-0001", "count", T0.isoformat(), 1.2345678901234568e29) in stored
        assert len(stored) == len(good) + 1
        print(f"every good message stored {stored_after:.1f}s after the first publish")
        assert ingest.terminate() == 0
    finally:
        ingest.close()


def _rejections(url: str) -> int:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT count(*) FROM rejected_messages").fetchone()
    assert row is not None
    return int(row[0])
