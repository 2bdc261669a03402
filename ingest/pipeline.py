"""Wiring of the data path: consume -> process -> batch -> write -> ack, with backpressure.

Two tasks share the loop: ``consume`` turns arrived messages into outcomes and batches; ``write_loop``
commits one batch at a time and then acknowledges its messages. The queue between them holds at most
two batches, so a slow or absent database stops consumption, which stops acknowledgements, which
stops the broker (Receive Maximum): backpressure all the way to the broker, nothing dropped.

When the broker connection that messages arrived on is gone and the new one resumed the session, the
broker redelivers every message that was not acknowledged; those still waiting here unwritten are then
released (``release_before``) instead of being written twice. QoS 0 messages are never released: no
one would deliver them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from ingest.batcher import Batch, Batcher
from ingest.metrics import Metrics
from ingest.model import RawMessage, Rejection, utc_now
from ingest.process import Outcome, Processor
from ingest.settings import IngestSettings
from ingest.store.classify import classify, describe
from ingest.store.writer import Writer

__all__ = ["Pipeline"]

log = logging.getLogger(__name__)

_CHUNK = 500  # messages processed before the loop gets a turn ...
_CHUNK_SECONDS = 0.02  # ... or this much processing time, whichever comes first
_RETRY_MIN, _RETRY_MAX = 0.2, 10.0
_TOUCH_EVERY = 5.0  # seconds: devices.last_seen is brought up to date at least this often under load


class ShutdownAbort(Exception):
    """Stop was asked while the database is away: leave the rest unacknowledged for redelivery."""


def _db_rejection(outcome: Outcome, exc: BaseException, kind: str) -> Outcome:
    text = describe(exc)[:500]
    if kind == "data":
        state = getattr(exc, "sqlstate", None) or "none: refused by the driver"
        reason, detail = "db_rejected", f"the database refused this message's data (SQLSTATE {state}): {text}"
    else:
        reason, detail = "write_error", f"writing this message failed unexpectedly ({text}); report it"
    device = outcome.rejection.device if outcome.rejection else (outcome.readings[0].device if outcome.readings
                                                                   else None)
    return Outcome(outcome.message, outcome.source, [], Rejection(reason, detail, device))


class Pipeline:
    def __init__(
        self,
        settings: IngestSettings,
        processor: Processor,
        writer: Writer,
        metrics: Metrics,
        *,
        ack: Callable[[int, list[int]], int],
        inbox_limit: int,
        pause: Callable[[], None] = lambda: None,
        resume: Callable[[], None] = lambda: None,
        window_full: Callable[[], bool] = lambda: False,
    ) -> None:
        """``window_full``: true while no more messages can arrive before some are acknowledged
        (receive_maximum reached); the batch is then written at once instead of at its age."""
        self.processor = processor
        self.writer = writer
        self.metrics = metrics
        self._ack = ack
        self._pause, self._resume = pause, resume
        self._window_full = window_full
        self.inbox: deque[RawMessage] = deque()
        self.inbox_limit = inbox_limit
        self._paused = False
        self.batcher = Batcher(settings.batch_max_messages, settings.batch_max_readings, settings.batch_max_age)
        self._batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2)
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()  # cuts a write's backoff short (the database answers again)
        self._stopping = False
        self._abort = False
        self.db_ok = True
        self.db_down_since: float | None = None  # monotonic start of the attempt that began an outage
        self.write_started: float | None = None  # monotonic start of the write in progress
        self.last_write_ok = 0.0  # monotonic time of the last commit
        self.last_answer = 0.0  # monotonic time the database last answered (a commit or a probe)
        self._touched_at = 0.0
        self._fatal_logged: set[str] = set()  # unexpected failure types already logged in full
        self.committed_messages = 0
        self._release_below = 0  # QoS>0 messages of older epochs are redelivered by the broker
        self._received_by_source: dict[str, Any] = {}  # labelled counter children, looked up once

    # ---- input --------------------------------------------------------------------------------

    def submit(self, msg: RawMessage) -> None:
        """Called by the MQTT bridge for each message, on the loop."""
        self.inbox.append(msg)
        self._wake.set()
        if not self._paused and len(self.inbox) >= self.inbox_limit:
            # Only QoS 0 floods get here: QoS 1 is bounded by Receive Maximum.
            self._paused = True
            self._pause()

    def release_before(self, epoch: int) -> None:
        """The connection of ``epoch`` resumed the session: older unacked messages will come again."""
        self._release_below = epoch
        kept = [m for m in self.inbox if m.qos == 0 or m.epoch >= epoch]
        released = len(self.inbox) - len(kept)
        if released:
            self.inbox.clear()  # in place: consume() holds a reference
            self.inbox.extend(kept)
            self.metrics.stale_dropped.inc(released)
            log.info("released %d queued message(s) of the previous connection to the broker's redelivery", released)

    def stalled_for(self, now: float) -> float:
        """Seconds the database has been failing writes, or has not answered during the write in
        progress. A slow write while the database still answers (a probe on another connection) is
        progress, not an outage: it must not suspend the broker connection."""
        if self.db_down_since is not None:
            return now - self.db_down_since
        if self.write_started is None:
            return 0.0
        return max(0.0, now - max(self.write_started, self.last_answer))

    def answered(self, now: float) -> None:
        """The database answered a probe: it is there, and a failing write may retry now."""
        self.last_answer = max(self.last_answer, now)
        self._retry_now.set()

    async def _hand_over(self, batch: Batch) -> None:
        if self._batches.full():
            self.metrics.held.hold("write queue full")
            try:
                await self._batches.put(batch)
            finally:
                self.metrics.held.release("write queue full")
        else:
            self._batches.put_nowait(batch)

    # ---- tasks --------------------------------------------------------------------------------

    async def consume(self) -> None:
        batcher, inbox = self.batcher, self.inbox
        while True:
            if not inbox:
                if self._stopping:
                    break
                due = batcher.due_at()
                self._wake.clear()
                timeout = None if due is None else max(0.0, due - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            # Bounded by count and by time: a few maximal messages must not hold the loop (and with it
            # the acknowledgements and the HTTP server) for longer than a batch may wait.
            chunk_end = time.monotonic() + _CHUNK_SECONDS
            for _ in range(min(len(inbox), _CHUNK)):
                if not inbox or time.monotonic() > chunk_end:  # or release_before() ran meanwhile
                    break
                msg = inbox.popleft()
                outcome = self.processor.process(msg)
                source = outcome.source or "-"
                counter = self._received_by_source.get(source)
                if counter is None:
                    counter = self._received_by_source[source] = self.metrics.messages_received.labels(source)
                counter.inc()
                batcher.add(outcome, time.monotonic())
                if batcher.full():
                    await self._hand_over(batcher.take())
            if self._paused and len(inbox) < self.inbox_limit // 2:
                self._paused = False
                self._resume()
            if batcher.ready(time.monotonic()) or (not inbox and not batcher.empty and self._window_full()):
                await self._hand_over(batcher.take())
            await asyncio.sleep(0)
        if not batcher.empty:
            await self._hand_over(batcher.take())
        await self._batches.put(None)

    async def write_loop(self) -> None:
        while True:
            batch = await self._batches.get()
            if batch is None:
                return
            try:
                await self._commit(self._unreleased(batch.outcomes))
            except ShutdownAbort:
                log.warning("shutting down with the database away: %d message(s) left unacknowledged "
                            "for the broker to redeliver", len(batch))
                return
            by_epoch: dict[int, list[int]] = defaultdict(list)
            for o in batch.outcomes:
                by_epoch[o.message.epoch].append(o.message.seq)
            for epoch, seqs in by_epoch.items():
                self._ack(epoch, seqs)
            self.committed_messages += len(batch)
            self.metrics.batch_messages.observe(len(batch))
            now = time.monotonic()
            if self._batches.empty() or now - self._touched_at > _TOUCH_EVERY:
                self._touched_at = now
                # After the acks; when idle, or now and then. A wait on the database like a write:
                # held up (the database gone right after a commit), it counts in stalled_for.
                self.write_started = now
                try:
                    await self.writer.touch_devices()
                finally:
                    self.write_started = None

    def retry_now(self) -> None:
        """The database answers again: retry a failing write now rather than at the end of its backoff."""
        self._retry_now.set()

    def stop(self, abort_writes: bool = False) -> None:
        """Finish what has arrived (flush, commit, ack) and end both tasks."""
        self._stopping = True
        self._abort = abort_writes
        self._wake.set()

    # ---- writing ------------------------------------------------------------------------------

    def _unreleased(self, outcomes: list[Outcome]) -> list[Outcome]:
        below = self._release_below
        if not below:
            return outcomes
        kept = [o for o in outcomes if o.message.qos == 0 or o.message.epoch >= below]
        if len(kept) != len(outcomes):
            self.metrics.stale_dropped.inc(len(outcomes) - len(kept))
        return kept

    async def _commit(self, outcomes: list[Outcome], depth: int = 0) -> None:
        delay = _RETRY_MIN
        while True:
            if depth == 0 and self._release_below:
                outcomes = self._unreleased(outcomes)  # a retry may outlive the connection
            if not outcomes:
                return
            t0 = self.write_started = time.monotonic()
            try:
                result = await self.writer.write(outcomes)
            except Exception as exc:
                self.write_started = None
                kind = classify(exc)
                self.metrics.db_errors.labels(kind).inc()
                if kind == "data" or (kind == "fatal" and (len(outcomes) > 1 or depth == 0)):
                    # Something in the batch: find the one message at fault. An unexpected failure
                    # is narrowed too, so that one message that trips a bug cannot hold the fleet;
                    # when even a lone rejection row fails that way, it is not the message: retry.
                    await self._narrow(outcomes, exc, kind, depth)
                    return
                if self.db_down_since is None:
                    self.db_down_since = t0
                log.debug("write of %d message(s) failed (%s: %s); next try in %.1fs", len(outcomes), kind,
                          describe(exc), delay)
                if self.db_ok:
                    self.db_ok = False
                    self.metrics.db_ok.set(0)
                    level = logging.WARNING if kind == "retry" else logging.ERROR
                    log.log(level, "database write failed (%s: %s); retrying with backoff, %d message(s) "
                            "held unacknowledged", kind, describe(exc), len(outcomes), exc_info=kind == "fatal")
                if self._abort:
                    raise ShutdownAbort from exc
                self._retry_now.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry_now.wait(), delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            now = self.last_write_ok = self.last_answer = time.monotonic()
            self.write_started = None
            if self.db_down_since is not None:
                log.info("database writes succeed again after %.1fs", now - self.db_down_since)
                self.db_down_since = None
            if not self.db_ok:
                self.db_ok = True
                self.metrics.db_ok.set(1)
            m = self.metrics
            m.flush_seconds.observe(now - t0)
            committed_at = utc_now()
            for o in outcomes:
                m.commit_latency.observe((committed_at - o.message.received_at).total_seconds())
            m.readings_written.inc(result.readings + result.states)
            if result.duplicates:
                m.duplicates.inc(result.duplicates)
            if result.alerts is not None:
                m.count_alerts(result.alerts)
            unbound = sum(o.unbound for o in outcomes)
            if unbound:
                m.unbound_readings.inc(unbound)
            if result.conflict_path:
                m.conflict_batches.inc()
            for reason, n in result.reasons.items():
                m.rejections.labels(reason).inc(n)
            m.ignored_leaves.inc(sum(o.ignored for o in outcomes))
            for o in outcomes:
                if o.skipped is not None:
                    m.messages_skipped.labels(o.source or "-", o.skipped).inc()
            return

    async def _narrow(self, outcomes: list[Outcome], exc: BaseException, kind: str, depth: int) -> None:
        """A data-class (or unexpected) failure: split until the one message at fault becomes a
        rejection."""
        if len(outcomes) > 1:
            half = len(outcomes) // 2
            await self._commit(outcomes[:half], depth)
            await self._commit(outcomes[half:], depth)
            return
        if depth >= 2:
            # Even its rejection row cannot be stored: say so loudly with everything needed to
            # recover it by hand; acknowledging is then the only way not to block the fleet.
            msg = outcomes[0].message
            log.error("message on %r cannot be stored even as a rejection (%s); payload hex: %s",
                      msg.topic, exc, msg.payload[:4096].hex())
            return
        topic = outcomes[0].message.topic
        if kind == "data":
            log.warning("message on %r refused by the database (%s); storing it as a rejection", topic, describe(exc))
        else:
            # Logged in full once per failure type (a flood of one poison payload must not flood the
            # log); every one is counted (rejections{reason="write_error"}) and kept as a rejection row.
            key = type(exc).__qualname__ + ":" + str(getattr(exc, "sqlstate", ""))
            first = key not in self._fatal_logged
            self._fatal_logged.add(key)
            log.log(logging.ERROR if first else logging.DEBUG,
                    "writing the message on %r failed unexpectedly (%s); storing it as a rejection (write_error)",
                    topic, describe(exc), exc_info=exc if first else None)
        await self._commit([_db_rejection(outcomes[0], exc, kind)], depth + 1)
