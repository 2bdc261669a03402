"""`sensor-ingest run`: builds the parts from the settings and runs them until a stop signal."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import uvicorn

from ingest.alerts.catchup import CatchUp, Sessions
from ingest.alerts.dispatch import Dispatcher
from ingest.alerts.evaluator import Evaluator, tick_of
from ingest.alerts.mqtt_channel import AlertPublisher
from ingest.alerts.runtime import AlertRuntime, RuleSet
from ingest.alerts.silence import release_loop
from ingest.alerts.stage import AlertStage
from ingest.alerts.versions import Versions, worker_name
from ingest.http import create_app
from ingest.metrics import Metrics
from ingest.mqtt import MqttBridge
from ingest.pipeline import Pipeline
from ingest.process import Processor
from ingest.settings import Settings, mask_url
from ingest.store.classify import describe, is_retryable
from ingest.store.ids import sync_bindings
from ingest.store.migrate import discover
from ingest.store.pool import create_pool, dsn_of
from ingest.store.retention import retention_loop
from ingest.store.writer import Writer

__all__ = ["run_service"]

log = logging.getLogger("ingest.service")

# After a stop signal: how long to keep trying to commit what has arrived before leaving it to
# the broker's redelivery.
SHUTDOWN_GRACE = 20.0


class _HttpServer(uvicorn.Server):
    """uvicorn would install its own SIGTERM/SIGINT handlers over ours; the service owns them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _connect_database(settings: Settings, stop: asyncio.Event) -> asyncpg.Pool | None:
    delay = 0.5
    warned = False
    while not stop.is_set():
        try:
            return await create_pool(settings.database)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            if not warned:
                log.warning("database %s unavailable (%s); retrying", mask_url(settings.database.url), exc)
                warned = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)
    return None


class _Probe:
    """Ask the database `SELECT 1` every few seconds, on a connection other than the writer's.

    It runs during writes too: a write that takes long while the database still answers is slow,
    not away, and must not suspend the broker connection (Pipeline.stalled_for). A commit answers
    the same question more recently: a probe that failed while a write got through is not
    reported, and a failed probe is cleared by the next commit without a log line of its own (the
    pipeline logs its recovery).
    """

    def __init__(self, pool: Callable[[], asyncpg.Pool], dsn: str, timeout: float, last_commit: Callable[[], float],
                 on_answer: Callable[[float], None], interval: float = 2.0) -> None:
        self.dsn = dsn
        self.pool, self.timeout, self.interval = pool, timeout, interval  # pool(): the writer's current pool
        self.last_commit = last_commit  # monotonic time of the last commit
        self.on_answer = on_answer  # called with the monotonic time of each answer
        self.ok = True
        self.checked_at = 0.0

    async def _select_1(self) -> None:
        pool = self.pool()
        if not pool.is_closing():
            await pool.fetchval("SELECT 1", timeout=self.timeout)
            return
        # The writer closed its pool after a failure and opens a new one at its next try: ask on a
        # connection of our own, so that a database that is back is noticed (and the write retried).
        conn = await asyncpg.connect(self.dsn, timeout=self.timeout)
        try:
            await conn.fetchval("SELECT 1", timeout=self.timeout)
        finally:
            conn.terminate()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.ok and self.last_commit() > self.checked_at:
                self.ok = True
            started = self.checked_at = time.monotonic()
            try:
                await asyncio.wait_for(self._select_1(), self.timeout + 1)
                ok, why = True, ""
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                ok, why = False, describe(exc)
            if not ok and self.last_commit() > started:
                continue  # a write committed meanwhile: the database is there
            if ok:
                self.on_answer(time.monotonic())
            if ok != self.ok:
                if ok:
                    log.info("database answers again")
                else:
                    log.warning("database does not answer (%s)", why)
                self.ok = ok


async def _check_schema(pool: asyncpg.Pool) -> str | None:
    want = max((m.version for m in discover()), default=0)
    try:
        have = await pool.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        have = None
    if have is None or have < want:
        return f"the database schema is at version {have or 0}, this release needs {want}: run `sensor-ingest migrate`"
    return None


# The data path allocates a few objects per reading and frees nearly all of them by reference
# counting; Python's cyclic collector, run every 700 allocations by default, finds almost nothing
# there. What start-up built (modules, the catalog, pint's registry) is moved out of its reach
# (gc.freeze) and the first generation is collected every GC_GEN0 allocations (issue #17: part of the
# drain's gain in BENCHMARKS.md; the drain's peak RSS stayed 87 MB).
GC_GEN0 = 50_000


def _tune_gc() -> None:
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_GEN0, second, third)


