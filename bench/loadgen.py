"""The load generator: several publisher processes, QoS 1, counting only what the broker acknowledged.

One paho publisher process tops out near 13,000 QoS 1 messages/s on this kind of machine, below what
the service drains, so the load is spread over processes. Each process owns its devices
(``<prefix>/<run>-p<proc>-d<n>/<suffix>``) and numbers its messages; message ``seq`` goes to device
``seq % devices``.

The ``native`` shape (ingest-drain, ingest-live, ingest-alerts): a native payload whose ``time`` is
the wall clock taken right before ``publish()`` (see below), which is what the runner measures
publish-to-commit latency from, and whose readings are ``seq`` (the message's number, so the runner
can check the stored set against the acknowledged one) and ``temperature`` in degF, which the metric
catalog binds, converts to degC and range-checks (issue #13: the drain figure is measured with the
catalog doing its work on every message). The shapes of issue #17's drain targets (bench.shapes) name
their message through their time instead, from ``base_time``.

At most ``_INFLIGHT`` publishes wait for their PUBACK at a time (this process's window). The message's
time is taken after its place in that window is free, right before ``publish()``: waiting for the
broker to acknowledge earlier messages is the publisher's delay, not the message's, and is measured
apart. With ``timing``, each acknowledged message reports (``Sent``): how late the rate schedule was
(``behind``), when the loop wanted to send it (``want``), when ``publish()`` was called, which is the
payload's time (``call``), and when its PUBACK arrived (``ack``, in paho's on_publish). All are
wall-clock epoch seconds, as PostgreSQL's commit timestamps are, on the same machine.

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
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.shapes import SHAPES

__all__ = ["LoadResult", "PublisherSpec", "Sent", "device_uid", "publish", "readings_per_message"]

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
    shape: str = "native"  # or a key of bench.shapes.SHAPES
    base_time: float = 0.0  # bench.shapes: epoch seconds of message 0
    timing: bool = False  # report a Sent per acknowledged message

    @property
    def suffix(self) -> str:
        return SHAPES[self.shape].suffix if self.shape != "native" else "up"


class Sent(NamedTuple):
    """One acknowledged message's publish timing (epoch seconds, except ``behind``)."""

    seq: int
    behind: float  # seconds the loop was behind the rate schedule when it came to this message (0: on time)
    want: float  # the loop came to it: before it waited for a free place in the window
    call: float  # publish() was called: the payload's time
    ack: float  # its PUBACK arrived


@dataclass
class LoadResult:
    acked: list[list[int]] = field(default_factory=list)  # per process: acknowledged seq numbers
    sent: int = 0
    seconds: float = 0.0  # first publish to last acknowledgement, slowest process
    timing: list[list[Sent]] = field(default_factory=list)  # per process, with PublisherSpec.timing

    @property
    def total_acked(self) -> int:
        return sum(len(a) for a in self.acked)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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


_Report = tuple[int, list[int], int, float, list[Sent]]


def _publisher(index: int, spec: PublisherSpec, out: mp.Queue[_Report]) -> None:
    host, port = _host_port(spec.mqtt_url)
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.max_inflight_messages_set(_INFLIGHT)
    client.max_queued_messages_set(0)
    acked: list[int] = []
    sent: list[Sent] = []
    pending: dict[int, tuple[int, float, float, float]] = {}  # mid -> (seq, behind, want, call), this thread's
    # paho calls on_publish while holding its own lock, which publish() takes too: the callback must
    # take no lock of ours, so it only queues the mid (and the time), and this thread matches it to its seq.
    done: collections.deque[tuple[int, bool, float]] = collections.deque()
    window = threading.Semaphore(_INFLIGHT)

    def on_publish(_c: object, _u: object, mid: int, reason: object, _p: object) -> None:
        done.append((mid, bool(getattr(reason, "is_failure", False)), time.time()))
        window.release()

    def settle() -> None:
        while done:
            mid, failed, ack = done.popleft()
            seq, behind, want, call = pending.pop(mid)
            if not failed:
                acked.append(seq)
                if spec.timing:
                    sent.append(Sent(seq, behind, want, call, ack))

    connected = threading.Event()
    client.on_publish = on_publish
    client.on_connect = lambda *_a: connected.set()
    client.connect(host, port, keepalive=30)
    client.loop_start()
    if not connected.wait(30):
        raise RuntimeError(f"publisher {index}: no CONNACK from {spec.mqtt_url}")
    uids = [device_uid(spec.run, index, d) for d in range(spec.devices)]
    topics = [f"{spec.prefix}/{u}/{spec.suffix}" for u in uids]
    shape = SHAPES[spec.shape].payload if spec.shape != "native" else None
    start = time.monotonic()
    last_us = 0
    seq = 0
    while True:
        now = time.monotonic()
        if spec.messages and seq >= spec.messages:
            break
        if spec.duration and now - start >= spec.duration:
            break
        behind = 0.0
        if spec.rate:
            due = start + seq / spec.rate
            if due > now:
                time.sleep(due - now)
            else:
                behind = now - due
        want = time.time()
        window.acquire()
        # Strictly increasing per process: a device never repeats a timestamp, even if the clock steps.
        last_us = max(time.time_ns() // 1000, last_us + 1)
        call = last_us / 1e6
        d = seq % spec.devices
        if shape is not None:
            payload = shape(uids[d], seq, spec.base_time)
        else:
            payload = _payload(uids[d], _EPOCH + timedelta(microseconds=last_us), seq, spec.payload_bytes)
        info = client.publish(topics[d], payload, qos=1)
        pending[info.mid] = (seq, behind, want, call)
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
    out.put((index, acked, seq, seconds, sent))


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def publish(spec: PublisherSpec, processes: int) -> LoadResult:
    """Run ``processes`` publishers to completion; return what the broker acknowledged."""
    ctx = mp.get_context("spawn")
    out: mp.Queue[_Report] = ctx.Queue()
    procs = [ctx.Process(target=_publisher, args=(i, spec, out), daemon=True) for i in range(processes)]
    for p in procs:
        p.start()
    result = LoadResult(acked=[[] for _ in range(processes)], timing=[[] for _ in range(processes)])
    for _ in procs:
        try:
            index, acked, sent, seconds, timing = out.get(timeout=max(600.0, spec.duration * 2))
        except queue.Empty:
            raise RuntimeError("a publisher process did not report back (is the broker up?)") from None
        result.acked[index] = acked
        result.timing[index] = timing
        result.sent += sent
        result.seconds = max(result.seconds, seconds)
    for p in procs:
        p.join(30)
        if p.exitcode not in (0, None):
            raise RuntimeError(f"publisher process exited with {p.exitcode}")
    return result
