"""`sensor-ingest run --workers N`: N worker processes on one machine, sharing one MQTT subscription.

The service is bound by one core in Python; N processes use N cores. Each worker is the ordinary
service (ingest.service.run_service) with three settings of its own, derived from the configured ones:

- MQTT client id: worker 1 keeps mqtt.client_id itself, worker k >= 2 is "<mqtt.client_id>-k". The ids
  are stable across restarts because the broker keeps each id's session and the messages queued in
  it; worker 1 keeping the base id means a deployment going from one worker to N keeps its session.
- HTTP: the port of http.addr + k - 1 on the same host (port 0 stays 0: an ephemeral port each).
- Logs: every record carries the worker number (JSON "worker": k, text "[wk]").

All of them subscribe as $share/<mqtt.shared_group>/<filter>, which is required: without a group every
worker would get every message.

Each worker is a new interpreter (`python -m ingest run --worker-index k [--config FILE]`), not a
fork and not multiprocessing: it inherits no event loop, socket, thread or signal handler of the
supervisor and unpickles nothing; it reads the config file and the SENSOR_INGEST_* environment exactly
as `sensor-ingest run` does, so secrets stay in the environment (never on a command line, which `ps`
shows); and what runs is the code path `sensor-ingest run` runs. Each worker has a process group of its
own, so that a Ctrl-C in a terminal reaches the supervisor only, which stops the workers in order.

The supervisor holds no state but the child processes: it restarts a worker that dies (capped
backoff), forwards SIGTERM/SIGINT as SIGTERM and SIGHUP as SIGHUP, and stops everything when a
worker reports a configuration or schema problem (exit code 2), which no restart can fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from annotated_types import Le, MaxLen

from ingest.errors import ConfigError, ConfigProblem
from ingest.logs import setup_logging
from ingest.settings import IngestSettings, MqttSettings, Settings

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "MAX_WORKERS",
    "STEADY_AFTER",
    "STOP_TIMEOUT",
    "Supervisor",
    "WorkerPlan",
    "client_id_of",
    "describe_exit",
    "http_addr_of",
    "plan_workers",
    "run_worker",
    "supervise",
    "worker_command",
    "worker_settings",
]

log = logging.getLogger("ingest.supervisor")

# ingest.service.SHUTDOWN_GRACE (20 s) bounds the flush, commit and acknowledgement of a stopping
# worker; the disconnect and the closes after it take well under a second unless the network is dead
# (each has a bound of its own). A worker still running after this is killed: nothing is lost, the
# broker redelivers what it had not acknowledged. (Not imported: the supervisor does not load the
# service's modules; tests/unit/test_supervisor.py checks the two stay in order.)
STOP_TIMEOUT = 30.0
BACKOFF_FIRST = 1.0  # seconds before a dead worker starts again; doubles at each death ...
BACKOFF_MAX = 30.0  # ... up to this
STEADY_AFTER = 60.0  # a worker that ran this long before it died starts again after BACKOFF_FIRST
CONFIG_EXIT = 2  # run_service() and main(): the configuration or the database schema is wrong
ORPHAN_CHECK = 1.0  # seconds between a worker's checks that its supervisor is still there


def _max_length(model: type[MqttSettings], field: str) -> int:
    for item in model.model_fields[field].metadata:
        if isinstance(item, MaxLen):
            return item.max_length
    raise AssertionError(f"{model.__name__}.{field} has no max_length")


def _upper(model: type[IngestSettings], field: str) -> int:
    for item in model.model_fields[field].metadata:
        if isinstance(item, Le) and isinstance(item.le, int):
            return item.le
    raise AssertionError(f"{model.__name__}.{field} has no upper bound")


MAX_CLIENT_ID = _max_length(MqttSettings, "client_id")  # the limit mqtt.client_id itself has
MAX_WORKERS = _upper(IngestSettings, "workers")


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker gets: its number (1..N), MQTT client id and HTTP address."""

    index: int
    client_id: str
    http_addr: str


def client_id_of(base: str, index: int) -> str:
    """Worker 1 keeps the base id (and with it the session of a single service); worker k is base-k."""
    return base if index == 1 else f"{base}-{index}"


def http_addr_of(addr: str, index: int) -> str:
    """host:port + index - 1; port 0 (the system picks one) stays 0 for every worker."""
    host, _, port = addr.rpartition(":")
    return addr if int(port) == 0 else f"{host}:{int(port) + index - 1}"


def _source(config: Path | None) -> str:
    return f"{config} (with SENSOR_INGEST_* environment overrides)" if config is not None else "environment"