async def run_service(settings: Settings, config: Path | None = None, siblings: Sequence[str] = ()) -> int:
    """``config``: the file the settings came from, read again by a reload of the alert rules."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Until the rules are loaded a SIGHUP has nothing to reload, but must not end the process.
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP before start-up finished: nothing to reload"))

    metrics = Metrics()
    processor = Processor.from_settings(settings)
    if not processor.filters:
        log.error("no [[sources]] configured: nothing to subscribe to (see deploy/sensor-ingest.example.toml)")
        return 2

    pool = await _connect_database(settings, stop)
    if pool is None:
        return 0
    problem = await _check_schema(pool)
    if problem:
        log.error(problem)
        await pool.close()
        return 2
    metrics.db_ok.set(1)
    try:
        async with pool.acquire(timeout=settings.database.command_timeout) as conn:
            changed, kept = await sync_bindings(conn, processor.catalog)
        if changed:
            log.info("metric catalog: the binding of %d metric(s) in the metrics table changed", changed)
        for line in kept:
            log.warning("metric catalog: metric %s", line)
    except Exception as failure:
        # Without the stored units, a metric whose history is in another unit than its quantity's
        # would change unit under it: refuse to start (the service retries nothing here).
        log.error("metric catalog: the metrics table could not be read to keep stored units (%s); not starting",
                  failure)
        await pool.close()
        return 1
    if processor.catalog is not None:
        processor.catalog.warm()  # pint's registry (about 0.2 s) now, not on the first reading
    _tune_gc()

    rules, hooks = settings.compiled_alerts()
    a = settings.alerts
    runtime = AlertRuntime(RuleSet(rules, hooks, a.max_notify_age, a.retry_max, a.mqtt, a.mqtt_prefix, a.lateness,
                                   a.no_data_grace), config)
    from ingest.quality import source_intervals

    versions = Versions(worker_name(settings.mqtt.client_id), datetime.now(UTC))
    stage = AlertStage(runtime, intervals=source_intervals(settings), versions=versions)
    catchup = CatchUp()
    bridge_ref: list[MqttBridge] = []
    sessions = Sessions(settings.mqtt.client_id, catchup, lambda: bridge_ref[0].tracker.oldest_arrival if bridge_ref
                        else None, siblings=siblings, wait=a.catch_up_wait)
    stage.floor = sessions.floor_now
    dispatcher: Dispatcher | None = None
    dispatch_pool: asyncpg.Pool | None = None
    if settings.alerts.dispatcher:
        try:
            dispatch_pool = await create_pool(settings.database.model_copy(update={"pool_size": 2}),
                                              "sensor-ingest-dispatch")
        except Exception as failure:
            log.error("alerts: the dispatcher's connections could not be made (%s); not starting", failure)
            await pool.close()
            return 1
        # Made with alerts.mqtt off too: it connects only when an MQTT row is due (a reload may turn it on).
        dispatcher = Dispatcher(dispatch_pool, hooks, metrics, retry_max=settings.alerts.retry_max,
                                mqtt=AlertPublisher(settings.mqtt, a.mqtt_prefix))
        runtime.on_change(lambda active: dispatcher.set_webhooks(active.webhooks, retry_max=active.retry_max,
                                                                 mqtt_prefix=active.mqtt_prefix)
                          if dispatcher else None)
    loop.add_signal_handler(signal.SIGHUP, runtime.reload)
    if rules:
        log.info("alerts: %d rule(s), %d webhook(s)%s", len(rules), len(hooks),
                 "" if dispatcher else "; this process does not deliver (alerts.dispatcher = false)")

    writer = Writer(pool, timeout=settings.database.command_timeout,
                    renew_pool=lambda: create_pool(settings.database),
                    new_devices_per_minute=settings.ingest.max_new_devices_per_minute,
                    new_metrics_per_minute=settings.ingest.max_new_metrics_per_minute,
                    catalog=processor.catalog,
                    known_only=[s.name for s in settings.all_sources() if s.device_policy == "known"],
                    alerts=stage)
    pipeline_ref: list[Pipeline] = []
    bridge = MqttBridge(settings.mqtt, processor.filters, lambda m: pipeline_ref[0].submit(m), metrics=metrics,
                        on_session=lambda epoch, _resumed: pipeline_ref[0].release_before(epoch),
                        identifiers=processor.subscription_ids, catchup=catchup)
    bridge_ref.append(bridge)
    pipeline = Pipeline(
        settings.ingest, processor, writer, metrics,
        ack=bridge.ack,
        inbox_limit=2 * settings.mqtt.receive_maximum,
        pause=lambda: bridge.pause_reading("inbox full"), resume=lambda: bridge.resume_reading("inbox full"),
        window_full=lambda: bridge.window_full,
    )
    pipeline_ref.append(pipeline)

    # A database that fails, or stops answering, for longer than this is "away": /readyz says so, and
    # the broker connection is closed on purpose (half the keepalive: before pings could be missed).
    stall_limit = max(1.0, settings.mqtt.keepalive / 2)
    # Asked several times within the stall limit, so that a slow write on a database that still
    # answers is never mistaken for an outage.
    probe = _Probe(lambda: writer.pool, dsn_of(settings.database), stall_limit, lambda: pipeline.last_write_ok,
                   pipeline.answered, interval=min(2.0, stall_limit / 4))

    def database_ok() -> bool:
        answered = probe.ok or pipeline.last_write_ok > probe.checked_at  # a commit since the failed probe
        return pipeline.db_ok and answered and pipeline.stalled_for(time.monotonic()) < stall_limit

    def readiness() -> dict[str, bool]:
        return {"mqtt": bridge.connected, "database": database_ok()}

    async def guard() -> None:
        """Suspend the broker connection while the database is away; resume when it is back."""
        while True:
            stalled = pipeline.stalled_for(time.monotonic())
            if bridge.suspended is None and stalled >= stall_limit:
                bridge.suspend(f"the database has not taken a write for {stalled:.0f}s")
            elif bridge.suspended is not None and stalled == 0 and database_ok():
                bridge.resume()
            metrics.db_ok.set(1 if database_ok() else 0)
            await asyncio.sleep(0.25)

    server = _HttpServer(uvicorn.Config(
        create_app(metrics, readiness, alerts=runtime), host=settings.http.host, port=settings.http.port,
        log_level="warning", access_log=False, lifespan="off", log_config=None,
    ))

    async def gauges() -> None:
        while True:
            metrics.unacked.set(bridge.tracker.unacked)
            metrics.inbox.set(len(pipeline.inbox))
            oldest = bridge.tracker.oldest_arrival
            metrics.oldest_unacked_age.set(0 if oldest is None else time.monotonic() - oldest)
            metrics.held.flush()
            await asyncio.sleep(1.0)

    async def quality() -> None:
        """The fleet quality gauges, every quality.every seconds, on the writer's pool (one read, under a
        statement timeout of its own: ingest.quality.gauges_timeout)."""

        from ingest.quality import fleet_quality, source_intervals

        intervals = source_intervals(settings)
        while True:
            try:

                p = writer.pool
                if not p.is_closing():
                    async with p.acquire(timeout=30) as conn:
                        fleet = await asyncio.wait_for(
                            fleet_quality(conn, settings.quality, intervals, datetime.now(UTC)), 120)
                    metrics.devices_reporting.set(fleet.devices_reporting)
                    metrics.devices_stale.set(fleet.devices_stale)
                    metrics.devices_incomplete.set(fleet.devices_incomplete)
                    metrics.quality_computed.set(time.time())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("quality: the fleet gauges were not computed (%s); next try in %.0fs", describe(exc),
                            settings.quality.every)
            await asyncio.sleep(settings.quality.every)

    # Whether this worker has caught up, and the floor of those that have not (ingest.alerts.catchup),
    # on a connection of its own: a beat that waited for the writer's pool would make this worker look
    # gone to the others. The first beat goes before the broker connection, so that no other worker
    # judges past what this one's session holds.
    sessions_pool: list[asyncpg.Pool] = []

    async def beat() -> None:
        if not runtime.active.rules:
            sessions.floor = sessions.held_since = None  # nothing to judge; a reload that adds rules starts beats
            return
        if not sessions_pool:
            sessions_pool.append(await create_pool(settings.database.model_copy(update={"pool_size": 1}),
                                                   "sensor-ingest-sessions"))
        tick = tick_of(runtime.active.lateness)
        async with sessions_pool[0].acquire(timeout=5) as conn:
            await asyncio.wait_for(sessions.beat(conn, max(runtime.active.lateness, 2 * tick)), 5)
        metrics.alert_held.set(sessions.held_for())

    async def beats() -> None:
        failing_since: float | None = None
        given_up = False
        while True:
            try:
                await beat()
                if failing_since is not None:
                    log.info("alerts: this worker's catch-up state is written again")
                failing_since, given_up = None, False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("alerts: this worker's catch-up state could not be written (%s); nothing is judged "
                                "until it is, for at most alerts.catch_up_wait (%.0fs)", describe(exc),
                                a.catch_up_wait)
                if now - failing_since <= a.catch_up_wait:
                    sessions.failed()
                else:
                    sessions.floor = sessions.held_since = None
                    if not given_up:
                        given_up = True
                        log.warning("alerts: this worker's catch-up state has not been written for longer than "
                                    "alerts.catch_up_wait: judging goes on without the other workers' (%s)",
                                    describe(exc))
            await asyncio.sleep(tick_of(runtime.active.lateness))

    with contextlib.suppress(Exception):
        await beat()
    tasks = {
        "mqtt": asyncio.create_task(bridge.run(), name="mqtt"),
        "consume": asyncio.create_task(pipeline.consume(), name="consume"),
        "write": asyncio.create_task(pipeline.write_loop(), name="write"),
        "http": asyncio.create_task(server.serve(), name="http"),
        "gauges": asyncio.create_task(gauges(), name="gauges"),
        "guard": asyncio.create_task(guard(), name="guard"),
        "probe": asyncio.create_task(probe.run(), name="probe"),
    }
    if settings.retention.enabled:
        tasks["retention"] = asyncio.create_task(retention_loop(lambda: writer.pool, settings.retention, metrics),
                                                 name="retention")
    # Judges the series whose readings waited for the watermark, and the silences of no_data rules.
    evaluator = Evaluator(lambda: writer.pool, stage, versions, on_result=metrics.count_alerts,
                          ready=lambda: bridge.connected and database_ok())
    tasks["evaluator"] = asyncio.create_task(evaluator.run(), name="evaluator")
    tasks["beats"] = asyncio.create_task(beats(), name="beats")
    # Sends the firing notifications that silences held back, once they end (one worker at a time).
    tasks["silences"] = asyncio.create_task(release_loop(lambda: writer.pool, held=lambda: sessions.floor is not None),
                                            name="silences")
    if settings.quality.every > 0:
        tasks["quality"] = asyncio.create_task(quality(), name="quality")
    dispatch_stop = asyncio.Event()
    if dispatcher is not None:
        tasks["dispatch"] = asyncio.create_task(dispatcher.run(dispatch_stop), name="dispatch")
    log.info("sensor-ingest running: %d source(s), database %s, broker %s, http %s",
             len(processor.sources), mask_url(settings.database.url), mask_url(settings.mqtt.url), settings.http.addr)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks.values()], return_when=asyncio.FIRST_COMPLETED)
    crashed = [t for t in done if t is not stopper]
    for t in crashed:
        exc = t.exception()
        if exc is not None:
            log.error("task %s failed: %r", t.get_name(), exc, exc_info=exc)
        else:
            log.error("task %s ended unexpectedly", t.get_name())

    # Graceful stop: take no more messages, commit and acknowledge what has arrived, disconnect.
    log.info("stopping: flushing %d queued message(s)", len(pipeline.inbox))
    bridge.pause_reading("shutdown")
    pipeline.stop()
    aborted = False
    try:
        await asyncio.wait_for(asyncio.gather(tasks["consume"], tasks["write"]), SHUTDOWN_GRACE)
    except TimeoutError:
        log.warning("database did not take the last batches within %.0fs; the broker will redeliver them",
                    SHUTDOWN_GRACE)
        pipeline.stop(abort_writes=True)
        aborted = True
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.gather(tasks["consume"], tasks["write"]), 2.0)
    await bridge.stop()
    dispatch_stop.set()  # committed events stay in the outbox: the next start delivers them
    server.should_exit = True
    for name in ("mqtt", "gauges", "guard", "probe", "retention", "quality", "silences", "evaluator", "beats"):
        if name in tasks:
            tasks[name].cancel()
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 5.0)
    if not aborted:  # the other workers need not wait LIVE seconds to know this one's versions are gone
        with contextlib.suppress(Exception):
            async with writer.pool.acquire(timeout=2) as conn:
                await asyncio.wait_for(versions.leave(conn), 2.0)
                await asyncio.wait_for(sessions.stopped(conn), 2.0)
    for p in sessions_pool:
        p.terminate()
    if aborted:
        writer.pool.terminate()  # a graceful close would wait on connections stuck in a dead network
    else:
        await writer.pool.close()
    if dispatcher is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(dispatcher.aclose(), 5.0)
    if dispatch_pool is not None:
        # Its connections may have lived through an outage (a blackhole): never wait on them for long.
        # Nothing is lost: a delivery in flight is retried after its lease.
        try:
            if aborted:
                raise TimeoutError
            await asyncio.wait_for(dispatch_pool.close(), 2.0)
        except TimeoutError:
            dispatch_pool.terminate()
    log.info("stopped: %d message(s) committed and acknowledged", pipeline.committed_messages)
    return 1 if crashed else 0
