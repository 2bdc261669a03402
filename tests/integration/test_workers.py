"""`sensor-ingest run --workers N` (ingest/supervisor.py) on the real Mosquitto and TimescaleDB.

The command is run as an operator runs it: one process (the supervisor), whose workers are found by
their HTTP ports (http.addr + k - 1) and by the supervisor's log lines ("worker k started: pid P").
Every count is read from the database or from each worker's /metrics; every wait is a bounded
wait-until, never a sleep.

What Mosquitto 2.0.11 does with a shared group whose member is away (tests/integration/
test_shared_subscription.py) is what makes the client ids matter: the broker keeps routing an absent
member its share and keeps it in that member's session, so a worker must come back with its own id.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.integration.harness import count, fleet, native, publish_acked, stored_readings, write_config
from tests.integration.test_pipeline import T0
from tests.services import REPO, Mosquitto, free_port, wait_until

HANG = 90  # seconds: a bound on a hang only
RECEIVED = "sensor_ingest_messages_received_total"
ACKED = "sensor_ingest_messages_acked_total"
CONFLICT_BATCHES = "sensor_ingest_conflict_batches_total"  # batches that met rows already stored
SECRET_ENV = "SENSOR_INGEST_WEBHOOK_OPS_SECRET"
SECRET = "whsec_d29ya2Vycy1pbnRlZ3JhdGlvbi1uZXZlci1zaG93bg=="
STARTED = re.compile(r"worker (\d+) started: pid (\d+)")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_run(n: int) -> int:
    """A port p with p .. p + n - 1 all free (worker k listens on p + k - 1)."""
    for _ in range(200):
        base = free_port()
        if base + n - 1 <= 65535 and all(_bindable(base + i) for i in range(1, n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


def _config(tmp_path: Path, prefix: str, database_url: str, broker: Mosquitto, *, port: int,
            shared: bool = True, extra: str = "", name: str = "ingest.toml") -> Path:
    cfg = write_config(tmp_path / name, prefix=prefix, database_url=database_url, mqtt_url=broker.url,
                       mqtt_extra=f'shared_group = "{prefix}"' if shared else "", extra=extra)
    text = re.sub(r'addr = "127\.0\.0\.1:\d+"', f'addr = "127.0.0.1:{port}"', cfg.read_text())
    cfg.write_text(text)
    return cfg


class Supervised:
    """`python -m ingest run --config FILE [--workers N]` as a child process, and its workers' HTTP."""

    def __init__(self, config: Path, log_path: Path, port: int, workers: int | None,
                 env: dict[str, str] | None = None) -> None:
        self.config, self.log_path, self.port, self.workers = config, log_path, port, workers
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SENSOR_INGEST_")} | (env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_from = 0  # where this run's lines start in the log

    @property
    def n(self) -> int:
        return self.workers or 1

    def start(self, wait: bool = True) -> None:
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [sys.executable, "-m", "ingest", "run", "--config", str(self.config)]
        argv += ["--workers", str(self.workers)] if self.workers is not None else []
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            wait_until(lambda: all(self.ready(k) for k in range(1, self.n + 1)), HANG,
                       f"every worker to be ready (log: {self.log_path})", interval=0.1)

    def log(self) -> str:
        """This run's lines of the log."""
        return self.log_path.read_bytes()[self._log_from:].decode(errors="replace")

    def url(self, k: int) -> str:
        return f"http://127.0.0.1:{self.port + k - 1}"

    def ready(self, k: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sensor-ingest exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            return httpx.get(self.url(k) + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, k: int, name: str) -> float:
        text = httpx.get(self.url(k) + "/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def pids(self) -> dict[int, int]:
        """Worker number -> pid of its latest process, from the supervisor's log."""
        return {int(k): int(pid) for k, pid in STARTED.findall(self.log())}

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(HANG)
        self.proc = None
        return rc

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        # Workers a killed supervisor left stop themselves (the orphan watch); kill what remains of
        # this run's workers, and only them (a pid may have been given to another process since).
        for pid in self.pids().values():
            if _worker_of(pid, self.config):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _worker_of(pid: int, config: Path) -> bool:
    """Process ``pid`` is a worker (`run --worker-index`) of ``config``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"--worker-index" in argv and str(config).encode() in argv


@pytest.fixture
def runs() -> list[Supervised]:
    return []


@pytest.fixture(autouse=True)
def _close_runs(runs: list[Supervised]) -> object:
    yield
    for r in runs:
        r.close()


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SENSOR_INGEST_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "ingest", *argv], cwd=REPO, env=clean, capture_output=True,
                          text=True, timeout=HANG, check=False)


def test_two_workers_share_a_backlog_and_live_load_and_stop_with_nothing_unacknowledged(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, runs: list[Supervised]
) -> None:
    port = _port_run(2)
    cfg = _config(tmp_path, topic_prefix, database_url, broker, port=port)
    log = tmp_path / "ingest.log"
    two = Supervised(cfg, log, port, workers=2)
    runs.append(two)

    # A first run makes both workers' sessions; while they are away the broker queues the backlog
    # in them (each its share).
    two.start()
    first_pids = two.pids()
    assert sorted(first_pids) == [1, 2]
    text = two.log()
    assert re.search(r"\[w1\] ingest\.mqtt: .*'ingest-[0-9a-f]+' ", text), text[-3000:]
    assert re.search(r"\[w2\] ingest\.mqtt: .*'ingest-[0-9a-f]+-2' ", text), text[-3000:]
    assert f"$share/{topic_prefix}/" in text
    assert two.stop() == 0

    messages, expected = fleet(topic_prefix, 3000, T0)
    backlog, live = messages[:1500], messages[1500:]
    publish_acked(broker.port, backlog)
    two.start()
    publish_acked(broker.port, live)
    wait_until(lambda: count(database_url, "readings") >= len(expected), HANG, "every reading")
    assert stored_readings(database_url) == expected
    assert count(database_url, "readings") == len(expected)
    assert count(database_url, "rejected_messages") == 0
    wait_until(lambda: all(two.metric(k, ACKED) == two.metric(k, RECEIVED) for k in (1, 2)), HANG,
               "every received message acknowledged")
    received = [two.metric(k, RECEIVED) for k in (1, 2)]
    assert sum(received) == len(messages)  # each message to exactly one worker, once
    assert all(r > 0 for r in received), received  # and both took a share
    assert all(two.metric(k, CONFLICT_BATCHES) == 0 for k in (1, 2))
    assert two.stop() == 0
    assert "stopped: every worker stopped cleanly" in two.log()

    # One worker now (worker 1's id, worker 1's port, in-process): nothing was left unacknowledged,
    # so nothing comes again. Sentinels published after it subscribed: whatever its session held
    # would arrive before them.
    one = Supervised(cfg, log, port, workers=1)
    runs.append(one)
    one.start()
    assert "supervisor" not in one.log()
    sentinels = [(f"{topic_prefix}/hn-s{i:02d}/up", native(f"hn-s{i:02d}", T0.isoformat(), {"pm25": float(i)}))
                 for i in range(10)]
    publish_acked(broker.port, sentinels)
    wait_until(lambda: one.metric(1, RECEIVED) >= 1 and one.metric(1, ACKED) == one.metric(1, RECEIVED), HANG,
               "a sentinel to worker 1")
    assert one.metric(1, CONFLICT_BATCHES) == 0
    assert one.stop() == 0
    committed = [int(n) for n in re.findall(r"stopped: (\d+) message\(s\) committed", one.log())]
    assert len(committed) == 1
    # Every message this run took was a new sentinel: nothing of the backlog or the live load came again.
    assert committed[0] == _sentinel_rows(database_url) >= 1

    # N lowered from 2 to 1 left worker 2's session in the group: Mosquitto went on routing it a
    # share of the sentinels, which waited there. Worker 2 back with its id stores them.
    two.start()
    wait_until(lambda: count(database_url, "readings") == len(expected) + len(sentinels), HANG,
               "every sentinel, worker 2's share included")
    assert two.metric(2, RECEIVED) > 0
    assert count(database_url, "readings") == len(expected) + len(sentinels)
    assert two.stop() == 0


def _sentinel_rows(url: str) -> int:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id"
                        " WHERE d.uid LIKE 'hn-s%'").fetchone()
    assert row is not None
    return int(row[0])


def test_a_worker_killed_mid_load_is_started_again_and_nothing_is_lost(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, runs: list[Supervised]
) -> None:
    port = _port_run(2)
    cfg = _config(tmp_path, topic_prefix, database_url, broker, port=port)
    two = Supervised(cfg, tmp_path / "ingest.log", port, workers=2)
    runs.append(two)
    two.start()
    messages, expected = fleet(topic_prefix, 4000, T0)
    first, rest = messages[:2000], messages[2000:]

    publisher = threading.Thread(target=publish_acked, args=(broker.port, first))
    publisher.start()
    wait_until(lambda: two.metric(2, RECEIVED) >= 1, HANG, "worker 2 to be at work")
    victim = two.pids()[2]
    os.kill(victim, signal.SIGKILL)
    publisher.join(HANG)
    publish_acked(broker.port, rest)  # while worker 2 is dead or starting again: its share waits in its session

    wait_until(lambda: two.pids()[2] != victim, HANG, "a new worker 2")
    assert f"worker 2 (pid {victim}) was killed by SIGKILL" in two.log()
    assert two.log().count("worker 1 started") == 1  # worker 1 went on untouched
    wait_until(lambda: two.ready(2), HANG, "the new worker 2 to be ready")
    wait_until(lambda: count(database_url, "readings") >= len(expected), HANG, "every reading")
    assert stored_readings(database_url) == expected
    assert count(database_url, "readings") == len(expected)
    assert count(database_url, "rejected_messages") == 0
    assert two.metric(2, RECEIVED) > 0  # the new worker 2 took back its session's messages
    assert two.stop() == 0


RULES = f"""
[[webhooks]]
name = "ops"
url = "http://127.0.0.1:9/hook"
secret_env = "{SECRET_ENV}"
"""

RULE = """
[[rules]]
name = "pm25-high"
metric = "pm25"
above = 55.5
webhooks = ["ops"]
"""


def _rule_names(run: Supervised, k: int) -> list[str]:
    response = httpx.get(run.url(k) + "/v1/rules", timeout=5)
    assert response.status_code == 200, response.text
    return [r["name"] for r in response.json()["rules"]]


def test_sighup_reaches_every_worker_and_workers_stop_when_the_supervisor_is_killed(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, runs: list[Supervised]
) -> None:
    port = _port_run(2)
    cfg = _config(tmp_path, topic_prefix, database_url, broker, port=port, extra=RULES)
    two = Supervised(cfg, tmp_path / "ingest.log", port, workers=2, env={SECRET_ENV: SECRET})
    runs.append(two)
    two.start()
    assert [_rule_names(two, k) for k in (1, 2)] == [[], []]
    # The webhook secret reached the workers through the environment, never on a command line.
    for pid in two.pids().values():
        assert SECRET not in Path(f"/proc/{pid}/cmdline").read_text()

    cfg.write_text(cfg.read_text() + RULE)
    assert two.proc is not None
    two.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: all(_rule_names(two, k) == ["pm25-high"] for k in (1, 2)), HANG,
               "the new rule in every worker")
    text = two.log()
    assert "SIGHUP: forwarded to 2 worker(s)" in text
    assert re.search(r"\[w1\] ingest\.alerts\.runtime: rules reloaded from ", text), text[-3000:]
    assert re.search(r"\[w2\] ingest\.alerts\.runtime: rules reloaded from ", text), text[-3000:]
    assert SECRET not in text

    # A supervisor killed outright cannot stop its workers; each sees it gone and stops itself
    # (gracefully: its log ends with the service's "stopped" line), freeing its client id and port.
    pids = two.pids()
    two.stop(signal.SIGKILL)
    wait_until(lambda: all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids.values()), HANG,
               "the workers to stop on their own")
    text = two.log()
    for k in (1, 2):
        assert re.search(rf"\[w{k}\] ingest\.supervisor: the supervisor \(pid \d+\) is gone: stopping", text)
        assert re.search(rf"\[w{k}\] ingest\.service: stopped: \d+ message\(s\) committed", text)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


def test_refusals_exit_2_with_what_to_fix(
    tmp_path: Path, empty_database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    port = _port_run(2)
    plain = _config(tmp_path, topic_prefix, empty_database_url, broker, port=port, shared=False, name="plain.toml")
    result = _run(["run", "--config", str(plain), "--workers", "2"])
    assert result.returncode == 2, result.stderr
    assert "mqtt.shared_group: is not set, and --workers 2 asks for 2 workers" in result.stderr
    assert "the broker sends every message to every worker" in result.stderr
    assert "(fix: set mqtt.shared_group" in result.stderr
    assert "started: pid" not in result.stderr  # refused before any worker

    high = _config(tmp_path, topic_prefix, empty_database_url, broker, port=65535, name="high.toml")
    high.write_text(high.read_text() + "\n[ingest]\nworkers = 3\n")
    result = _run(["run", "--config", str(high)])
    assert result.returncode == 2, result.stderr
    assert "http.addr: ingest.workers = 3 asks for 3 workers, and worker k listens on port 65535 + k - 1" \
        in result.stderr
    assert "(fix: choose a port of at most 65533, or port 0" in result.stderr

    # A worker that finds a problem only it can see (here a database without the schema) exits 2,
    # and the supervisor stops the others and exits 2 rather than starting it again and again.
    unmigrated = _config(tmp_path, topic_prefix, empty_database_url, broker, port=port, name="unmigrated.toml")
    result = _run(["run", "--config", str(unmigrated), "--workers", "2"])
    assert result.returncode == 2, result.stderr
    assert "run `sensor-ingest migrate`" in result.stderr
    assert re.search(r"worker \d \(pid \d+\) exited with code 2: the configuration or the database schema",
                     result.stderr)
    assert "starting it again" not in result.stderr
