"""The load generator: several publisher processes, QoS 1, counting only what the broker acknowledged.

One paho publisher process tops out near 13,000 QoS 1 messages/s on this kind of machine, below what
the service drains, so the load is spread over processes. Each process owns its devices
(``<prefix>/<run>-p<proc>-d<n>/up``) and numbers its messages; message ``seq`` goes to device
``seq % devices``. Every message is a native payload whose ``time`` is the wall clock at publish, which
is what the runner measures publish-to-commit latency from, and whose readings are ``seq`` (the
message's number, so the runner can check the stored set against the acknowledged one) and
``temperature`` in degF, which the metric catalog binds, converts to degC and range-checks (issue #13:
the drain figure is measured with the catalog doing its work on every message).

A process reports the sequence numbers the broker acknowledged (PUBACK), never what it merely sent.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

__all__ = ["LoadResult", "PublisherSpec", "device_uid", "publish", "readings_per_message"]

_INFLIGHT = 1000


@dataclass(frozen=True)
class PublisherSpec:
    mqtt_url: str
    prefix: str  # first topic level
    run: str  # names this run's devices, so several runs can share one database
    devices: int  # per process
    messages: int  # per process; 0 = until `duration`
    rate: float  # messages/s per process; 0 = as fast as the broker acknowledges
    duration: float  # seconds; 0 = until `messages`
    payload_bytes: int  # pad each payload to about this size (0 = no padding)


@dataclass
class LoadResult:
    acked: list[list[int]] = field(default_factory=list)  # per process: acknowledged seq numbers
    sent: int = 0
    seconds: float = 0.0  # first publish to last acknowledgement, slowest process

    @property
    def total_acked(self) -> int:
        return sum(len(a) for a in self.acked)


def device_uid(run: str, proc: int, device: int) -> str:
    return f"{run}-p{proc}-d{device:04d}"


def _payload(uid: str, at: datetime, seq: int, pad: int) -> bytes:
    readings: dict[str, Any] = {"seq": seq, "temperature": {"value": 50 + seq % 400 / 10, "unit": "degF"}}
    message = {"device": uid, "time": at.isoformat(), "readings": readings}
    # A bigger payload is a gateway's wider message: more channels, each a reading of its own.
    # Each channel adds ,"<key>":<value> to the encoding, so the size is counted, not re-encoded.
    size = len(json.dumps(message, separators=(",", ":"))) if pad else 0
    channel = 0
    while size < pad:
        key, value = f"ch{channel:02d}", round(20 + (seq * 7 + channel) % 400 / 10, 1)
        readings[key] = value
        size += len(key) + 4 + len(repr(value))
        channel += 1
    return json.dumps(message, separators=(",", ":")).encode()


def readings_per_message(pad: int) -> int:
    return len(json.loads(_payload("x" * 16, datetime.now(UTC), 10**6, pad))["readings"])


def _publisher(index: int, spec: PublisherSpec, out: mp.Queue[tuple[int, list[int], int, float]]) -> None:
    host, port = _host_port(spec.mqtt_url)
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.max_inflight_messages_set(_INFLIGHT)
    client.max_queued_messages_set(0)
    acked: list[int] = []
    pending: dict[int, int] = {}  # mid -> seq, touched by this thread only
    # paho calls on_publish while holding its own lock, which publish() takes too: the callback must
    # take no lock of ours, so it only queues the mid, and this thread matches it to its seq.
    done: collections.deque[tuple[int, bool]] = collections.deque()
    window = threading.Semaphore(_INFLIGHT)

    def on_publish(_c: object, _u: object, mid: int, reason: object, _p: object) -> None:
        done.append((mid, bool(getattr(reason, "is_failure", False))))
        window.release()

    def settle() -> None:
        while done:
            mid, failed = done.popleft()
            seq = pending.pop(mid)
            if not failed:
                acked.append(seq)

    connected = threading.Event()
    client.on_publish = on_publish
    client.on_connect = lambda *_a: connected.set()
    client.connect(host, port, keepalive=30)
    client.loop_start()
    if not connected.wait(30):
        raise RuntimeError(f"publisher {index}: no CONNACK from {spec.mqtt_url}")
    uids = [device_uid(spec.run, index, d) for d in range(spec.devices)]
    topics = [f"{spec.prefix}/{u}/up" for u in uids]
    start = time.monotonic()
    last = datetime.now(UTC)
    seq = 0
    while True:
        now = time.monotonic()
        if spec.messages and seq >= spec.messages:
            break
        if spec.duration and now - start >= spec.duration:
            break
        if spec.rate:
            due = start + seq / spec.rate
            if due > now:
                time.sleep(due - now)
        # Strictly increasing per process: a device never repeats a timestamp, even if the clock steps.
        at = max(datetime.now(UTC), last + timedelta(microseconds=1))
        last = at
        d = seq % spec.devices
        window.acquire()
        info = client.publish(topics[d], _payload(uids[d], at, seq, spec.payload_bytes), qos=1)
        pending[info.mid] = seq
        settle()
        seq += 1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        settle()
        if not pending:
            break
        time.sleep(0.02)
    seconds = time.monotonic() - start
    client.disconnect()
    client.loop_stop()
    out.put((index, acked, seq, seconds))


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def publish(spec: PublisherSpec, processes: int) -> LoadResult:
    """Run ``processes`` publishers to completion; return what the broker acknowledged."""
    ctx = mp.get_context("spawn")
    out: mp.Queue[tuple[int, list[int], int, float]] = ctx.Queue()
    procs = [ctx.Process(target=_publisher, args=(i, spec, out), daemon=True) for i in range(processes)]
    for p in procs:
        p.start()
    result = LoadResult(acked=[[] for _ in range(processes)])
    for _ in procs:
        try:
            index, acked, sent, seconds = out.get(timeout=max(600.0, spec.duration * 2))
        except queue.Empty:
            raise RuntimeError("a publisher process did not report back (is the broker up?)") from None
        result.acked[index] = acked
        result.sent += sent
        result.seconds = max(result.seconds, seconds)
    for p in procs:
        p.join(30)
        if p.exitcode not in (0, None):
            raise RuntimeError(f"publisher process exited with {p.exitcode}")
    return result
