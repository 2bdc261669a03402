"""The benchmark runner: `make bench` (quick, a few minutes) or `make bench FULL=1`.

Runs, on one broker and one database, with the same load generator:

1. ingest-drain: a backlog of messages waits at the broker (the service's persistent session holds
   them), then the service starts and drains it. Throughput is the messages stored after each
   worker's first commit over the span from the first commit to the last (``drained_over``).
2. ingest-live: publishers send at a fixed rate while the service runs; after a warm-up, the
   publish-to-commit latency of every message is read from the database (the message's time is its
   publish time; the commit time is PostgreSQL's own commit timestamp, track_commit_timestamp = on).
3. baseline-drain: the same kind of backlog through bench/baseline.py, the straightforward approach
   (paho on_message -> one INSERT per reading, autocommit), for the ratio.
4. ingest-alerts: the live load again (by default at ingest-live's rate), with the service holding 20
   threshold rules on `temperature` (above 11, 12, ... 30 degC, each clearing 0.5 below) over a few
   devices and one webhook: a receiver run here (http.server in a thread on 127.0.0.1) checks each
   request's Standard Webhooks signature and records when it arrived. Publish-to-webhook latency is
   that arrival minus the body's event_time (the reading's time, i.e. its publish time), beside the
   publish-to-commit latency of the same run.
5. Issue #17's drain targets (--targets, or each with --only): drain-senml1 (1-record SenML packs),
   drain-json5 (native messages of 5 readings) and drain-senml50 (50-record SenML packs), each a
   backlog drained like ingest-drain, through the catalog and with 20 threshold rules on temperature
   (bench.targets), and baseline-senml1, baseline-json5, baseline-senml50: the same shapes through
   bench/baseline.py, for a ratio in readings/s per shape (bench.shapes holds the payloads).

ingest-live and ingest-alerts also break their latency into parts (bench.latency): the publisher's
window wait and PUBACK time per message, the service's receive-to-commit and flush histograms from its
/metrics, and the rest (broker and network).

After each, the stored set is checked against what the broker acknowledged: a missing or doubled
message fails the run (exit 1); after ingest-alerts, so is an event recorded (and notified) that the
receiver did not get exactly once; after a target drain with one worker, so is an alert event count
other than the one its messages must raise. The figures are printed as tables and written as JSON.

Each scenario publishes under a topic root of its own (bench/<run>/...): the persistent sessions that
earlier scenarios left at the broker subscribe to their own roots, so the broker does not queue (and
persist every second) a later scenario's messages for them.

By default private services are started on free ports (Mosquitto with deploy/mosquitto/mosquitto.conf,
PostgreSQL + TimescaleDB with deploy/postgres/postgresql.conf, durable: fsync and synchronous_commit
on). --database-url and --mqtt-url use running ones instead (a database is created there and left).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
from pydantic import ValidationError

from bench import latency, targets
from bench.errors import VerificationError as VerificationError  # bench.faults imports it here
from bench.loadgen import LoadResult, PublisherSpec, publish, readings_per_message
from bench.procstat import Usage, Watch
from bench.shapes import SHAPES, STEP_MS
from ingest.alerts.body import StandardBody
from ingest.alerts.sign import SignatureError
from ingest.alerts.sign import verify as verify_signature
from tests.services import REPO, Mosquitto, Postgres, free_port, wait_until

RESULTS = REPO / "bench" / "results"
PREFIX = "bench"
# In this order by default (`make bench`): ingest-alerts last, so the others run as they did before it.
BASE_SCENARIOS = ("ingest-drain", "ingest-live", "baseline-drain", "ingest-alerts")
# Issue #17's drain targets (--targets), each beside its baseline for the ratio.
TARGET_SCENARIOS = ("drain-senml1", "baseline-senml1", "drain-json5", "baseline-json5", "drain-senml50",
                    "baseline-senml50")
SCENARIOS = BASE_SCENARIOS + TARGET_SCENARIOS
DEFAULT_SCENARIOS = BASE_SCENARIOS


@dataclass(frozen=True)
class Plan:
    drain_messages: int
    live_rate: float
    live_seconds: float
    warmup_seconds: float
    baseline_messages: int
    publishers: int
    payload_bytes: int
    alerts_rate: float | None = None  # offered messages/s of ingest-alerts; None: live_rate (resolved in main)
    alert_devices: int = 2  # devices per publisher process that the alert rules select (1 to 5)
    alerts_lateness: float = 0.5  # [alerts] lateness of ingest-alerts' service (its default): alerts wait this long
    senml1_messages: int = 50_000  # backlog of drain-senml1
    json5_messages: int = 20_000  # backlog of drain-json5
    senml50_messages: int = 4_000  # backlog of drain-senml50
    target_baseline_readings: int = 5_000  # backlog of each baseline-<shape>, in readings
    target_rules: targets.Scope = "fleet"  # devices the drain targets' 20 rules select (bench.targets)
    workers: int = 1  # sensor-ingest run --workers N (N > 1: mqtt.shared_group = "bench")

    def target_messages(self, shape: str, baseline: bool) -> int:
        if baseline:
            return max(1, self.target_baseline_readings // SHAPES[shape].readings)
        return int(getattr(self, f"{shape}_messages"))


QUICK = Plan(drain_messages=100_000, live_rate=3_000, live_seconds=20, warmup_seconds=5,
             baseline_messages=10_000, publishers=2, payload_bytes=0)
FULL = Plan(drain_messages=1_000_000, live_rate=5_000, live_seconds=60, warmup_seconds=10,
            baseline_messages=30_000, publishers=3, payload_bytes=0, senml1_messages=500_000,
            json5_messages=200_000, senml50_messages=20_000, target_baseline_readings=20_000)
DEVICES = 500  # per publisher process


@dataclass
class Result:
    name: str
    messages: int
    readings: int
    seconds: float  # the span the rate is measured over: first to last commit (drains: drained_over)
    wall_seconds: float  # from the consumer's start (drain) or the first publish (live) to all stored
    messages_per_s: float
    readings_per_s: float
    latency_ms: dict[str, float] | None
    usage: dict[str, dict[str, float]]  # process -> Usage
    verified: str
    extra: dict[str, Any] = field(default_factory=dict)


# --- services ----------------------------------------------------------------------------------


class BenchPostgres(Postgres):
    """The test cluster class, made durable again: a benchmark measures what production pays."""

    def init(self) -> None:
        super().init()
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(
                "\n# --- benchmark: durable, with commit timestamps for latency ---\n"
                "fsync = on\nfull_page_writes = on\nsynchronous_commit = on\nshared_buffers = 256MB\n"
                "track_commit_timestamp = on\n"
            )


def _listener_pid(port: int) -> int | None:
    """The pid listening on 127.0.0.1/0.0.0.0:port, from /proc/net/tcp and /proc/*/fd (Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(cols[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


@dataclass
class Services:
    database_url: str
    mqtt_url: str
    broker_pid: int | None
    database_pid: int | None
    versions: dict[str, str]
    # --set: config keys of the service under test, as its environment (SENSOR_INGEST_<SECTION>__<KEY>)
    service_env: dict[str, str] = field(default_factory=dict)


@contextmanager
def services(args: argparse.Namespace) -> Iterator[Services]:
    if args.database_url and args.mqtt_url:
        admin = args.database_url
        name = "bench_" + uuid.uuid4().hex[:8]
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        url = re.sub(r"/[^/?]*(\?|$)", f"/{name}\\1", admin, count=1) if urlsplit(admin).path else admin + "/" + name
        db_port = urlsplit(url).port or 5432
        mq_port = urlsplit(args.mqtt_url).port or 1883
        yield Services(url, args.mqtt_url, _listener_pid(mq_port), _listener_pid(db_port), {})
        return
    pg, mq = BenchPostgres(), Mosquitto()
    try:
        pg.init()
        pg.start()
        mq.start()
        name = pg.create_database("template0")
        assert pg.proc is not None
        assert mq.proc is not None
        yield Services(pg.url(name), mq.url, mq.proc.pid, pg.proc.pid, {})
    finally:
        mq.cleanup()
        pg.cleanup()


def versions(database_url: str) -> dict[str, str]:
    with psycopg.connect(database_url) as c:
        pg = c.execute("SHOW server_version").fetchone()
        ts = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
        lic = c.execute("SHOW timescaledb.license").fetchone()
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": str(pg[0]) if pg else "?",
        "timescaledb": f"{ts[0] if ts else '?'} ({lic[0] if lic else '?'} license)",
        "mosquitto": mosq[0] if mosq else "?",
    }


# --- the service and the baseline as processes ------------------------------------------------------


class Consumer:
    """The ingest service (or the baseline) as a child process. Its environment is the bench's without
    any SENSOR_INGEST_* variable (the config file is the whole config), plus ``env``."""

    def __init__(self, argv: list[str], log: Path, ready: Any, env: dict[str, str] | None = None) -> None:
        self.argv, self.log, self._ready = argv, log, ready
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENSOR_INGEST_")} | self.env
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.ready, 60, f"{self.argv[2]} to be ready (log: {self.log})", interval=0.05)
        return self.proc.pid

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.argv[2]} exited with {self.proc.returncode}: see {self.log}")
        return bool(self._ready())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.proc = None


def ingest_consumer(
    work: Path, svc: Services, name: str, *, database_url: str | None = None, database_extra: str = "",
    mqtt_extra: str = "", log_level: str = "warning", extra: str = "", env: dict[str, str] | None = None,
    topic_root: str = PREFIX, format: str = "native", suffix: str = "up", workers: int = 1,
    new_devices: int | None = None,
) -> tuple[Consumer, str]:
    """The service on svc's broker and database (or ``database_url``, e.g. through a fault proxy);
    ``database_extra`` and ``mqtt_extra`` are lines added inside [database] and [mqtt], ``extra`` is
    TOML appended to the file (e.g. [[webhooks]] and [[rules]]), ``env`` the service's environment.
    Its one source reads ``<topic_root>/{device}/<suffix>`` in ``format``. ``workers`` > 1 runs
    ``sensor-ingest run --workers N`` on a shared subscription (mqtt.shared_group = "bench"), worker k
    serving HTTP on the returned address's port + k - 1 (ingest.cli). ``new_devices``: the source's
    ingest.max_new_devices_per_minute, for a bench fleet larger than the default budget, which comes
    online all at once."""
    http = f"127.0.0.1:{_free_ports(workers)}"
    config = work / f"{name}.toml"
    if workers > 1:
        mqtt_extra = f'shared_group = "bench"\n{mqtt_extra}'
    budget = "" if new_devices is None else f"[ingest]\nmax_new_devices_per_minute = {new_devices}\n"
    config.write_text(f"""
[database]
url = "{database_url or svc.database_url}"
{database_extra}
[mqtt]
url = "{svc.mqtt_url}"
client_id = "bench-{name}"
{mqtt_extra}
[http]
addr = "{http}"
[log]
level = "{log_level}"
{budget}[[sources]]
name = "bench"
topic = "{topic_root}/{{device}}/{suffix}"
format = "{format}"
{extra}""")

    def ready() -> bool:
        try:
            return all(httpx.get(f"http://{a}/readyz", timeout=1).status_code == 200
                       for a in worker_addrs(http, workers))
        except httpx.HTTPError:
            return False

    argv = [sys.executable, "-m", "ingest", "run", "--config", str(config)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return Consumer(argv, work / f"{name}.log", ready, svc.service_env | (env or {})), http


def baseline_consumer(work: Path, svc: Services, topic: str = f"{PREFIX}/+/up", name: str = "baseline") -> Consumer:
    log = work / f"{name}.log"
    argv = [sys.executable, "-m", "bench.baseline", "--database-url", svc.database_url, "--mqtt-url",
            svc.mqtt_url, "--topic", topic]

    def ready() -> bool:
        return "subscribed" in log.read_text()

    return Consumer(argv, log, ready)


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports on 127.0.0.1 (for n workers' HTTP)."""
    for _ in range(100):
        first = free_port()
        if first + n - 1 <= 65535 and all(_port_free(first + k) for k in range(1, n)):
            return first
    raise RuntimeError(f"found no {n} consecutive free ports on 127.0.0.1")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def worker_addrs(http: str, workers: int) -> list[str]:
    """Each worker's host:port: worker k on the port of http.addr + k - 1 (ingest.cli)."""
    host, _, port = http.rpartition(":")
    return [f"{host}:{int(port) + k}" for k in range(workers)]


def metrics_text(http: str, workers: int = 1) -> list[str]:
    """Each worker's /metrics."""
    return [httpx.get(f"http://{a}/metrics", timeout=5).text for a in worker_addrs(http, workers)]


def counter_total(texts: list[str], name: str) -> float:
    """An unlabelled counter (``sensor_ingest_<name>_total``) summed over the workers' /metrics."""
    total = 0.0
    for text in texts:
        m = re.search(rf"^sensor_ingest_{name}_total (\S+)$", text, re.M)
        total += float(m.group(1)) if m else 0.0
    return total


def acked_by_ingest(http: str, workers: int = 1) -> float:
    """Messages acknowledged after commit, over all workers."""
    return counter_total(metrics_text(http, workers), "messages_acked")


# --- checking and measuring ---------------------------------------------------------------------------

_SEQ_INGEST = """
SELECT d.uid, r.value, pg_xact_commit_timestamp(r.xmin), r.time
FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id
WHERE m.name = 'seq' AND d.uid LIKE %s
"""
_SEQ_BASELINE = """
SELECT device, value, pg_xact_commit_timestamp(xmin), time FROM baseline_readings
WHERE metric = 'seq' AND device LIKE %s
"""


def _rows(url: str, baseline: bool, run: str) -> list[tuple[str, float, datetime, datetime]]:
    with psycopg.connect(url) as c:
        return c.execute(_SEQ_BASELINE if baseline else _SEQ_INGEST, (run + "-%",)).fetchall()


def verify(rows: list[tuple[str, float, datetime, datetime]], load: LoadResult, run: str) -> str:
    """Stored == acknowledged, each message once. Raises VerificationError, loudly, otherwise."""
    stored: dict[tuple[int, int], int] = {}
    for uid, value, _c, _t in rows:
        proc = int(uid[len(run) + 2 :].split("-", 1)[0])
        key = (proc, int(value))
        stored[key] = stored.get(key, 0) + 1
    acked = {(p, s) for p, seqs in enumerate(load.acked) for s in seqs}
    missing = acked - stored.keys()
    doubled = {k: n for k, n in stored.items() if n > 1}
    unacked_stored = stored.keys() - acked  # possible only if a PUBACK was lost: allowed, reported
    if missing or doubled:
        raise VerificationError(
            f"{run}: {len(missing)} acknowledged messages missing (e.g. {sorted(missing)[:5]}), "
            f"{len(doubled)} stored more than once (e.g. {sorted(doubled.items())[:5]})"
        )
    return f"ok: {len(acked)} acknowledged, {len(stored)} stored once each, {len(unacked_stored)} stored unacked"


def drained_over(firsts: Sequence[datetime], lasts: Sequence[datetime], wall: float,
                 workers: int = 1) -> tuple[float, int]:
    """(seconds, messages) a drain's rate is measured over, from each message's first and last commit:
    from the drain's first commit to its last, the messages whose first commit is none of the first
    ``workers`` commits (each worker received and processed its first batch before the span began:
    counted, a drain of B batches a worker would be measured over B - 1 batches' time, a quarter too
    fast at B = 5). A drain stored in fewer commits than that: ``wall`` seconds (the service's start to
    the last message stored), every message."""
    if not firsts:
        return wall, 0
    opening = set(sorted(set(firsts))[:workers])
    span = (max(lasts) - min(firsts)).total_seconds()
    after = sum(1 for f in firsts if f not in opening)
    return (span, after) if after and span > 0 else (wall, len(firsts))


def _span(rows: list[tuple[str, float, datetime, datetime]]) -> float:
    commits = [c for _u, _v, c, _t in rows]
    return (max(commits) - min(commits)).total_seconds() if len(commits) > 1 else 0.0


def _latency(rows: list[tuple[str, float, datetime, datetime]], after: datetime) -> dict[str, float]:
    return _percentiles([(c - t).total_seconds() * 1000 for _u, _v, c, t in rows if t >= after])


def _percentiles(values_ms: list[float]) -> dict[str, float]:
    lat = sorted(values_ms)
    if not lat:
        return {}

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1)

    return {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "max": round(lat[-1], 1), "n": len(lat)}


def _wait_stored(count: Any, target: int, what: str, stall: float = 60) -> None:
    """Until count() reaches target; fails when nothing moves for `stall` seconds."""
    last, moved = -1.0, time.monotonic()
    while True:
        n = count()
        if n >= target:
            return
        if n != last:
            last, moved = n, time.monotonic()
        elif time.monotonic() - moved > stall:
            raise VerificationError(f"{what}: stuck at {n:.0f} of {target} for {stall:.0f} s")
        time.sleep(0.25)


def _baseline_count(url: str, run: str) -> float:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT count(*) FROM baseline_readings WHERE metric = 'seq' AND device LIKE %s",
                        (run + "-%",)).fetchone()
    return float(row[0]) if row else 0.0


def _usage(**watches: Watch | None) -> dict[str, dict[str, float]]:
    out = {}
    for name, w in watches.items():
        if w is not None:
            u: Usage = w.stop()
            out[name] = {"cpu_percent": round(u.cpu_percent, 1), "peak_mb": round(u.peak_mb, 1),
                         "hwm_mb": round(u.hwm_mb, 1)}
    return out


def _watch(pid: int | None, tree: bool = False) -> Watch | None:
    return Watch(pid, tree=tree) if pid else None


# --- scenarios ---------------------------------------------------------------------------------------


def _root(run: str) -> str:
    """The scenario's own topic root (see the module's docstring)."""
    return f"{PREFIX}/{run}"


def _spec(svc: Services, plan: Plan, run: str, messages: int, rate: float = 0, duration: float = 0, *,
          shape: str = "native", base_time: float = 0.0, timing: bool = False) -> PublisherSpec:
    per_proc = -(-messages // plan.publishers) if messages else 0
    return PublisherSpec(mqtt_url=svc.mqtt_url, prefix=_root(run), run=run, devices=DEVICES, messages=per_proc,
                         rate=rate / plan.publishers, duration=duration, payload_bytes=plan.payload_bytes,
                         shape=shape, base_time=base_time, timing=timing)


def _device_budget(plan: Plan) -> int | None:
    """ingest.max_new_devices_per_minute for the run's fleet, when the default (1,000) is too small: all
    of a scenario's devices are new within its first second, and beyond the budget their readings would
    be rejected (too_many_new_series), i.e. missing."""
    devices = plan.publishers * DEVICES
    return devices if devices > 1000 else None


def _consumer_watch(pid: int, workers: int) -> Watch:
    """The service's usage: with workers, the supervisor's whole process tree."""
    return Watch(pid, tree=workers > 1)


def _stored_counter(http: str, workers: int, before: float = 0.0) -> Any:
    """A count of the messages the service has acknowledged after their commit (all workers), for
    _wait_stored."""
    return lambda: acked_by_ingest(http, workers) - before


@contextmanager
def profiled(pid: int, out: Path, py_spy: str | None, workers: int = 1) -> Iterator[None]:
    """Sample the process with py-spy (if asked) into collapsed stacks, and print where time goes.
    With several workers the supervisor's pid is given: its worker processes are sampled too."""
    if not py_spy:
        yield
        return
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--nonblocking", "--rate", "200",
                            *(["--subprocesses"] if workers > 1 else []),
                            "--format", "raw", "--output", str(out)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    _say(profile_summary(out))


def profile_summary(path: Path, top: int = 15) -> str:
    """Self and inclusive sample shares per function, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = []
        for f in stack.split(";"):  # "Client.loop_read (paho/mqtt/client.py:2102)"
            func, _, where = f.partition(" (")
            frames.append(f"{func} {where.rstrip(')').rsplit('/', 1)[-1]}".strip())
        count = int(n)
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    lines = [f"profile ({total} samples) {path}", "  self%  incl%  function"]
    for f, samples in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * samples / total:5.1f}  {100 * incl[f] / total:5.1f}  {f}")
    lines.append("  share of samples per part of the service (a sample counts for the first part its stack holds):")
    for part, samples in profile_parts(path).items():
        lines.append(f"  {100 * samples / max(total, 1):5.1f}  {part}")
    return "\n".join(lines)


# The parts of the service a profile is summed into (BENCHMARKS.md, issue #17), each by the frames
# that mark it, tried in this order.
PROFILE_PARTS = (
    ("MQTT receive: socket reads, packet decoding, hand-over", ("Client.loop_read", "MqttBridge._on_readable")),
    ("PUBACKs", ("MqttBridge._send_acks",)),
    ("decoding (JSON, the format's decoder)", ("ingest/decoders/",)),
    ("validation and the catalog", ("ingest/validate.py", "ingest/catalog/")),
    ("the rest of processing (routing, outcome)", ("Processor.process",)),
    ("write (COPY, ids, alert stage, commit)", ("Writer.write", "Writer.touch_devices")),
    ("pipeline (batching, metrics)", ("Pipeline.consume", "Pipeline.write_loop", "Pipeline._commit")),
    ("event loop idle", ("EpollSelector.select",)),
)


def profile_parts(path: Path) -> dict[str, int]:
    """Samples per part of the service (PROFILE_PARTS, then "other"), from py-spy's collapsed stacks."""
    out = {name: 0 for name, _ in PROFILE_PARTS} | {"other (HTTP, gauges, evaluator)": 0}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        part = next((name for name, marks in PROFILE_PARTS if any(m in stack for m in marks)),
                    "other (HTTP, gauges, evaluator)")
        out[part] += int(n)
    return out


def drain(svc: Services, plan: Plan, work: Path, baseline: bool, py_spy: str | None = None) -> Result:
    name = "baseline-drain" if baseline else "ingest-drain"
    run = ("bl" if baseline else "dr") + uuid.uuid4().hex[:6]
    messages = plan.baseline_messages if baseline else plan.drain_messages
    if baseline:
        consumer, http = baseline_consumer(work, svc, f"{_root(run)}/+/up"), ""
    else:
        consumer, http = ingest_consumer(work, svc, name, topic_root=_root(run), workers=plan.workers,
                                         new_devices=_device_budget(plan))
    consumer.start()  # creates the persistent session that holds the backlog
    consumer.stop()
    load = publish(_spec(svc, plan, run, messages), plan.publishers)
    _say(f"{name}: {load.total_acked} messages acknowledged by the broker in {load.seconds:.1f} s "
         f"({load.total_acked / load.seconds:,.0f}/s, {plan.publishers} publisher processes)")
    brk, db = _watch(svc.broker_pid), _watch(svc.database_pid, tree=True)
    t0 = time.monotonic()
    pid = consumer.start()
    me = _consumer_watch(pid, 1 if baseline else plan.workers)
    try:
        with profiled(pid, work / f"{name}.pyspy.txt", py_spy, 1 if baseline else plan.workers):
            if baseline:
                _wait_stored(lambda: _baseline_count(svc.database_url, run), load.total_acked, name)
            else:
                _wait_stored(_stored_counter(http, plan.workers), load.total_acked, name)
            wall = time.monotonic() - t0
            usage = _usage(consumer=me, broker=brk, database=db)
    finally:
        consumer.stop()
    rows = _rows(svc.database_url, baseline, run)
    verified = verify(rows, load, run)
    commits = [c for _u, _v, c, _t in rows]
    span, counted = drained_over(commits, commits, wall, 1 if baseline else plan.workers)
    per_msg = readings_per_message(plan.payload_bytes)
    n = load.total_acked
    return Result(name, n, n * per_msg, round(span, 2), round(wall, 2), round(counted / span, 1),
                  round(counted * per_msg / span, 1), None, usage, verified,
                  {"publish_per_s": round(n / load.seconds, 1), "workers": 1 if baseline else plan.workers,
                   "measured_messages": counted})


_ALERT_EVENT_COUNTS = """
SELECT e.status, count(*) FROM alert_events e JOIN devices d ON d.id = e.device_id WHERE d.uid LIKE %s GROUP BY 1
"""
_LAST_EVENT = """
SELECT max(pg_xact_commit_timestamp(e.xmin)) FROM alert_events e JOIN devices d ON d.id = e.device_id
WHERE d.uid LIKE %s
"""


def _baseline_rows(url: str, run: str) -> float:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT count(*) FROM baseline_readings WHERE device LIKE %s", (run + "-%",)).fetchone()
    return float(row[0]) if row else 0.0


def target_drain(svc: Services, plan: Plan, work: Path, shape: str, baseline: bool,
                 py_spy: str | None = None) -> Result:
    """drain-<shape> or baseline-<shape>: a backlog of bench.shapes' messages, drained like ingest-drain;
    the service runs with the catalog (on by default) and bench.targets' 20 rules of plan.target_rules."""
    s = SHAPES[shape]
    name = f"{'baseline' if baseline else 'drain'}-{shape}"
    run = ("tb" if baseline else "td") + uuid.uuid4().hex[:6]
    messages = plan.target_messages(shape, baseline)
    workers = 1 if baseline else plan.workers
    # A whole second in the past, so that every message's time (10 ms apart per process) is older than
    # the alert watermark, and none is ahead of the receive time.
    per_proc = -(-messages // plan.publishers)
    base = float(int(time.time()) - per_proc * STEP_MS // 1000 - 60)
    if baseline:
        consumer, http = baseline_consumer(work, svc, f"{_root(run)}/+/{s.suffix}", name), ""
    else:
        consumer, http = ingest_consumer(work, svc, name, topic_root=_root(run), format=s.format, suffix=s.suffix,
                                         extra=targets.target_rules(run, plan.target_rules), workers=workers,
                                         new_devices=_device_budget(plan))
    consumer.start()  # creates the persistent session that holds the backlog
    consumer.stop()
    load = publish(_spec(svc, plan, run, messages, shape=shape, base_time=base), plan.publishers)
    _say(f"{name}: {load.total_acked} messages acknowledged by the broker in {load.seconds:.1f} s "
         f"({load.total_acked / load.seconds:,.0f}/s, {plan.publishers} publisher processes)")
    brk, db = _watch(svc.broker_pid), _watch(svc.database_pid, tree=True)
    t0 = time.monotonic()
    pid = consumer.start()
    me = _consumer_watch(pid, workers)
    try:
        with profiled(pid, work / f"{name}.pyspy.txt", py_spy, 1 if baseline else workers):
            if baseline:
                _wait_stored(lambda: _baseline_rows(svc.database_url, run) / s.readings, load.total_acked, name)
            else:
                _wait_stored(_stored_counter(http, workers), load.total_acked, name)
            wall = time.monotonic() - t0
            usage = _usage(consumer=me, broker=brk, database=db)
        if not baseline:
            # Judged in the batch (the readings are older than the watermark); the evaluator takes any left.
            _wait_stored(lambda: _judged(svc.database_url, run), 0, f"{name} judgements")
    finally:
        consumer.stop()
    with psycopg.connect(svc.database_url) as c:
        rows = c.execute(targets.groups_sql(baseline), {"base_ms": int(base * 1000), "run": run + "-%"}).fetchall()
        events: dict[str, int] = {} if baseline else dict(c.execute(_ALERT_EVENT_COUNTS, (run + "-%",)).fetchall())
        last_event = None if baseline else c.execute(_LAST_EVENT, (run + "-%",)).fetchone()[0]
    verified = targets.verify_messages(targets.group([(u, k, n) for u, k, n, _a, _b in rows], run), load, run,
                                       s.readings, DEVICES)
    span, counted = drained_over([r[3] for r in rows], [r[4] for r in rows], wall, 1 if baseline else workers)
    n = load.total_acked
    extra: dict[str, Any] = {"shape": shape, "format": "baseline" if baseline else s.format,
                             "readings_per_message": s.readings, "publish_per_s": round(n / load.seconds, 1),
                             "workers": workers, "measured_messages": counted}
    if not baseline:
        got = {"firing": int(events.get("firing", 0)), "resolved": int(events.get("resolved", 0))}
        want = targets.expected_events(load, run, plan.target_rules, DEVICES, resolved_in_message=s.readings > 5)
        extra |= {"rules": 0 if plan.target_rules == "none" else len(targets.TARGET_THRESHOLDS),
                  "rule_scope": plan.target_rules, "rule_devices": targets.rule_devices(run, plan.target_rules),
                  "thresholds_degc": [targets.TARGET_THRESHOLDS[0], targets.TARGET_THRESHOLDS[-1]],
                  "alert_events": got, "alert_events_expected": want,
                  # The last event's commit after the last reading's: judged in the batch, at most a
                  # batch's; judged after a backlog (ingest.alerts.catchup), the evaluator's rounds.
                  "last_event_after_s": (round((last_event - max(r[4] for r in rows)).total_seconds(), 2)
                                         if last_event is not None and rows else None)}
        if got != want:
            raise VerificationError(f"{run}: alert events {got}, but the messages must raise {want} (bench.targets)")
    return Result(name, n, n * s.readings, round(span, 2), round(wall, 2), round(counted / span, 1) if span else 0.0,
                  round(counted * s.readings / span, 1) if span else 0.0, None, usage, verified, extra)


class _MetricsAt(threading.Thread):
    """Reads every worker's /metrics once, ``delay`` seconds from now (the end of the warm-up)."""

    def __init__(self, http: str, delay: float, workers: int) -> None:
        super().__init__(name="metrics-at-warmup", daemon=True)
        self.http, self.delay, self.workers = http, delay, workers
        self.text: list[str] | None = None
        self.start()

    def run(self) -> None:
        time.sleep(self.delay)
        self.text = metrics_text(self.http, self.workers)


def breakdown(rows: list[tuple[str, float, datetime, datetime]], load: LoadResult, run: str, after: datetime,
              metrics_before: list[str] | None, metrics_after: list[str]) -> dict[str, Any]:
    """bench.latency's parts of publish-to-commit, for the messages published after the warm-up."""
    commits = {}
    for uid, value, commit, _t in rows:
        commits[(int(uid[len(run) + 2 :].split("-", 1)[0]), int(value))] = commit.timestamp()
    out: dict[str, Any] = {"publisher": latency.publish_breakdown(load.timing, commits, after.timestamp())}
    if metrics_before is not None:
        service = latency.service_breakdown(latency.summed(metrics_before), latency.summed(metrics_after))
        out["service"] = service
        out["broker_and_network"] = latency.broker_and_network(out["publisher"]["publish_to_commit"], service)
    return out


def live(svc: Services, plan: Plan, work: Path) -> Result:
    name, run = "ingest-live", "lv" + uuid.uuid4().hex[:6]
    consumer, http = ingest_consumer(work, svc, name, topic_root=_root(run), workers=plan.workers,
                                     new_devices=_device_budget(plan))
    pid = consumer.start()
    try:
        before = acked_by_ingest(http, plan.workers)
        me, brk, db = _consumer_watch(pid, plan.workers), _watch(svc.broker_pid), _watch(svc.database_pid, tree=True)
        started = datetime.now(UTC)
        t0 = time.monotonic()
        at_warmup = _MetricsAt(http, plan.warmup_seconds, plan.workers)
        load = publish(_spec(svc, plan, run, 0, plan.live_rate, plan.warmup_seconds + plan.live_seconds,
                             timing=True), plan.publishers)
        _wait_stored(_stored_counter(http, plan.workers, before), load.total_acked, name)
        wall = time.monotonic() - t0
        usage = _usage(consumer=me, broker=brk, database=db)
        at_warmup.join(10)
        metrics_after = metrics_text(http, plan.workers)
    finally:
        consumer.stop()
    rows = _rows(svc.database_url, False, run)
    verified = verify(rows, load, run)
    after = datetime.fromtimestamp(started.timestamp() + plan.warmup_seconds, UTC)
    lat = _latency(rows, after)
    span = _span(rows)
    per_msg = readings_per_message(plan.payload_bytes)
    n = load.total_acked
    return Result(name, n, n * per_msg, round(span, 2), round(wall, 2), round(n / span, 1),
                  round(n * per_msg / span, 1), lat, usage, verified,
                  {"offered_per_s": plan.live_rate, "warmup_s": plan.warmup_seconds, "workers": plan.workers,
                   "latency_breakdown": breakdown(rows, load, run, after, at_warmup.text, metrics_after)})


# --- ingest-alerts: the rules, the webhook receiver, and the check that each event arrived once -----------

ALERT_SECRET_ENV = "SENSOR_INGEST_WEBHOOK_BENCH_SECRET"
ALERT_THRESHOLDS = tuple(float(t) for t in range(11, 31))  # degC: 20 levels inside the loadgen's 10.0-32.2 degC
ALERT_HYSTERESIS = 0.5  # degC: each rule's episode ends this far below its threshold

_ALERT_EVENTS = """
SELECT e.id, e.notified, o.id
FROM alert_events e JOIN devices d ON d.id = e.device_id LEFT JOIN alert_outbox o ON o.event_id = e.id
WHERE d.uid LIKE %s
"""
_OUTBOX_SETTLED = """
SELECT count(*) FILTER (WHERE o.status <> 'pending'), count(*)
FROM alert_outbox o JOIN alert_events e ON e.id = o.event_id JOIN devices d ON d.id = e.device_id
WHERE d.uid LIKE %s
"""

# The run's series whose readings still wait for the watermark (alerts.lateness) to be judged.
_WAITING = """
SELECT count(*) FROM alert_state s JOIN devices d ON d.id = s.device_id
WHERE d.uid LIKE %s AND s.due_at IS NOT NULL
"""


def _judged(url: str, run: str) -> int:
    """0 once every reading of the run's series has been judged (then -(the series waiting))."""
    with psycopg.connect(url) as c:
        row = c.execute(_WAITING, (run + "-%",)).fetchone()
    return -int(row[0]) if row else 0


def alert_devices(run: str, per_process: int) -> str:
    """The glob of the devices the rules select: d0000, d0100, ... of each publisher process.

    A device's temperature steps through 4 values 5.6 degC apart, one per message it gets (device d
    gets seq d + 500 k, and seq % 400 sets the value, so it moves by 100 / 10 degF a message), and
    wraps; devices 100 apart are one step apart, so their events do not all come at once."""
    if not 1 <= per_process <= 5:
        raise ValueError(f"alert devices per publisher process: 1 to 5, not {per_process}")
    return f"{run}-p*-d0[0-{per_process - 1}]00"


def alert_config(run: str, url: str, per_process: int, lateness: float = 0.5) -> str:
    """[alerts] lateness, one [[webhooks]] entry (``url``, its secret from ALERT_SECRET_ENV) and a
    [[rules]] entry per threshold T of ALERT_THRESHOLDS: `temperature` above T, clear
    T - ALERT_HYSTERESIS, on the devices of alert_devices()."""
    glob = alert_devices(run, per_process)
    parts = [f"""
[alerts]
lateness = {lateness}

[[webhooks]]
name = "bench"
url = "{url}"
secret_env = "{ALERT_SECRET_ENV}"
timeout = 5.0
"""]
    for t in ALERT_THRESHOLDS:
        parts.append(f"""
[[rules]]
name = "temperature-above-{t:g}"
metric = "temperature"
devices = ["{glob}"]
above = {t}
clear = {t - ALERT_HYSTERESIS}
webhooks = ["bench"]
summary = "{{device}}: temperature {{value}} {{unit}} (threshold {{threshold}})"
""")
    return "".join(parts)


@dataclass(frozen=True)
class Delivery:
    """A request the receiver took: its signature verified, its body a StandardBody."""

    webhook_id: str
    event: str  # the body's id: evt_<alert_events.id>
    status: str  # firing, resolved
    event_time: datetime  # the reading's time, which the loadgen set to its publish time
    arrived: datetime  # the receiver's clock once the whole body was read


class Receiver:
    """The webhook receiver: http.server on 127.0.0.1 in a thread of the bench process, HTTP/1.1 with
    keep-alive as a real receiver would be. Each request is checked as a receiver must check it
    (ingest.alerts.sign.verify on the raw bytes, then the body against StandardBody) and answered 200;
    one that fails either is answered 400 and kept in ``refused``."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self._deliveries: list[Delivery] = []
        self._refused: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def take(self, headers: Any, body: bytes, arrived: datetime) -> bool:
        try:
            webhook_id = verify_signature(self.secret, headers, body)
            event = StandardBody.model_validate_json(body)
        except (SignatureError, ValidationError) as exc:
            with self._lock:
                self._refused.append(f"{headers.get('webhook-id')}: {type(exc).__name__}: {str(exc)[:200]}")
            return False
        with self._lock:
            self._deliveries.append(Delivery(webhook_id, event.id, event.status, event.event_time, arrived))
        return True

    def taken(self) -> tuple[list[Delivery], list[str]]:
        """(the deliveries, the refused requests), so far."""
        with self._lock:
            return list(self._deliveries), list(self._refused)

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                ok = receiver.take(self.headers, body, datetime.now(UTC))
                self.send_response(200 if ok else 400)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="webhook-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def verify_alerts(events: list[tuple[int, bool, int | None]], deliveries: list[Delivery], refused: list[str],
                  run: str) -> str:
    """Every notified event's delivery arrived exactly once (by webhook-id, with that event's body),
    nothing else arrived, and every request verified. Raises VerificationError, loudly, otherwise.

    ``events``: (alert_events.id, notified, alert_outbox.id or None) of this run, a row per outbox row."""
    expected: dict[str, str] = {}  # webhook-id -> the body's id
    unsent: list[int] = []
    quiet = 0
    for event, notified, outbox in events:
        if outbox is not None:
            expected[f"msg_{outbox}"] = f"evt_{event}"
        elif notified:
            unsent.append(event)
        else:
            quiet += 1
    got = Counter(d.webhook_id for d in deliveries)
    missing = sorted(expected.keys() - got.keys())
    doubled = sorted((k, n) for k, n in got.items() if n > 1)
    unknown = sorted(got.keys() - expected.keys())
    wrong = sorted({d.webhook_id for d in deliveries if d.webhook_id in expected and d.event != expected[d.webhook_id]})
    problems = []
    if not expected and not unsent:
        problems.append("no alert event was notified, so nothing was measured")
    if unsent:
        problems.append(f"{len(unsent)} notified events have no outbox row (e.g. {sorted(unsent)[:5]})")
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} deliveries never arrived (e.g. {missing[:5]})")
    if doubled:
        problems.append(f"{len(doubled)} arrived more than once (e.g. {doubled[:5]})")
    if unknown:
        problems.append(f"{len(unknown)} arrived that no outbox row of this run sent (e.g. {unknown[:5]})")
    if wrong:
        problems.append(f"{len(wrong)} arrived with another event's body (e.g. {wrong[:5]})")
    if refused:
        problems.append(f"{len(refused)} requests were refused by the receiver (e.g. {refused[:3]})")
    if problems:
        raise VerificationError(f"{run} alerts: " + "; ".join(problems))
    return (f"ok: {len(expected)} events notified, {len(expected)} delivered once each (by webhook-id, "
            f"signature verified), {quiet} recorded not notified")


# The temperature readings of the devices the rules select, and the events recorded for them.
_ALERT_READINGS = """
SELECT r.device_id, r.time, r.value
FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id
WHERE d.uid ~ %s AND m.name = 'temperature'
ORDER BY r.device_id, r.time
"""
_RECORDED = """
SELECT e.rule, e.device_id, e.status, e.event_time
FROM alert_events e JOIN devices d ON d.id = e.device_id
WHERE d.uid ~ %s
"""


def verify_alert_script(url: str, run: str, per_process: int) -> str:
    """The events recorded are exactly those of the rules judged, by a state machine written here, on
    every stored reading of each series in event-time order (what one worker gives, and what several
    must give): each rule fires when the value goes above its threshold and resolves at or below its
    clear level. Raises VerificationError naming what is missing or extra (a reading not judged, or
    judged out of order)."""
    pattern = f"^{re.escape(run)}-p[0-9]+-d0[0-{per_process - 1}]00$"
    with psycopg.connect(url) as c:
        readings = c.execute(_ALERT_READINGS, (pattern,)).fetchall()
        recorded = Counter((rule, d, status, t) for rule, d, status, t in c.execute(_RECORDED, (pattern,)))
    expected: Counter[tuple[str, int, str, datetime]] = Counter()
    last: dict[int, datetime] = {}
    by_device: dict[int, list[tuple[datetime, float]]] = {}
    for d, t, v in readings:
        by_device.setdefault(d, []).append((t, v))
        last[d] = t
    for t_ in ALERT_THRESHOLDS:
        name = f"temperature-above-{t_:g}"
        for d, series in by_device.items():
            firing = False
            for t, v in series:
                if not firing and v > t_:
                    firing = True
                    expected[name, d, "firing", t] += 1
                elif firing and v <= t_ - ALERT_HYSTERESIS:
                    firing = False
                    expected[name, d, "resolved", t] += 1
    missing, extra = expected - recorded, recorded - expected
    if missing or extra:
        def say(events: Counter[tuple[str, int, str, datetime]]) -> str:
            shown = sorted(events)[:6]
            return ", ".join(f"{r} device {d} {st} at {t.isoformat()}"
                             f"{' (its last reading)' if last.get(d) == t else ''}" for r, d, st, t in shown)
        raise VerificationError(f"{run} alerts: of {sum(expected.values())} events the stored readings give, "
                                f"{sum(missing.values())} were not recorded ({say(missing)}) and "
                                f"{sum(extra.values())} recorded are not among them ({say(extra)})")
    return f"the {sum(expected.values())} events the stored readings give, each recorded once"


def _webhook_latency(deliveries: list[Delivery], after: datetime) -> dict[str, float]:
    return _percentiles([(d.arrived - d.event_time).total_seconds() * 1000 for d in deliveries
                         if d.event_time >= after])


# Where an alert's time goes, per delivered event: its event time, the commit of the transaction that
# recorded it (judged: the lateness, the wait for a batch or the evaluator, the commit), and when the
# dispatcher marked it delivered (the receiver had answered).
_EVENT_TIMES = """
SELECT e.event_time, pg_xact_commit_timestamp(e.xmin), o.delivered_at
FROM alert_outbox o JOIN alert_events e ON e.id = o.event_id JOIN devices d ON d.id = e.device_id
WHERE d.uid LIKE %s AND o.status = 'delivered'
"""


def _alert_breakdown(url: str, run: str, after: datetime) -> dict[str, dict[str, float]]:
    """Event time to the event's commit, and that commit to its delivery, in ms, per delivered event."""
    with psycopg.connect(url) as c:
        rows = c.execute(_EVENT_TIMES, (run + "-%",)).fetchall()
    rows = [(t, committed, done) for t, committed, done in rows if t >= after and committed is not None]
    return {
        "event_to_recorded": _percentiles([(committed - t).total_seconds() * 1000 for t, committed, _ in rows]),
        "recorded_to_delivered": _percentiles([(done - committed).total_seconds() * 1000
                                               for _, committed, done in rows if done is not None]),
    }


def _outbox_settled(url: str, run: str) -> tuple[int, int]:
    """(this run's outbox rows delivered or failed, all of them)."""
    with psycopg.connect(url) as c:
        row = c.execute(_OUTBOX_SETTLED, (run + "-%",)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def alerts(svc: Services, plan: Plan, work: Path) -> Result:
    name, run = "ingest-alerts", "al" + uuid.uuid4().hex[:6]
    rate = plan.alerts_rate or plan.live_rate
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with Receiver(secret) as receiver:
        consumer, http = ingest_consumer(work, svc, name, extra=alert_config(run, receiver.url, plan.alert_devices,
                                                                          plan.alerts_lateness),
                                         env={ALERT_SECRET_ENV: secret}, topic_root=_root(run), workers=plan.workers,
                                         new_devices=_device_budget(plan))
        pid = consumer.start()
        try:
            before = acked_by_ingest(http, plan.workers)
            me, brk, db = _consumer_watch(pid, plan.workers), _watch(svc.broker_pid), _watch(svc.database_pid,
                                                                                            tree=True)
            started = datetime.now(UTC)
            t0 = time.monotonic()
            at_warmup = _MetricsAt(http, plan.warmup_seconds, plan.workers)
            load = publish(_spec(svc, plan, run, 0, rate, plan.warmup_seconds + plan.live_seconds, timing=True),
                           plan.publishers)
            _wait_stored(_stored_counter(http, plan.workers, before), load.total_acked, name)
            wall = time.monotonic() - t0
            at_warmup.join(10)
            metrics_after = metrics_text(http, plan.workers)
            # Every reading stored; the last ones are judged once the watermark (the clock minus
            # alerts.lateness) has passed them; then the outbox is complete.
            _wait_stored(lambda: _judged(svc.database_url, run), 0, f"{name} judgements")
            # alert_readings_late_total: readings behind their series' judged time, stored but not judged
            late = int(counter_total(metrics_text(http, plan.workers), "alert_readings_late"))
            outbox = _outbox_settled(svc.database_url, run)[1]
            _wait_stored(lambda: _outbox_settled(svc.database_url, run)[0], outbox, f"{name} deliveries")
            delivered_wall = time.monotonic() - t0
            usage = _usage(consumer=me, broker=brk, database=db)
        finally:
            consumer.stop()
        deliveries, refused = receiver.taken()
    rows = _rows(svc.database_url, False, run)
    verified = verify(rows, load, run)
    with psycopg.connect(svc.database_url) as c:
        events = c.execute(_ALERT_EVENTS, (run + "-%",)).fetchall()
    alerts_verified = verify_alerts(events, deliveries, refused, run)
    alerts_verified += "; " + verify_alert_script(svc.database_url, run, plan.alert_devices)
    after = datetime.fromtimestamp(started.timestamp() + plan.warmup_seconds, UTC)
    lat = _latency(rows, after)
    hook = _webhook_latency(deliveries, after)
    parts = _alert_breakdown(svc.database_url, run, after)
    span = _span(rows)
    per_msg = readings_per_message(plan.payload_bytes)
    n = load.total_acked
    status = Counter(d.status for d in deliveries)
    # The warm-up is counted from before the publisher processes start, as in ingest-live; the rate of
    # events is over what was published after it.
    first, last = min(t for *_, t in rows), max(t for *_, t in rows)
    window = (last - after).total_seconds()
    return Result(name, n, n * per_msg, round(span, 2), round(wall, 2), round(n / span, 1),
                  round(n * per_msg / span, 1), lat, usage, verified, {
                      "offered_per_s": rate, "warmup_s": plan.warmup_seconds, "measured_s": plan.live_seconds,
                      "rules": len(ALERT_THRESHOLDS), "lateness_s": plan.alerts_lateness,
                      "thresholds_degc": [ALERT_THRESHOLDS[0], ALERT_THRESHOLDS[-1]], "clear_below": ALERT_HYSTERESIS,
                      "alert_devices": plan.alert_devices * plan.publishers,
                      "devices_glob": alert_devices(run, plan.alert_devices), "webhooks": 1,
                      "events_delivered": len(deliveries), "firing": status["firing"], "resolved": status["resolved"],
                      "events_per_s": round(hook.get("n", 0) / window, 1) if window > 0 else 0.0,
                      "warmup_after_first_publish_s": round((after - first).total_seconds(), 2),
                      "webhook_latency_ms": hook, "alert_parts_ms": parts, "alerts_verified": alerts_verified,
                      "delivered_wall_s": round(delivered_wall, 2), "workers": plan.workers,
                      "readings_late": late,
                      "latency_breakdown": breakdown(rows, load, run, after, at_warmup.text, metrics_after)})


# --- output ----------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def target_ratios(results: list[Result]) -> dict[str, float]:
    """drain-<shape> / baseline-<shape> in readings/s, for each shape whose two ran."""
    by = {r.name: r for r in results}
    return {shape: round(by[f"drain-{shape}"].readings_per_s / by[f"baseline-{shape}"].readings_per_s, 2)
            for shape in SHAPES
            if f"drain-{shape}" in by and f"baseline-{shape}" in by and by[f"baseline-{shape}"].readings_per_s}


def table(results: list[Result], ratio: float | None, ratios: dict[str, float] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="sensor-ingest benchmark")
    for col in ("scenario", "messages", "msg/s", "readings/s", "latency ms\np50/p95/p99",
                "consumer\nCPU % / MB", "broker\nCPU % / MB", "database\nCPU % / MB"):
        t.add_column(col, justify="right" if col != "scenario" else "left")

    def use(r: Result, who: str) -> str:
        u = r.usage.get(who)
        return f"{u['cpu_percent']:.0f} / {max(u['peak_mb'], u['hwm_mb']):.0f}" if u else "n/a"

    for r in results:
        lat = "/".join(f"{r.latency_ms[p]:.0f}" for p in ("p50", "p95", "p99")) if r.latency_ms else "—"
        t.add_row(r.name, f"{r.messages:,}", f"{r.messages_per_s:,.0f}", f"{r.readings_per_s:,.0f}", lat,
                  use(r, "consumer"), use(r, "broker"), use(r, "database"))
    console = Console(width=max(Console().width, 120))
    console.print(t)
    if ratio is not None:
        console.print(f"ingest-drain / baseline-drain: [bold]{ratio:.1f} x[/bold] the straightforward approach "
                      "(messages/s, same broker, database and backlog shape)")
    for shape, x in (ratios or {}).items():
        console.print(f"drain-{shape} / baseline-{shape}: [bold]{x:.1f} x[/bold] the straightforward approach "
                      "(readings/s, same run, same message shape)")
    for r in results:
        if "alert_events_expected" in r.extra:
            console.print(target_line(r))
    for r in results:
        if "webhook_latency_ms" in r.extra:
            console.print(*alerts_table(r), sep="\n")
        if "latency_breakdown" in r.extra:
            console.print(*breakdown_table(r), sep="\n")


def target_line(r: Result) -> str:
    """What a target drain ran with: its shape, its rules and the events they raised."""
    x = r.extra
    ev = x["alert_events"]
    rules = (f"{x['rules']} rules (temperature above {x['thresholds_degc'][0]:g} to {x['thresholds_degc'][1]:g} "
             f"degC) on {'every device' if x['rule_scope'] == 'fleet' else '4 devices'}, {ev['firing']:,} firing "
             f"and {ev['resolved']:,} resolved events recorded" if x["rules"] else "no alert rules")
    want = x.get("alert_events_expected") or ev
    if x["rules"] and want != ev:  # a result of an earlier release: a run now fails instead
        rules += (f" [bold red]instead of the {want['firing']:,} and {want['resolved']:,} the messages must raise: "
                  "the alert guarantees do not hold in this run[/bold red]")
    after = x.get("last_event_after_s")
    if after is not None:
        rules += f", the last {after:.2f} s after the last reading's commit"
    return (f"{r.name}: {x['readings_per_message']} readings a message ({x['format']}), catalog on, {rules}; "
            f"{x['workers']} worker(s)")


_PARTS = (
    ("publisher", "behind_schedule", "publisher behind its rate schedule (not in the latency)"),
    ("publisher", "window_wait", "publisher waiting for its window of 1,000 (not in the latency)"),
    ("publisher", "publish_to_puback", "publish() to PUBACK at the publisher"),
    ("publisher", "publish_to_commit", "publish() to commit (the latency)"),
    ("publisher", "puback_to_commit", "PUBACK to commit"),
    ("publisher", "want_to_commit", "before the window wait to commit (the old measure)"),
    ("service", "receive_to_commit", "service: receive to commit returned (histogram*)"),
    ("service", "flush", "service: one batch's write + commit (histogram*)"),
)


def breakdown_table(r: Result) -> list[Any]:
    """The parts of r's publish-to-commit latency (bench.latency), one row each."""
    from rich.table import Table

    b = r.extra["latency_breakdown"]
    t = Table(title=f"{r.name}: where publish-to-commit goes (ms)")
    for col in ("part", "n", "mean", "p50", "p95", "p99", "max"):
        t.add_column(col, justify="left" if col == "part" else "right")

    def cell(part: dict[str, float], k: str) -> str:
        v = part.get(k)
        if v is None:
            return "—"
        text = "inf" if v == float("inf") else f"{v:,.1f}"
        return f"{part[k + '_lo']:,.0f}-{text}" if k + "_lo" in part else text

    for group, key, label in _PARTS:
        part = b.get(group, {}).get(key, {})
        if part:
            t.add_row(label, f"{part['n']:,.0f}", *(cell(part, k) for k in ("mean", "p50", "p95", "p99", "max")))
    lines: list[Any] = [t]
    rest = b.get("broker_and_network")
    if rest:
        lines.append(f"broker + network (publish-to-commit - receive-to-commit): mean {rest['mean']:,.1f} to "
                     f"{rest['mean_high']:,.1f} ms; difference of the medians {rest['p50_lo']:,.1f} to "
                     f"{rest['p50_hi']:,.1f} ms")
    batches = b.get("service", {}).get("batch_messages")
    if batches:
        lines.append(f"{batches['n']:,.0f} batches of {batches['mean']:,.1f} messages on average")
    lines.append("* the service's Prometheus histograms over the measured window: p50/p95/p99 are the bucket that "
                 "holds them (lower-upper bound), the mean is exact; they end when COMMIT returned, after the WAL "
                 "flush, while the per-message rows end at PostgreSQL's commit timestamp, before it")
    return lines


def alerts_table(r: Result) -> list[Any]:
    """What ingest-alerts states: its load, its rules and webhook, its events, then the two latencies."""
    from rich.table import Table

    x = r.extra
    t = Table()
    for col in ("latency ms", "n", "p50", "p95", "p99", "max"):
        t.add_column(col, justify="left" if col == "latency ms" else "right")
    parts = x.get("alert_parts_ms", {})
    for label, lat in (("publish-to-commit", r.latency_ms or {}), ("publish-to-webhook", x["webhook_latency_ms"]),
                       ("  event time to the event's commit", parts.get("event_to_recorded", {})),
                       ("  the event's commit to delivered", parts.get("recorded_to_delivered", {}))):
        t.add_row(label, f"{lat.get('n', 0):,.0f}",
                  *(f"{lat[p]:,.1f}" if p in lat else "—" for p in ("p50", "p95", "p99", "max")))
    return [
        f"[bold]{r.name}[/bold]: {x['offered_per_s']:,.0f} msg/s offered for {x['warmup_s']:g} s of warm-up and "
        f"{x['measured_s']:g} s measured",
        f"{x['rules']} threshold rules (temperature above {x['thresholds_degc'][0]:g} to {x['thresholds_degc'][1]:g} "
        f"degC, clear {x['clear_below']:g} below) on {x['alert_devices']} devices, {x['webhooks']} webhook, "
        f"alerts.lateness {x.get('lateness_s', 0):g} s (every alert waits that long)",
        f"{x['events_delivered']:,} events delivered ({x['firing']:,} firing, {x['resolved']:,} resolved), each "
        f"exactly once; {x['events_per_s']:,.1f} events/s after the warm-up; {x.get('readings_late', 0):,} readings "
        f"came later than the lateness (not judged) over {x.get('workers', 1)} worker(s)",
        t,
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the long run (1,000,000-message backlog, 60 s live)")
    ap.add_argument("--drain-messages", type=int, help="backlog size of ingest-drain")
    ap.add_argument("--baseline-messages", type=int, help="backlog size of baseline-drain")
    ap.add_argument("--live-rate", type=float, help="offered messages/s in ingest-live (all publishers)")
    ap.add_argument("--live-seconds", type=float,
                    help="measured seconds of ingest-live and ingest-alerts, after the warm-up")
    ap.add_argument("--warmup-seconds", type=float,
                    help="seconds of ingest-live and ingest-alerts left out of the latency figures")
    ap.add_argument("--publishers", type=int, help="publisher processes")
    ap.add_argument("--payload-bytes", type=int, help="pad each message with more readings to about this size")
    ap.add_argument("--alerts-rate", type=float,
                    help="offered messages/s in ingest-alerts (all publishers; default: the --live-rate)")
    ap.add_argument("--alert-devices", type=int, choices=range(1, 6), metavar="1-5",
                    help="devices per publisher process that ingest-alerts' 20 rules select (default 2)")
    ap.add_argument("--alerts-lateness", type=float, metavar="SECONDS",
                    help="alerts.lateness of ingest-alerts' service (default 0.5, the service's default): every "
                    "alert waits this long for readings that come out of order")
    ap.add_argument("--only", choices=SCENARIOS, action="append", help="run only these scenarios (repeatable)")
    ap.add_argument("--targets", action="store_true",
                    help="run issue #17's drain targets and their baselines: " + ", ".join(TARGET_SCENARIOS)
                    + " (after the --only ones, if any)")
    ap.add_argument("--senml1-messages", type=int, help="backlog size of drain-senml1 (default 50,000)")
    ap.add_argument("--json5-messages", type=int, help="backlog size of drain-json5 (default 20,000)")
    ap.add_argument("--senml50-messages", type=int, help="backlog size of drain-senml50 (default 4,000)")
    ap.add_argument("--target-baseline-readings", type=int,
                    help="backlog size of each baseline-<shape>, in readings (default 5,000)")
    ap.add_argument("--target-rules", choices=targets.RULE_SCOPES,
                    help="the devices the drain targets' 20 rules select: fleet (every device, the default), few "
                    "(4 devices, as ingest-alerts), none (no rules: what the rules cost)")
    ap.add_argument("--workers", type=int,
                    help="run the service as `sensor-ingest run --workers N` on a shared subscription (mqtt."
                    "shared_group = \"bench\") in every ingest scenario (default 1: as it is, no flag)")
    ap.add_argument("--database-url", help="use this running PostgreSQL (a bench_* database is created)")
    ap.add_argument("--mqtt-url", help="use this running broker")
    ap.add_argument("--profile", nargs="?", const="py-spy", metavar="PY_SPY",
                    help="sample the service with py-spy during ingest-drain and the drain-<shape> targets and "
                    "print where the time goes (with --workers N: every worker, summed) "
                    "(py-spy is not a dependency: pip install py-spy, or give its path)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config key of sensor-ingest in every scenario that runs it, given as its environment "
                    "variable SENSOR_INGEST_<SECTION>__<KEY> (e.g. --set ingest.batch_max_age=0.1 --set "
                    "mqtt.receive_maximum=1024), to measure a default against its alternatives; repeatable; "
                    "recorded in the results; the baseline is not affected")
    ap.add_argument("--json", type=Path, help="write the results here (default bench/results/<time>.json)")
    args = ap.parse_args(argv)
    settings: dict[str, str] = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (eq and dot and section and name and "." not in name):
            ap.error(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. ingest.batch_max_age=0.1")
        settings[f"{section}.{name}"] = value
    if bool(args.database_url) != bool(args.mqtt_url):
        ap.error("--database-url and --mqtt-url go together (or neither: private services are started)")
    plan = FULL if args.full else QUICK
    names = ("drain_messages", "baseline_messages", "live_rate", "live_seconds", "warmup_seconds", "publishers",
             "payload_bytes", "alerts_rate", "alert_devices", "alerts_lateness", "senml1_messages", "json5_messages",
             "senml50_messages", "target_baseline_readings", "target_rules", "workers")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    plan = Plan(**{**asdict(plan), **overrides})
    if plan.alerts_rate is None:
        plan = replace(plan, alerts_rate=plan.live_rate)
    py_spy = shutil.which(args.profile) if args.profile else None
    if args.profile and not py_spy:
        ap.error(f"--profile: {args.profile} not found (pip install py-spy)")
    if plan.workers < 1:
        ap.error("--workers: at least 1")
    if args.targets:
        scenarios = list(dict.fromkeys([*(args.only or []), *TARGET_SCENARIOS]))
    else:
        scenarios = args.only or list(DEFAULT_SCENARIOS)

    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=RESULTS))
    stamp = datetime.now(UTC)
    results: list[Result] = []
    with services(args) as svc:
        from ingest.store.migrate import migrate

        migrate(svc.database_url)
        subprocess.run([sys.executable, "-m", "bench.baseline", "--database-url", svc.database_url,
                        "--mqtt-url", svc.mqtt_url, "--topic", "-", "--create-table"], check=True, cwd=REPO)
        svc.versions = versions(svc.database_url)
        svc.service_env = {f"SENSOR_INGEST_{k.replace('.', '__').upper()}": v for k, v in settings.items()}
        _say(f"plan: {plan}\nservice config set: {settings or 'none (the defaults)'}\nmachine: {svc.versions}\n"
             f"logs: {work}")
        try:
            for s in scenarios:
                _say(f"--- {s}")
                if s == "ingest-live":
                    r = live(svc, plan, work)
                elif s == "ingest-alerts":
                    r = alerts(svc, plan, work)
                elif s in TARGET_SCENARIOS:
                    kind, _, shape = s.partition("-")
                    r = target_drain(svc, plan, work, shape, kind == "baseline", None if kind == "baseline" else py_spy)
                else:
                    r = drain(svc, plan, work, s == "baseline-drain", None if s == "baseline-drain" else py_spy)
                _say(f"{s}: {r.verified}")
                if "alerts_verified" in r.extra:
                    _say(f"{s}: alerts {r.extra['alerts_verified']}")
                results.append(r)
        except VerificationError as exc:
            _say(f"FAILED: {exc}")
            return 1
    by = {r.name: r for r in results}
    ratio = (by["ingest-drain"].messages_per_s / by["baseline-drain"].messages_per_s
             if "ingest-drain" in by and "baseline-drain" in by else None)
    ratios = target_ratios(results)
    table(results, ratio, ratios)
    out = args.json or RESULTS / f"{stamp:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({
        "date": stamp.isoformat(timespec="seconds"), "command": "python -m bench.run " + " ".join(argv or sys.argv[1:]),
        "machine": svc.versions, "plan": asdict(plan), "service_config": settings, "ratio_vs_baseline": ratio,
        "target_ratios_readings": ratios, "results": [asdict(r) for r in results],
    }, indent=2))
    _say(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