def _problems(settings: Settings, last: int, asked: str) -> list[ConfigProblem]:
    """What stops workers 1..``last`` from running on these settings (the checks hold for all of them
    when they hold for the last: the longest id, the highest port). ``asked``: how they were asked
    for, for the messages ("--workers 3 asks for 3 workers")."""
    problems: list[ConfigProblem] = []
    if settings.mqtt.shared_group is None:
        problems.append(ConfigProblem(
            "mqtt.shared_group",
            f"is not set, and {asked}: without a shared subscription each worker subscribes on its own and "
            "the broker sends every message to every worker (the work done once per worker, and a reading "
            "of a source without its own time stored once per worker)",
            'set mqtt.shared_group (e.g. shared_group = "sensor-ingest" under [mqtt], or '
            "SENSOR_INGEST_MQTT__SHARED_GROUP) so that the workers share one $share/<group>/<filter> "
            "subscription and each message goes to one of them; or run one worker"))
    base = settings.mqtt.client_id
    longest = client_id_of(base, last)
    if len(longest) > MAX_CLIENT_ID:
        problems.append(ConfigProblem(
            "mqtt.client_id",
            f"{asked}, and worker {last}'s client id (<mqtt.client_id>-{last}) would be {len(longest)} characters, "
            f"above the {MAX_CLIENT_ID} a client id may have",
            f"shorten mqtt.client_id to at most {MAX_CLIENT_ID - len(longest) + len(base)} characters "
            f"(it has {len(base)})"))
    port = settings.http.port
    if port and port + last - 1 > 65535:
        problems.append(ConfigProblem(
            "http.addr",
            f"{asked}, and worker k listens on port {port} + k - 1: worker {last}'s port {port + last - 1} is "
            "past 65535",
            f"choose a port of at most {65535 - last + 1}, or port 0 (each worker an ephemeral port)"))
    return problems


def plan_workers(settings: Settings, workers: int, config: Path | None = None, *,
                 asked: str | None = None) -> list[WorkerPlan]:
    """Every worker's client id and HTTP address; or ConfigError naming every problem and its fix.

    ``asked``: how the number was given, for the messages (default "ingest.workers = N")."""
    if not 2 <= workers <= MAX_WORKERS:
        raise ValueError(f"a supervisor runs 2 to {MAX_WORKERS} workers, not {workers}")
    problems = _problems(settings, workers, f"{asked or f'ingest.workers = {workers}'} asks for {workers} workers")
    if problems:
        raise ConfigError(_source(config), problems)
    return [WorkerPlan(k, client_id_of(settings.mqtt.client_id, k), http_addr_of(settings.http.addr, k))
            for k in range(1, workers + 1)]


def worker_settings(settings: Settings, index: int, config: Path | None = None) -> Settings:
    """The settings worker ``index`` runs with: its client id and HTTP address, all else as configured.

    Checked again in the worker: it reads the config file anew at each (re)start, and the file may
    have changed since the supervisor checked it."""
    problems = _problems(settings, index, f"this process is worker {index} of a supervisor")
    if problems:
        raise ConfigError(_source(config), problems)
    return settings.model_copy(update={
        "mqtt": settings.mqtt.model_copy(update={"client_id": client_id_of(settings.mqtt.client_id, index)}),
        "http": settings.http.model_copy(update={"addr": http_addr_of(settings.http.addr, index)}),
    })


def worker_command(config: Path | None, index: int, supervisor: int | None = None, *,
                   workers: int | None = None) -> list[str]:
    """The command line of worker ``index`` (of ``workers``) of the supervisor of pid ``supervisor``
    (default: this process). No secret on it: they stay in the inherited environment."""
    argv = [sys.executable, "-m", "ingest", "run", "--worker-index", str(index),
            "--supervisor-pid", str(os.getpid() if supervisor is None else supervisor)]
    if workers is not None:  # so that each knows its siblings' client ids (ingest.alerts.catchup)
        argv += ["--workers", str(workers)]
    return argv + (["--config", os.fspath(config)] if config is not None else [])


