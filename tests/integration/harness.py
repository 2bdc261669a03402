"""Run the real service as a process, publish to the real broker, read the real database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.services import REPO, free_port, wait_until


def write_config(
    path: Path,
    *,
    prefix: str,
    database_url: str,
    mqtt_url: str,
    extra: str = "",
    keepalive: int = 10,
    mqtt_extra: str = "",
    database_extra: str = "",
) -> Path:
    """``extra`` goes after the sources (new sections only); ``mqtt_extra`` and ``database_extra``
    are lines added inside [mqtt] and [database], e.g. "receive_maximum = 500"."""
    path.write_text(
        f"""
[database]
url = "{database_url}"
{database_extra}

[mqtt]
url = "{mqtt_url}"
client_id = "ingest-{uuid.uuid4().hex[:8]}"
reconnect_min = 0.1
reconnect_max = 1.0
keepalive = {keepalive}
{mqtt_extra}

[http]
addr = "127.0.0.1:{free_port()}"

[log]
level = "info"

[[sources]]
name = "native"
topic = "{prefix}/{{device}}/up"
format = "native"

[[sources]]
name = "gateway"
topic = "{prefix}/gw/{{gateway}}"
format = "native"
allow_devices = ["hn-*"]

[[sources]]
name = "senml"
topic = "{prefix}/senml/{{device}}"
format = "senml"
{extra}
"""
    )
    return path


class IngestProcess:
    """`python -m ingest run --config FILE` as a child process."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.extra_env = env or {}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        text = config.read_text()
        self.http = text.split('addr = "', 1)[1].split('"', 1)[0]

    def start(self, wait: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENSOR_INGEST_")} | self.extra_env
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "run", "--config", str(self.config)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            wait_until(self.ready, 60, f"the ingest service to be ready (log: {self.log_path})", interval=0.1)

    def readyz(self) -> int:
        """The /readyz status code, or 0 while the HTTP server does not answer."""
        try:
            return httpx.get(f"http://{self.http}/readyz", timeout=1).status_code
        except httpx.HTTPError:
            return 0

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"ingest exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://{self.http}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://{self.http}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def metrics(self, timeout: float = 5) -> dict[str, float]:
        """Every sample of /metrics, labelled series summed under their metric name."""
        text = httpx.get(f"http://{self.http}/metrics", timeout=timeout).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            name = series.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
        return out

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(60)
        self.proc = None
        return rc

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class Publisher:
    """A QoS 1 publisher that counts only what the broker acknowledged."""

    def __init__(self, port: int, username: str | None = None, password: str | None = None) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="pub-" + uuid.uuid4().hex[:8], protocol=MQTTProtocolVersion.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.acked = 0
        self._lock = threading.Lock()
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_publish(self, client: object, userdata: object, mid: int, rc: object, props: object) -> None:
        with self._lock:
            self.acked += 1

    def publish_all(self, messages: Iterable[tuple[str, bytes]], qos: int = 1) -> int:
        infos = [self.client.publish(topic, payload, qos=qos) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(60)
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_acked(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 with a publisher of its own and check the broker acknowledged every message."""
    pub = Publisher(port)
    try:
        pub.publish_all(messages)
        assert pub.acked == len(messages)
    finally:
        pub.close()


def native(device: str, time: str, readings: dict[str, object]) -> bytes:
    return json.dumps({"device": device, "time": time, "readings": readings}).encode()


def stored_readings(url: str) -> set[tuple[str, str, str, float]]:
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT d.uid, m.name, r.time, r.value FROM readings r"
            " JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id"
        ).fetchall()
    return {(str(u), str(n), t.isoformat(), float(v)) for u, n, t, v in rows}


def count(url: str, table: str) -> int:
    with psycopg.connect(url) as c:
        row = c.execute(f"SELECT count(*) FROM {table}").fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])


def fleet(
    prefix: str, n: int, t0: datetime
) -> tuple[list[tuple[str, bytes]], set[tuple[str, str, str, float]]]:
    """n native messages from 100 devices, each with its own time and two readings; and the set of
    (device, metric, time, value) they must store."""
    messages, expected = [], set()
    for i in range(n):
        device = f"hn-aq-{i % 100:03d}"
        t = (t0 + timedelta(seconds=i // 100)).isoformat()
        pm25, temp = float(i % 500) / 10, 20.0 + (i % 17)
        messages.append((f"{prefix}/{device}/up", native(device, t, {"pm25": pm25, "temperature": temp})))
        expected.add((device, "pm25", t, pm25))
        expected.add((device, "temperature", t, temp))
    return messages, expected


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    readyz: int  # status code, 0 when the HTTP server did not answer
    metrics: dict[str, float]  # empty when /metrics did not answer


class HealthSampler:
    """Polls /readyz and /metrics of a running service from a thread, keeping every answer."""

    def __init__(self, ingest: IngestProcess, interval: float = 0.25) -> None:
        self.ingest = ingest
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-sampler", daemon=True)

    def __enter__(self) -> HealthSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            at = time.monotonic()
            code = self.ingest.readyz()
            try:
                metrics = self.ingest.metrics(timeout=2)
            except (httpx.HTTPError, ValueError):
                metrics = {}
            self.samples.append(Sample(at, code, metrics))
            self._stop.wait(self.interval)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.at <= end]

    def max_of(self, name: str) -> float | None:
        values = [s.metrics[name] for s in self.samples if name in s.metrics]
        return max(values) if values else None


def waiting_on_a_lock(url: str) -> bool:
    """A session of the service waits on a lock (a write into a table the test locked)."""
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND application_name = 'sensor-ingest'"
        ).fetchone()
    return bool(row and row[0])
