"""The benchmark runner: `make bench` (quick, a few minutes) or `make bench FULL=1`.

Runs, on one broker and one database, with the same load generator:

1. ingest-drain: a backlog of messages waits at the broker (the service's persistent session holds
   them), then the service starts and drains it. Throughput is the backlog over the span between the
   first and the last commit that stored it.
2. ingest-live: publishers send at a fixed rate while the service runs; after a warm-up, the
   publish-to-commit latency of every message is read from the database (the message's time is its
   publish time; the commit time is PostgreSQL's own commit timestamp, track_commit_timestamp = on).
3. baseline-drain: the same kind of backlog through bench/baseline.py, the straightforward approach
   (paho on_message -> one INSERT per reading, autocommit), for the ratio.

After each, the stored set is checked against what the broker acknowledged: a missing or doubled
message fails the run (exit 1). The figures are printed as a table and written as JSON.

By default private services are started on free ports (Mosquitto with deploy/mosquitto/mosquitto.conf,
PostgreSQL + TimescaleDB with deploy/postgres/postgresql.conf, durable: fsync and synchronous_commit
on). --database-url and --mqtt-url use running ones instead (a database is created there and left).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg

from bench.loadgen import LoadResult, PublisherSpec, publish, readings_per_message
from bench.procstat import Usage, Watch
from tests.services import REPO, Mosquitto, Postgres, free_port, wait_until

RESULTS = REPO / "bench" / "results"
PREFIX = "bench"


@dataclass(frozen=True)
class Plan:
    drain_messages: int
    live_rate: float
    live_seconds: float
    warmup_seconds: float
    baseline_messages: int
    publishers: int
    payload_bytes: int


QUICK = Plan(drain_messages=100_000, live_rate=3_000, live_seconds=20, warmup_seconds=5,
             baseline_messages=10_000, publishers=2, payload_bytes=0)
FULL = Plan(drain_messages=1_000_000, live_rate=5_000, live_seconds=60, warmup_seconds=10,
            baseline_messages=30_000, publishers=3, payload_bytes=0)


@dataclass
class Result:
    name: str
    messages: int
    readings: int
    seconds: float  # first to last commit of this scenario's messages
    wall_seconds: float  # from the consumer's start (drain) or the first publish (live) to all stored
    messages_per_s: float
    readings_per_s: float
    latency_ms: dict[str, float] | None
    usage: dict[str, dict[str, float]]  # process -> Usage
    verified: str
    extra: dict[str, Any] = field(default_factory=dict)


class VerificationError(RuntimeError):
    pass


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
    """The ingest service (or the baseline) as a child process."""

    def __init__(self, argv: list[str], log: Path, ready: Any) -> None:
        self.argv, self.log, self._ready = argv, log, ready
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENSOR_INGEST_")}
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
    mqtt_extra: str = "", log_level: str = "warning",
) -> tuple[Consumer, str]:
    """The service on svc's broker and database (or ``database_url``, e.g. through a fault proxy);
    ``database_extra`` and ``mqtt_extra`` are lines added inside [database] and [mqtt]."""
    http = f"127.0.0.1:{free_port()}"
    config = work / f"{name}.toml"
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
[[sources]]
name = "bench"
topic = "{PREFIX}/{{device}}/up"
format = "native"
""")

    def ready() -> bool:
        try:
            return httpx.get(f"http://{http}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    argv = [sys.executable, "-m", "ingest", "run", "--config", str(config)]
    return Consumer(argv, work / f"{name}.log", ready), http


def baseline_consumer(work: Path, svc: Services) -> Consumer:
    log = work / "baseline.log"
    argv = [sys.executable, "-m", "bench.baseline", "--database-url", svc.database_url, "--mqtt-url",
            svc.mqtt_url, "--topic", f"{PREFIX}/+/up"]

    def ready() -> bool:
        return "subscribed" in log.read_text()

    return Consumer(argv, log, ready)


def acked_by_ingest(http: str) -> float:
    text = httpx.get(f"http://{http}/metrics", timeout=5).text
    m = re.search(r"^sensor_ingest_messages_acked_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


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


def _span(rows: list[tuple[str, float, datetime, datetime]]) -> float:
    commits = [c for _u, _v, c, _t in rows]
    return (max(commits) - min(commits)).total_seconds() if len(commits) > 1 else 0.0


def _latency(rows: list[tuple[str, float, datetime, datetime]], after: datetime) -> dict[str, float]:
    lat = sorted((c - t).total_seconds() * 1000 for _u, _v, c, t in rows if t >= after)
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


def _spec(svc: Services, plan: Plan, run: str, messages: int, rate: float = 0, duration: float = 0) -> PublisherSpec:
    per_proc = -(-messages // plan.publishers) if messages else 0
    return PublisherSpec(mqtt_url=svc.mqtt_url, prefix=PREFIX, run=run, devices=500, messages=per_proc,
                         rate=rate / plan.publishers, duration=duration, payload_bytes=plan.payload_bytes)


@contextmanager
def profiled(pid: int, out: Path, py_spy: str | None) -> Iterator[None]:
    """Sample the process with py-spy (if asked) into collapsed stacks, and print where time goes."""
    if not py_spy:
        yield
        return
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--nonblocking", "--rate", "200",
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
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f}  {100 * incl[f] / total:5.1f}  {f}")
    return "\n".join(lines)


def drain(svc: Services, plan: Plan, work: Path, baseline: bool, py_spy: str | None = None) -> Result:
    name = "baseline-drain" if baseline else "ingest-drain"
    run = ("bl" if baseline else "dr") + uuid.uuid4().hex[:6]
    messages = plan.baseline_messages if baseline else plan.drain_messages
    if baseline:
        consumer, http = baseline_consumer(work, svc), ""
    else:
        consumer, http = ingest_consumer(work, svc, name)
    consumer.start()  # creates the persistent session that holds the backlog
    consumer.stop()
    load = publish(_spec(svc, plan, run, messages), plan.publishers)
    _say(f"{name}: {load.total_acked} messages acknowledged by the broker in {load.seconds:.1f} s "
         f"({load.total_acked / load.seconds:,.0f}/s, {plan.publishers} publisher processes)")
    brk, db = _watch(svc.broker_pid), _watch(svc.database_pid, tree=True)
    t0 = time.monotonic()
    pid = consumer.start()
    me = Watch(pid)
    try:
        with profiled(pid, work / f"{name}.pyspy.txt", py_spy):
            if baseline:
                _wait_stored(lambda: _baseline_count(svc.database_url, run), load.total_acked, name)
            else:
                _wait_stored(lambda: acked_by_ingest(http), load.total_acked, name)
            wall = time.monotonic() - t0
            usage = _usage(consumer=me, broker=brk, database=db)
    finally:
        consumer.stop()
    rows = _rows(svc.database_url, baseline, run)
    verified = verify(rows, load, run)
    span = _span(rows)
    per_msg = readings_per_message(plan.payload_bytes)
    n = load.total_acked
    return Result(name, n, n * per_msg, round(span, 2), round(wall, 2), round(n / span, 1),
                  round(n * per_msg / span, 1), None, usage, verified, {"publish_per_s": round(n / load.seconds, 1)})


def live(svc: Services, plan: Plan, work: Path) -> Result:
    name, run = "ingest-live", "lv" + uuid.uuid4().hex[:6]
    consumer, http = ingest_consumer(work, svc, name)
    pid = consumer.start()
    try:
        before = acked_by_ingest(http)
        me, brk, db = Watch(pid), _watch(svc.broker_pid), _watch(svc.database_pid, tree=True)
        started = datetime.now(UTC)
        t0 = time.monotonic()
        load = publish(_spec(svc, plan, run, 0, plan.live_rate, plan.warmup_seconds + plan.live_seconds),
                       plan.publishers)
        _wait_stored(lambda: acked_by_ingest(http) - before, load.total_acked, name)
        wall = time.monotonic() - t0
        usage = _usage(consumer=me, broker=brk, database=db)
    finally:
        consumer.stop()
    rows = _rows(svc.database_url, False, run)
    verified = verify(rows, load, run)
    after = started.timestamp() + plan.warmup_seconds
    lat = _latency(rows, datetime.fromtimestamp(after, UTC))
    span = _span(rows)
    per_msg = readings_per_message(plan.payload_bytes)
    n = load.total_acked
    return Result(name, n, n * per_msg, round(span, 2), round(wall, 2), round(n / span, 1),
                  round(n * per_msg / span, 1), lat, usage, verified,
                  {"offered_per_s": plan.live_rate, "warmup_s": plan.warmup_seconds})


# --- output ----------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def table(results: list[Result], ratio: float | None) -> None:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the long run (1,000,000-message backlog, 60 s live)")
    ap.add_argument("--drain-messages", type=int, help="backlog size of ingest-drain")
    ap.add_argument("--baseline-messages", type=int, help="backlog size of baseline-drain")
    ap.add_argument("--live-rate", type=float, help="offered messages/s in ingest-live (all publishers)")
    ap.add_argument("--live-seconds", type=float, help="measured seconds of ingest-live, after the warm-up")
    ap.add_argument("--warmup-seconds", type=float, help="seconds of ingest-live left out of the latency figures")
    ap.add_argument("--publishers", type=int, help="publisher processes")
    ap.add_argument("--payload-bytes", type=int, help="pad each message with more readings to about this size")
    ap.add_argument("--only", choices=["ingest-drain", "ingest-live", "baseline-drain"], action="append",
                    help="run only these scenarios (repeatable)")
    ap.add_argument("--database-url", help="use this running PostgreSQL (a bench_* database is created)")
    ap.add_argument("--mqtt-url", help="use this running broker")
    ap.add_argument("--profile", nargs="?", const="py-spy", metavar="PY_SPY",
                    help="sample the service with py-spy during ingest-drain and print where the time goes "
                    "(py-spy is not a dependency: pip install py-spy, or give its path)")
    ap.add_argument("--json", type=Path, help="write the results here (default bench/results/<time>.json)")
    args = ap.parse_args(argv)
    if bool(args.database_url) != bool(args.mqtt_url):
        ap.error("--database-url and --mqtt-url go together (or neither: private services are started)")
    plan = FULL if args.full else QUICK
    names = ("drain_messages", "baseline_messages", "live_rate", "live_seconds", "warmup_seconds", "publishers",
             "payload_bytes")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    plan = Plan(**{**asdict(plan), **overrides})
    py_spy = shutil.which(args.profile) if args.profile else None
    if args.profile and not py_spy:
        ap.error(f"--profile: {args.profile} not found (pip install py-spy)")
    scenarios = args.only or ["ingest-drain", "ingest-live", "baseline-drain"]

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
        _say(f"plan: {plan}\nmachine: {svc.versions}\nlogs: {work}")
        try:
            for s in scenarios:
                _say(f"--- {s}")
                if s == "ingest-live":
                    r = live(svc, plan, work)
                else:
                    r = drain(svc, plan, work, s == "baseline-drain", None if s == "baseline-drain" else py_spy)
                _say(f"{s}: {r.verified}")
                results.append(r)
        except VerificationError as exc:
            _say(f"FAILED: {exc}")
            return 1
    by = {r.name: r for r in results}
    ratio = (by["ingest-drain"].messages_per_s / by["baseline-drain"].messages_per_s
             if "ingest-drain" in by and "baseline-drain" in by else None)
    table(results, ratio)
    out = args.json or RESULTS / f"{stamp:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({
        "date": stamp.isoformat(timespec="seconds"), "command": "python -m bench.run " + " ".join(argv or sys.argv[1:]),
        "machine": svc.versions, "plan": asdict(plan), "ratio_vs_baseline": ratio,
        "results": [asdict(r) for r in results],
    }, indent=2))
    _say(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
