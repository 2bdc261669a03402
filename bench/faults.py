"""The bench fault run (issue #5): `make bench-faults`, or python -m bench.faults [options].

The service reaches PostgreSQL through a fault proxy (tests/proxy.py). Once it is ready, the proxy
turns into a blackhole (packets dropped, nothing closed, as with a pulled cable or a partition) and a
backlog of QoS 1 messages is published to the broker while the database is unreachable. The
blackhole lasts --outage seconds from its start (longer, and said so, if publishing takes longer),
then the network is back and the service must store every message the broker acknowledged.

Every 0.25 s, throughout, the ingest process's VmHWM and VmRSS (/proc/<pid>/status) are read, and its
/readyz status and the /metrics gauges sensor_ingest_messages_unacked and sensor_ingest_mqtt_suspended.

The run fails (exit 1, with the reasons) if the process's peak RSS (VmHWM, the kernel's high-water
mark) is above --max-rss-mb, if the unacknowledged messages ever exceed --receive-maximum, if an
acknowledged message is missing or stored twice, or if the service process exited. The figures are
printed as a table and written as JSON (bench/results/faults-<UTC time>.json by default); the
service's log stays in bench/results/faults-*/.

Private services are started as `make bench` does (Mosquitto with deploy/mosquitto/mosquitto.conf,
durable PostgreSQL + TimescaleDB with deploy/postgres/postgresql.conf), on free 127.0.0.1 ports.
The service's database timeouts are those of the fault tests: connect_timeout 3 s, command_timeout
5 s; the MQTT keepalive is the product default (30 s), so the service suspends its broker connection
once the database has taken no write for 15 s (half the keepalive).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.loadgen import LoadResult, PublisherSpec, _payload, device_uid, publish, readings_per_message
from bench.procstat import _kb
from bench.run import (
    PREFIX,
    RESULTS,
    VerificationError,
    _rows,
    _say,
    _wait_stored,
    acked_by_ingest,
    ingest_consumer,
    services,
    verify,
    versions,
)
from tests.proxy import FaultProxy

DEVICES = 500  # per publisher process, as in bench/run.py
DB_CONNECT_TIMEOUT, DB_COMMAND_TIMEOUT = 3, 5  # as tests/integration/test_faults.py
INTERVAL = 0.25  # seconds between samples
UNACKED = "sensor_ingest_messages_unacked"
SUSPENDED = "sensor_ingest_mqtt_suspended"


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    hwm_mb: float  # VmHWM
    rss_mb: float  # VmRSS
    readyz: int  # status code; 0 when the service did not answer
    unacked: float | None  # None when /metrics did not answer
    suspended: float | None


class Sampler:
    """Reads /proc/<pid>/status, /readyz and /metrics of the service from a thread, every INTERVAL s."""

    def __init__(self, pid: int, http: str, interval: float = INTERVAL) -> None:
        self.pid, self.http, self.interval = pid, http, interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-sampler", daemon=True)
        self._thread.start()

    def _get(self, path: str) -> httpx.Response | None:
        try:
            return httpx.get(f"http://{self.http}{path}", timeout=1)
        except httpx.HTTPError:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            at = time.monotonic()
            hwm, rss = _kb(self.pid, "status", "VmHWM"), _kb(self.pid, "status", "VmRSS")
            ready = self._get("/readyz")
            metrics = self._get("/metrics")
            values: dict[str, float] = {}
            if metrics is not None:
                for line in metrics.text.splitlines():
                    name, _, value = line.partition(" ")
                    if name in (UNACKED, SUSPENDED):
                        values[name] = float(value)
            self.samples.append(Sample(at, hwm / 1024, rss / 1024, ready.status_code if ready is not None else 0,
                                       values.get(UNACKED), values.get(SUSPENDED)))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - at)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.at <= end]


def judge(*, hwm_mb: float, max_rss_mb: float, peak_unacked: float | None, receive_maximum: int,
          verified: str, service_exited: str | None, stop_exit_code: int | None = 0) -> list[str]:
    """The reasons the run failed (empty: it passed)."""
    failures = []
    if hwm_mb > max_rss_mb:
        failures.append(f"peak RSS (VmHWM) {hwm_mb:.1f} MB is above the {max_rss_mb:.0f} MB limit")
    if peak_unacked is None:
        failures.append(f"{UNACKED} was never read from /metrics")
    elif peak_unacked > receive_maximum:
        failures.append(f"{UNACKED} reached {peak_unacked:.0f}, above receive_maximum = {receive_maximum}")
    if not verified.startswith("ok:"):
        failures.append(f"verification: {verified}")
    if service_exited:
        failures.append(f"the service process exited: {service_exited}")
    elif stop_exit_code != 0:
        failures.append(f"the graceful stop after recovery exited {stop_exit_code}, not 0")
    return failures


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{port}").geturl()


def _average_payload(run: str, pad: int, messages: int, publishers: int) -> float:
    """Mean size of the payloads the load generator sends (a spread of 200 of them, like-for-like uids)."""
    per_proc = max(1, -(-messages // publishers))
    now = datetime.now(UTC)
    sizes = [len(_payload(device_uid(run, 0, s % DEVICES), now, s, pad))
             for s in range(0, per_proc, max(1, per_proc // 200))]
    return statistics.fmean(sizes)


def _first(samples: list[Sample], t0: float, pred: Any) -> float | None:
    """Seconds after t0 of the first sample where pred holds."""
    return next((round(s.at - t0, 2) for s in samples if pred(s)), None)


def table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    p, r = report["parameters"], report["results"]
    t = Table(title=f"sensor-ingest bench fault run: database blackholed {r['blackhole_seconds']:.0f} s "
                    f"under a {r['messages_acked']:,}-message backlog")
    for col in ("figure", "value", "limit"):
        t.add_column(col, justify="left" if col == "figure" else "right")

    def yes(v: bool | None) -> str:
        return "yes" if v else "no"

    t.add_row("messages acknowledged by the broker", f"{r['messages_acked']:,} of {p['messages']:,}", "")
    t.add_row("payload, average bytes (readings/message)",
              f"{r['payload_bytes_avg']:,.0f} ({r['readings_per_message']})", "")
    t.add_row("publishing took", f"{r['publish_seconds']:.1f} s", "")
    t.add_row("blackhole lasted", f"{r['blackhole_seconds']:.1f} s"
              + (" (extended: publishing outlasted --outage)" if r["outage_extended"] else ""), f"{p['outage']:.0f} s")
    t.add_row("peak RSS (VmHWM)", f"{r['peak_vmhwm_mb']:.1f} MB", f"{p['max_rss_mb']:.0f} MB")
    t.add_row("peak VmRSS sampled", f"{r['peak_vmrss_mb']:.1f} MB", "")
    peak = r["peak_unacked"]
    t.add_row("peak unacked messages (sampled gauge)", "n/a" if peak is None else f"{peak:,.0f}",
              f"{p['receive_maximum']:,}")
    t.add_row("/readyz 503 during the blackhole", yes(r["readyz_503_during_blackhole"])
              + (f" (after {r['first_503_s']:.1f} s)" if r["first_503_s"] is not None else ""), "")
    t.add_row("broker connection suspended", yes(r["mqtt_suspended"])
              + (f" (after {r['suspended_after_s']:.1f} s)" if r["suspended_after_s"] is not None else ""), "")
    drain = r["drain_seconds"]
    t.add_row("drain after the blackhole lifted", "n/a" if drain is None else f"{drain:.1f} s", "")
    t.add_row("verification", r["verified"], "")
    t.add_row("service process", r["service_exited"] or "running throughout", "")
    console = Console(width=max(Console().width, 120))
    console.print(t)
    if report["failures"]:
        console.print("[bold red]FAILED[/bold red]:\n- " + "\n- ".join(report["failures"]))
    else:
        console.print("[bold green]passed[/bold green]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000,
                    help="QoS 1 messages published while the database is blackholed (default %(default)s)")
    ap.add_argument("--payload-bytes", type=int, default=1024,
                    help="pad each message with more readings to about this size (default %(default)s)")
    ap.add_argument("--outage", type=float, default=60,
                    help="seconds the database stays blackholed, from the blackhole's start; longer if "
                    "publishing takes longer (default %(default)s)")
    ap.add_argument("--receive-maximum", type=int, default=4096,
                    help="the service's mqtt.receive_maximum, also the limit on unacknowledged messages "
                    "(default %(default)s, the product default)")
    ap.add_argument("--max-rss-mb", type=float, default=300,
                    help="fail if the service's peak RSS (VmHWM) is above this, in MB (default %(default)s)")
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes (default %(default)s)")
    ap.add_argument("--json", type=Path,
                    help="write the results here (default bench/results/faults-<UTC time>.json)")
    args = ap.parse_args(argv)
    if args.messages < 1 or args.publishers < 1 or args.outage < 0 or args.receive_maximum < 1:
        ap.error("--messages, --publishers and --receive-maximum must be positive, --outage not negative")

    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="faults-", dir=RESULTS))
    stamp = datetime.now(UTC)
    run = "fa" + uuid.uuid4().hex[:6]
    command = "python -m bench.faults " + " ".join(sys.argv[1:] if argv is None else argv)
    params = {k: getattr(args, k) for k in ("messages", "payload_bytes", "outage", "receive_maximum", "max_rss_mb",
                                            "publishers")}
    params |= {"database_connect_timeout": DB_CONNECT_TIMEOUT, "database_command_timeout": DB_COMMAND_TIMEOUT,
               "keepalive": "default (30)", "log_level": "info", "sample_interval": INTERVAL}
    # Private services only (what services() starts when it is given no URLs).
    with services(argparse.Namespace(database_url=None, mqtt_url=None)) as svc:
        from ingest.store.migrate import migrate

        migrate(svc.database_url)
        svc.versions = versions(svc.database_url)
        _say(f"parameters: {params}\nmachine: {svc.versions}\nlogs: {work}")
        proxy = FaultProxy(urlsplit(svc.database_url).port or 5432)
        consumer, http = ingest_consumer(
            work, svc, "faults", database_url=_with_port(svc.database_url, proxy.port),
            database_extra=f"connect_timeout = {DB_CONNECT_TIMEOUT}\ncommand_timeout = {DB_COMMAND_TIMEOUT}",
            mqtt_extra=f"receive_maximum = {args.receive_maximum}", log_level="info")
        sampler: Sampler | None = None
        load = LoadResult(acked=[[] for _ in range(args.publishers)])
        verified, exited, drain = "not reached", None, None
        publish_seconds = blackhole_seconds = t_on = t_off = 0.0
        extended = False
        try:
            pid = consumer.start()
            proc = consumer.proc
            assert proc is not None

            def gone() -> str | None:
                return None if proc.poll() is None else f"exit code {proc.returncode} (log: {consumer.log})"

            sampler = Sampler(pid, http)
            time.sleep(1)  # a few samples of the idle service first
            proxy.mode = "blackhole"
            t_on = time.monotonic()
            _say(f"database blackholed; publishing {args.messages:,} messages of about {args.payload_bytes} bytes")
            per_proc = -(-args.messages // args.publishers)
            load = publish(PublisherSpec(mqtt_url=svc.mqtt_url, prefix=PREFIX, run=run, devices=DEVICES,
                                         messages=per_proc, rate=0, duration=0, payload_bytes=args.payload_bytes),
                           args.publishers)
            publish_seconds = time.monotonic() - t_on
            _say(f"{load.total_acked:,} messages acknowledged by the broker in {load.seconds:.1f} s")
            left = args.outage - (time.monotonic() - t_on)
            if left > 0:
                while time.monotonic() - t_on < args.outage and not gone():
                    time.sleep(0.25)
            else:
                extended = True
                _say(f"publishing took {publish_seconds:.1f} s, longer than the {args.outage:.0f} s outage: "
                     "the blackhole lasted until it was done")
            proxy.mode = "pass"
            t_off = time.monotonic()
            blackhole_seconds = t_off - t_on
            _say(f"blackhole lifted after {blackhole_seconds:.1f} s; waiting for the backlog to be stored")
            exited = gone()
            if exited is None:
                last = [0.0]

                def acked() -> float:
                    if (why := gone()) is not None:
                        raise VerificationError(f"the service process exited: {why}")
                    with contextlib.suppress(httpx.HTTPError):  # busy: no progress; _wait_stored bounds a stall
                        last[0] = acked_by_ingest(http)
                    return last[0]

                try:
                    _wait_stored(acked, load.total_acked, "the backlog after the blackhole")
                    drain = time.monotonic() - t_off
                    _say(f"drained {drain:.1f} s after the blackhole lifted")
                    verified = verify(_rows(svc.database_url, False, run), load, run)
                except VerificationError as exc:
                    verified = f"FAILED: {exc}"
                time.sleep(1.5)  # one more turn of the service's 1 s gauge task into the samples
            exited = exited or gone()
        finally:
            if sampler is not None:
                sampler.stop()
            stopped = consumer.proc
            consumer.stop()
            proxy.close()
        stop_rc = stopped.returncode if stopped is not None else None
        hwm = max([s.hwm_mb for s in sampler.samples] if sampler else [0.0])
        samples = sampler.samples if sampler else []
        during = [s for s in samples if t_on <= s.at <= t_off]
        unacked = [s.unacked for s in samples if s.unacked is not None]
        peak_unacked = max(unacked) if unacked else None
        results = {
            "messages_acked": load.total_acked,
            "readings_per_message": readings_per_message(args.payload_bytes),
            "payload_bytes_avg": round(_average_payload(run, args.payload_bytes, args.messages, args.publishers), 1),
            "publish_seconds": round(publish_seconds, 2),
            "publish_per_s": round(load.total_acked / load.seconds, 1) if load.seconds else None,
            "blackhole_seconds": round(blackhole_seconds, 2),
            "outage_extended": extended,
            "peak_vmhwm_mb": round(hwm, 1),
            "peak_vmrss_mb": round(max([s.rss_mb for s in samples] or [0.0]), 1),
            "peak_unacked": peak_unacked,
            "readyz_503_during_blackhole": any(s.readyz == 503 for s in during),
            "first_503_s": _first(during, t_on, lambda s: s.readyz == 503),
            "mqtt_suspended": any(s.suspended == 1 for s in samples),
            "suspended_after_s": _first(samples, t_on, lambda s: s.suspended == 1),
            "readyz_200_after_lift_s": _first([s for s in samples if s.at > t_off], t_off, lambda s: s.readyz == 200),
            "drain_seconds": None if drain is None else round(drain, 2),
            "verified": verified,
            "service_exited": exited,
            "stop_exit_code": stop_rc,
            "samples": len(samples),
        }
        failures = judge(hwm_mb=hwm, max_rss_mb=args.max_rss_mb, peak_unacked=peak_unacked,
                         receive_maximum=args.receive_maximum, verified=verified, service_exited=exited,
                         stop_exit_code=stop_rc)
        report = {
            "date": stamp.isoformat(timespec="seconds"), "command": command, "machine": svc.versions,
            "parameters": params, "results": results, "failures": failures, "ok": not failures, "logs": str(work),
            # seconds from the blackhole's start, VmHWM MB, VmRSS MB, /readyz, unacked, suspended
            "timeline": [[round(s.at - t_on, 2), round(s.hwm_mb, 1), round(s.rss_mb, 1), s.readyz, s.unacked,
                          s.suspended] for s in samples],
        }
    table(report)
    out = args.json or RESULTS / f"faults-{stamp:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(report, indent=2))
    _say(f"results: {out}\nservice log: {consumer.log}")
    if failures:
        _say("FAILED:\n- " + "\n- ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