def describe_exit(code: int) -> str:
    """A process's return code in words: "exited with code 1", "was killed by SIGKILL"."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


@dataclass
class _Slot:
    plan: WorkerPlan
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0  # monotonic time of the current process's start
    delay: float = BACKOFF_FIRST  # before the next restart
    hup_at: float | None = None  # monotonic time SIGHUP was last forwarded to it
    final: int | None = None  # the return code of its process after the stop request
    killed: bool = False  # still running at STOP_TIMEOUT, and killed


class Supervisor:
    """Keeps one process running per plan until a stop; see the module's docstring."""

    def __init__(self, plans: Sequence[WorkerPlan], command: Callable[[int], list[str]], *,
                 stop_timeout: float = STOP_TIMEOUT, backoff_first: float = BACKOFF_FIRST,
                 backoff_max: float = BACKOFF_MAX, steady_after: float = STEADY_AFTER) -> None:
        self.slots = [_Slot(p, delay=backoff_first) for p in plans]
        self.command = command
        self.stop_timeout = stop_timeout
        self.backoff_first, self.backoff_max, self.steady_after = backoff_first, backoff_max, steady_after
        self.starts = 0  # processes started, restarts included
        self._stop = asyncio.Event()
        self._fatal = False  # a worker exited with CONFIG_EXIT
        self._broken = False  # the supervisor's own keeping of a worker failed

    def pids(self) -> dict[int, int]:
        """Worker number -> pid of its running process."""
        return {s.plan.index: s.proc.pid for s in self.slots if s.proc is not None}

    def request_stop(self, why: str = "a stop request") -> None:
        """Stop every worker (SIGTERM: each flushes, commits, acknowledges and disconnects)."""
        if self._stop.is_set():
            log.info("%s: already stopping (a worker still running %.3gs after the stop began is killed)", why,
                     self.stop_timeout)
            return
        running = self.pids()
        log.info("%s: stopping %d worker(s) (SIGTERM to pids %s)", why, len(running),
                 ", ".join(str(p) for p in running.values()) or "none")
        self._stop.set()
        for slot in self.slots:
            self._send(slot, signal.SIGTERM)

    def forward(self, sig: signal.Signals) -> int:
        """Send ``sig`` to every running worker; returns to how many."""
        sent = 0
        for slot in self.slots:
            if self._send(slot, sig):
                sent += 1
                if sig == signal.SIGHUP:
                    slot.hup_at = time.monotonic()
        return sent

    def _on_hup(self) -> None:
        sent = self.forward(signal.SIGHUP)
        log.info("SIGHUP: forwarded to %d worker(s): each reloads its alert rules from the config file "
                 "(a worker starting meanwhile reads the file as it is)", sent)

    @staticmethod
    def _send(slot: _Slot, sig: signal.Signals) -> bool:
        proc = slot.proc
        if proc is None or proc.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):  # it ended a moment ago; its wait() says how
            proc.send_signal(sig)
            return True
        return False

    async def run(self) -> int:
        """Until a stop: 0 when every worker stopped cleanly, 2 when one reported a configuration or
        schema problem, 1 when a worker had to be killed or ended badly during the stop."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        keepers = [asyncio.create_task(self._keep(s), name=f"worker-{s.plan.index}") for s in self.slots]
        for task in keepers:
            task.add_done_callback(self._keeper_done)
        try:
            await self._stop.wait()
            _, pending = await asyncio.wait(keepers, timeout=self.stop_timeout)
            if pending:
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.returncode is None:
                        log.error("worker %d (pid %d) has not stopped %.3gs after SIGTERM: killing it (the broker "
                                  "redelivers what it had not acknowledged)", slot.plan.index, slot.proc.pid,
                                  self.stop_timeout)
                        slot.killed = True
                        self._send(slot, signal.SIGKILL)
                await asyncio.gather(*pending)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        if self._fatal:
            return CONFIG_EXIT
        if self._broken:
            return 1
        # -SIGTERM: a worker stopped before the service had put its handlers in place (nothing to flush).
        unclean = [s for s in self.slots if s.killed or s.final not in (None, 0, -signal.SIGTERM)]
        if unclean:
            log.error("stopped; worker(s) %s did not stop cleanly", ", ".join(str(s.plan.index) for s in unclean))
            return 1
        log.info("stopped: every worker stopped cleanly")
        return 0

    def _keeper_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug here must not leave a worker unkept while the others run on: stop them all.
        log.error("keeping %s failed: %r", task.get_name(), task.exception(), exc_info=task.exception())
        self._broken = True
        self.request_stop(f"the supervisor's {task.get_name()} failed")

    async def _spawn(self, slot: _Slot) -> asyncio.subprocess.Process | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(slot.plan.index), stdin=subprocess.DEVNULL, process_group=0)
        except OSError as exc:
            log.error("worker %d could not be started: %s", slot.plan.index, exc)
            return None
        self.starts += 1
        slot.proc, slot.started, slot.hup_at = proc, time.monotonic(), None
        log.info("worker %d started: pid %d, client id %r, http %s", slot.plan.index, proc.pid,
                 slot.plan.client_id, slot.plan.http_addr)
        if self._stop.is_set():  # the stop came while it was being started
            self._send(slot, signal.SIGTERM)
        return proc

    async def _keep(self, slot: _Slot) -> None:
        index = slot.plan.index
        while not self._stop.is_set():
            slot.started = time.monotonic()
            proc = await self._spawn(slot)
            code = 1 if proc is None else await proc.wait()
            pid = 0 if proc is None else proc.pid
            ran = time.monotonic() - slot.started
            slot.proc = None
            if self._stop.is_set():
                slot.final = code
                (log.info if code in (0, -signal.SIGTERM) else log.error)(
                    "worker %d (pid %d) %s", index, pid, "stopped" if code == 0 else describe_exit(code))
                return
            if code == CONFIG_EXIT:
                log.error("worker %d (pid %d) exited with code 2: the configuration or the database schema is "
                          "wrong (its log says what), which no restart fixes: stopping every worker", index, pid)
                self._fatal = True
                self.request_stop(f"worker {index} exited with code 2")
                return
            if code == -signal.SIGHUP and slot.hup_at is not None:
                # SIGHUP came before the new process had put its handler in place; no harm done (it
                # had not connected yet), and a new one reads the config file anew.
                log.info("worker %d (pid %d) was still starting when SIGHUP came, and ended: starting it again",
                         index, pid)
                continue
            if ran >= self.steady_after:
                slot.delay = self.backoff_first
            unasked = " without being asked to stop by the supervisor" if code == 0 else ""
            log.error("worker %d (pid %d) %s%s after %.1fs; starting it again in %.3gs", index, pid,
                      describe_exit(code), unasked, ran, slot.delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), slot.delay)
            slot.delay = min(slot.delay * 2, self.backoff_max)


def _log_plan(settings: Settings, plans: Sequence[WorkerPlan]) -> None:
    last = plans[-1]
    log.info("supervisor (pid %d): %d workers on the shared subscription $share/%s/<filter>; SIGTERM or SIGINT "
             "stops them all, SIGHUP reloads their alert rules", os.getpid(), len(plans), settings.mqtt.shared_group)
    for p in plans:
        port0 = " (port 0: an ephemeral port, in the worker's own log)" if p.http_addr.endswith(":0") else ""
        log.info("worker %d: client id %r, http %s%s", p.index, p.client_id, p.http_addr, port0)
    # The broker cannot be asked which sessions exist without taking one over; so this is said at
    # every start rather than detected.
    log.info("if an earlier run had more workers, the sessions of the client ids after %r (%s) are still "
             "members of the shared group: the broker queues their share of new messages there until "
             "mqtt.session_expiry (%d s) after they left, and those are stored only if a worker with that id "
             "comes back before then", last.client_id, client_id_of(settings.mqtt.client_id, last.index + 1) + ", ...",
             settings.mqtt.session_expiry)


def supervise(settings: Settings, config: Path | None, workers: int, *, asked: str | None = None) -> int:
    """`sensor-ingest run` with ``workers`` >= 2: check the plan (ConfigError), then run the workers
    until SIGTERM or SIGINT."""
    plans = plan_workers(settings, workers, config, asked=asked)
    setup_logging(settings.log.level, settings.log.format)
    _log_plan(settings, plans)
    return asyncio.run(Supervisor(plans, lambda k: worker_command(config, k, workers=workers)).run())


async def _orphan_watch(parent: int) -> None:
    """Stop this worker (SIGTERM to itself: the service's graceful stop) once its supervisor is gone,
    e.g. SIGKILLed: a worker left behind would hold its HTTP port, and its client id against the
    worker a new supervisor starts (the broker would hand the session back and forth between them)."""
    while os.getppid() == parent:  # noqa: ASYNC110 - the event is another process's death
        await asyncio.sleep(ORPHAN_CHECK)
    log.warning("the supervisor (pid %d) is gone: stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)


async def _serve(settings: Settings, config: Path | None, parent: int, siblings: list[str]) -> int:
    from ingest.service import run_service

    watch = asyncio.create_task(_orphan_watch(parent), name="orphan-watch")
    try:
        return await run_service(settings, config, siblings)
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


def run_worker(settings: Settings, config: Path | None, index: int, supervisor: int | None = None,
               workers: int | None = None) -> int:
    """`sensor-ingest run --worker-index k --supervisor-pid P`, as the supervisor starts it: the service
    with worker k's client id, HTTP address and log tag, for as long as its supervisor ``supervisor``
    (default: the parent process) is there. The pid comes on the command line because the supervisor
    may die before this process, still importing, asks for its parent. ``workers``: how many the
    supervisor runs (their client ids are this worker's siblings; None: unknown)."""
    mine = worker_settings(settings, index, config)
    setup_logging(mine.log.level, mine.log.format, worker=index)
    siblings = [client_id_of(settings.mqtt.client_id, k) for k in range(1, (workers or 0) + 1)]
    return asyncio.run(_serve(mine, config, os.getppid() if supervisor is None else supervisor, siblings))
