"""The webhook dispatcher: delivers alert_outbox rows, signed (Standard Webhooks), at least once.

Claims. A row is claimed when it is the oldest pending row of its (webhook, series), due
(next_attempt_at) and not under a live lease: one statement sets its lease_until and counts the
attempt, and commits, so no row lock is held during the HTTP call and several dispatchers (in one
process or several) can run at once. While a series' oldest row waits for a retry, or is leased,
no newer row of that series is claimed: a resolved event never overtakes its firing event. The
statement that records a delivery also claims the series' next row when it is due and not leased,
and the same task delivers it: a series' events follow each other without waiting for a claim round
(up to CHAIN_MAX rows, then the task ends and a claim round shares the room among all the series;
only run() does this, run_once() takes one row a series).

Results. 2xx: delivered. 408, 429, 5xx, a network error or a timeout: retried with exponential
backoff and full jitter (the first retry within a second, doubling up to ``retry_max``), or after
the receiver's Retry-After. 410: the webhook is disabled; other 4xx and 3xx: failed at once. A row
older than its webhook's max_age is failed without a request ("max_age"). A result is recorded only
by the dispatcher that still holds the lease (lease_until is the fencing token), except "delivered",
which always wins over a pending row. A dispatcher that dies mid-call leaves its lease to expire;
another then delivers the row again under the same webhook-id (at least once; receivers
deduplicate on webhook-id).

Decisions:
- 410 Gone disables the webhook in this dispatcher until the next set_webhooks() (a config reload)
  or a restart, logged as an error. Its rows stay pending, the one that was answered 410 included
  (last_status 410): nothing is lost, and when the operator re-enables it they are delivered, or
  failed by max_age if they are too old by then.
- Rows of webhook "mqtt:alerts" (alerts.mqtt = true) are the same events published over MQTT
  (ingest.alerts.mqtt_channel): claimed, ordered per series, leased, retried and failed like a
  webhook's, but the attempt is a QoS 1 PUBLISH, delivered on a PUBACK with a success code; a
  refusal, a lost connection or no PUBACK in time is retried with the same backoff. Its max_age is
  the webhooks' default (24 h).
- Rows of a webhook that is not configured (removed by a reload, or named by another process's
  config) are left pending, untouched, and logged once per webhook name.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import httpx

from ingest.alerts.model import Webhook
from ingest.alerts.mqtt_channel import CHANNEL_NAME, AlertPublisher
from ingest.alerts.sign import headers as signed_headers
from ingest.metrics import Metrics
from ingest.store.classify import describe, is_retryable

__all__ = ["CHANNEL", "Dispatcher", "Verdict", "backoff", "judge", "retry_after"]

log = logging.getLogger("ingest.alerts.dispatch")

CHANNEL = "sensor_ingest_outbox"  # the writer NOTIFYs it in the transaction that inserts outbox rows
FIRST_RETRY = 1.0  # seconds: the jitter range of the first retry, doubled at each further one
LEASE_MARGIN = 10.0  # seconds a lease outlasts its webhook's timeout: time to record the result
RESPONSE_LIMIT = 64 * 1024  # bytes of a response body read (and dropped); more is not waited for
ERROR_LIMIT = 300  # characters of last_error
SHUTDOWN_GRACE = 5.0  # seconds in-flight requests may finish after stop
UNKNOWN_EVERY = 300.0  # seconds between looks for pending rows of webhooks that are not configured
FAILING_LOG_EVERY = 60.0  # seconds: at most one "retrying" line per webhook in this time
USER_AGENT = "sensor-ingest"
CHAIN_MAX = 32  # rows of one series a delivery task takes in a row: then a claim round, fair to the others

Outcome = Literal["delivered", "retry", "failed", "gone"]

# The heads of the queues first: the oldest pending row of each (webhook, series), found by a skip
# scan of alert_outbox_pending (one index probe per series, however deep its backlog), then those of
# them that are due and not leased, oldest schedule first. A "NOT EXISTS an older pending row" test
# per row did the same in one statement, but PostgreSQL planned it as a hash anti-join that compares
# every pending row of a series with every other one: 0.6 s a claim at 20,000 pending rows, 2.2 s at
# 100,000 (0.4 ms and 6 ms this way; BENCHMARKS.md). FOR UPDATE re-checks status and lease on the
# row's latest version, so a head another dispatcher delivered or leased meanwhile is skipped, and
# the row behind it waits for the next claim: a resolved event still never overtakes its firing one.
_CLAIM = """
WITH RECURSIVE heads AS (
    (SELECT o.webhook, o.series, o.id FROM alert_outbox o
     WHERE o.status = 'pending'
     ORDER BY o.webhook, o.series, o.id LIMIT 1)
    UNION ALL
    SELECT n.webhook, n.series, n.id FROM heads h CROSS JOIN LATERAL (
        SELECT o.webhook, o.series, o.id FROM alert_outbox o
        WHERE o.status = 'pending' AND (o.webhook, o.series) > (h.webhook, h.series)
        ORDER BY o.webhook, o.series, o.id LIMIT 1) n
), hooks AS (
    SELECT k.name, k.lease FROM unnest($1::text[], $2::float8[]) AS k(name, lease)
), due AS (
    SELECT o.id, k.lease
    FROM heads JOIN hooks k ON k.name = heads.webhook JOIN alert_outbox o ON o.id = heads.id
    WHERE o.status = 'pending'
      AND o.next_attempt_at <= $3
      AND (o.lease_until IS NULL OR o.lease_until <= $3)
    ORDER BY o.next_attempt_at, o.id
    LIMIT $4
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE alert_outbox o
SET lease_until = $3 + make_interval(secs => due.lease), attempts = o.attempts + 1
FROM due
WHERE o.id = due.id
RETURNING o.id, o.webhook, o.body::text AS body, o.attempts, o.created_at, o.lease_until, o.last_error
"""
# "delivered" wins whoever holds the lease: the receiver has the event.
_DELIVERED = """
UPDATE alert_outbox SET status = 'delivered', delivered_at = $2, last_status = $3, last_error = NULL,
                        lease_until = NULL
WHERE id = $1 AND status = 'pending'
"""
# "delivered", and in the same statement the claim of the series' next row if it is due and not
# leased: the series' events go out one after the other without waiting for the next claim round
# (at 160 events/s on 80 series that round trip, behind the ingest path on the loop, was most of an
# event's time to delivery: BENCHMARKS.md). The next row is the oldest pending one of the series after
# this one (this one was the head when it was claimed); the UPDATE re-checks status and lease on its
# latest version, so a row another dispatcher leased or delivered meanwhile is left alone.
_DELIVERED_NEXT = """
WITH done AS (
    UPDATE alert_outbox SET status = 'delivered', delivered_at = $2, last_status = $3, last_error = NULL,
                            lease_until = NULL
    WHERE id = $1 AND status = 'pending'
    RETURNING webhook, series
), head AS (
    SELECT o.id FROM alert_outbox o JOIN done ON o.webhook = done.webhook AND o.series = done.series
    WHERE o.status = 'pending' AND o.id > $1
    ORDER BY o.id LIMIT 1
), claimed AS (
    UPDATE alert_outbox o
    SET lease_until = $4 + make_interval(secs => $5), attempts = o.attempts + 1
    FROM head
    WHERE o.id = head.id AND o.status = 'pending' AND o.next_attempt_at <= $4
      AND (o.lease_until IS NULL OR o.lease_until <= $4)
    RETURNING o.id, o.body::text AS body, o.attempts, o.created_at, o.lease_until, o.last_error
)
SELECT (SELECT count(*) FROM done) AS recorded, c.* FROM (SELECT 1) AS one LEFT JOIN claimed c ON true
"""
_RETRY = """
UPDATE alert_outbox SET next_attempt_at = $2, last_status = $3, last_error = $4, lease_until = NULL
WHERE id = $1 AND status = 'pending' AND lease_until = $5
"""
_FAILED = """
UPDATE alert_outbox SET status = 'failed', last_status = $2, last_error = $3, lease_until = NULL
WHERE id = $1 AND status = 'pending' AND lease_until = $4
"""
_UNKNOWN = """
SELECT webhook, count(*) AS n FROM alert_outbox
WHERE status = 'pending' AND webhook <> ALL($1::text[])
GROUP BY webhook ORDER BY webhook
"""


# --- the pure part: what an answer means, when to try again ----------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    status: int | None  # the HTTP status, None without an answer
    error: str | None  # a short reason for last_error (None when delivered)
    retry_after: float | None = None  # seconds the receiver asked us to wait


def backoff(attempts: int, retry_max: float, jitter: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: full jitter, ``jitter`` in
    [0, 1) times FIRST_RETRY * 2**(attempts - 1), capped at retry_max."""
    cap = min(retry_max, FIRST_RETRY * 2.0 ** min(max(attempts, 1) - 1, 62))
    return jitter * cap


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a Retry-After header asks for: delay-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _snippet(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return text[:120] + ("..." if len(text) > 120 else "")


def judge(status: int, retry_after_header: str | None, body: bytes, now: float) -> Verdict:
    """What a receiver's answer means (Standard Webhooks, "Delivery success and failure")."""
    said = _snippet(body)
    reason = f"HTTP {status}" + (f": {said}" if said else "")
    if 200 <= status < 300:
        return Verdict("delivered", status, None)
    if status == 410:
        return Verdict("gone", status, "HTTP 410 Gone: the webhook is disabled until a config reload or a restart")
    if status in (408, 429) or status >= 500:
        return Verdict("retry", status, reason, retry_after(retry_after_header, now))
    if 300 <= status < 400:
        return Verdict("failed", status, f"HTTP {status}: redirects are not followed; configure the final url")
    return Verdict("failed", status, reason)


def _transport_reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"no answer within the timeout of {timeout:g}s ({type(exc).__name__})"
    return describe(exc)


# --- the I/O shell --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Claim:
    id: int
    webhook: Webhook
    body: bytes
    attempts: int
    created_at: float
    lease_until: datetime
    last_error: str | None


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _gone(conn: Any) -> bool:
    """The pool's connection closed: asyncpg then releases it, and its proxy refuses every call."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


class Dispatcher:
    """Delivers the outbox to ``webhooks`` (name -> Webhook). ``pool``: the dispatcher's own; with
    two connections or more, one of them LISTENs on CHANNEL in run(). ``lease``: the shortest lease
    of a claim (a webhook's is at least its timeout + LEASE_MARGIN); ``clock``: Unix seconds, for
    webhook-timestamp, leases, retries and max_age; ``jitter``: [0, 1) for the backoff; ``batch``:
    rows in flight at most; ``poll``: seconds between claims without a notification."""

    def __init__(self, pool: asyncpg.Pool, webhooks: Mapping[str, Webhook], metrics: Metrics | None = None, *,
                 retry_max: float = 300.0, lease: float = 30.0, client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.time, jitter: Callable[[], float] = random.random,
                 batch: int = 64, poll: float = 1.0, mqtt: AlertPublisher | None = None) -> None:
        if lease <= 0 or retry_max <= 0 or batch < 1 or poll <= 0:
            raise ValueError("lease, retry_max and poll must be positive and batch at least 1")
        self._pool = pool
        self._metrics = metrics
        self.retry_max = retry_max
        self.lease = lease
        self._clock = clock
        self._jitter = jitter
        self.batch = batch
        self.poll = poll
        self._own_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(
            follow_redirects=False, limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))
        self._webhooks: dict[str, Webhook] = dict(webhooks)
        self.disabled: set[str] = set()  # webhooks that answered 410, until set_webhooks()
        self._unknown_logged: set[str] = set()
        self._unknown_checked = -math.inf  # monotonic time of the last look for unconfigured webhooks
        self._failing: dict[str, bool] = {}  # webhook -> retrying (True: and that was logged)
        self._warned: dict[str, float] = {}  # webhook -> monotonic time its failing was last logged
        self._wake = asyncio.Event()
        self._soonest = math.inf  # the earliest next_attempt_at this dispatcher scheduled
        self._db_trouble: str | None = None
        self._closing = True  # not in run(), or run() is stopping: a delivery claims no next row
        # ``mqtt``: delivers the rows of CHANNEL_NAME; they are claimed like a webhook's (this Webhook
        # carries the name, the lease's timeout and max_age; it has no secret and is never POSTed to).
        # Its timeout, the bound of one attempt, is larger than the publisher's own (AlertPublisher.deadline):
        # the publisher times out first and drops the client, so a message paho may still send is not
        # left in an abandoned client while the retry is made.
        self._mqtt = mqtt
        self._mqtt_hook = None if mqtt is None else Webhook(
            CHANNEL_NAME, mqtt.address, b"", timeout=mqtt.deadline + 1.0)

    # -- configuration -----------------------------------------------------------------------------

    def set_webhooks(self, webhooks: Mapping[str, Webhook], *, retry_max: float | None = None,
                     mqtt_prefix: str | None = None) -> None:
        """A reload: the new set is in force at the next claim; webhooks disabled by a 410 are enabled
        again (the operator's reload is the "try again"). ``mqtt_prefix``: the alert topics' prefix
        from now on (pending MQTT rows included)."""
        self._webhooks = dict(webhooks)
        if mqtt_prefix is not None and self._mqtt is not None:
            self._mqtt.prefix = mqtt_prefix
        if retry_max is not None:
            self.retry_max = retry_max
        if self.disabled:
            log.info("webhook(s) %s enabled again by the reload", ", ".join(sorted(self.disabled)))
        self.disabled.clear()
        self._unknown_checked = -math.inf
        self._wake.set()

    @property
    def webhooks(self) -> dict[str, Webhook]:
        return dict(self._webhooks)

    def _active(self) -> dict[str, Webhook]:
        active = {n: w for n, w in self._webhooks.items() if n not in self.disabled}
        if self._mqtt_hook is not None:
            active[CHANNEL_NAME] = self._mqtt_hook
        return active

    def _lease_of(self, hook: Webhook) -> float:
        return max(self.lease, hook.timeout + LEASE_MARGIN)

    # -- one round ---------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim the due rows (up to ``batch``) and deliver them; the number claimed (each POSTed once,
        or failed by max_age without a request). Database errors of the claim are raised (run()
        retries them)."""
        claims = await self._claim(self.batch)
        await asyncio.gather(*(self._deliver(c) for c in claims))
        return len(claims)

    async def _claim(self, limit: int) -> list[_Claim]:
        if time.monotonic() - self._unknown_checked >= UNKNOWN_EVERY:
            await self._report_unknown()
        hooks = self._active()
        if not hooks or limit < 1:
            return []
        names = sorted(hooks)
        rows = await self._pool.fetch(_CLAIM, names, [self._lease_of(hooks[n]) for n in names],
                                      _at(self._clock()), limit)
        return [_Claim(r["id"], hooks[r["webhook"]], r["body"].encode(), r["attempts"], r["created_at"].timestamp(),
                       r["lease_until"], r["last_error"]) for r in rows]

    async def _report_unknown(self) -> None:
        rows = await self._pool.fetch(_UNKNOWN, sorted(self._webhooks) + ([CHANNEL_NAME] if self._mqtt else []))
        self._unknown_checked = time.monotonic()
        present = {r["webhook"]: r["n"] for r in rows}
        for name, n in present.items():
            if name not in self._unknown_logged:
                log.warning("%d pending alert deliveries are for webhook %r, which is not configured: they are kept "
                            "(not delivered, not failed) until a [[webhooks]] entry of that name is configured again",
                            n, name)
        self._unknown_logged = set(present)

    async def _deliver(self, claim: _Claim) -> None:
        """One attempt and its result, then the same for the series' next row if recording the
        delivery claimed it. Never raises but CancelledError."""
        next_claim: _Claim | None = claim
        for taken in range(CHAIN_MAX):
            if next_claim is None:
                return
            claim = next_claim
            hook = claim.webhook
            now = self._clock()
            age = now - claim.created_at
            if age >= hook.max_age:
                last = f" (last: {claim.last_error})" if claim.last_error else ""
                verdict = Verdict("failed", None, f"max_age: not delivered within {hook.max_age:g}s{last}")
            else:
                verdict = await self._attempt(claim, now)
            next_claim = await self._settle(claim, verdict, chain=taken < CHAIN_MAX - 1)

    async def _attempt(self, claim: _Claim, now: float) -> Verdict:
        hook = claim.webhook
        if hook is self._mqtt_hook and self._mqtt is not None:
            return await self._publish(self._mqtt, claim)
        sent = signed_headers(hook.secret, f"msg_{claim.id}", int(now), claim.body)
        sent["user-agent"] = USER_AGENT
        try:
            async with asyncio.timeout(hook.timeout):
                async with self._client.stream("POST", hook.url, content=claim.body, headers=sent,
                                               timeout=hook.timeout) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) >= RESPONSE_LIMIT:
                            break
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return Verdict("retry", None, _transport_reason(exc, hook.timeout))
        except Exception as exc:  # a bug here must not stop the other deliveries
            log.exception("delivery msg_%d to webhook %s: unexpected error", claim.id, hook.name)
            return Verdict("retry", None, describe(exc))
        return judge(response.status_code, response.headers.get("retry-after"), bytes(body), self._clock())

    async def _publish(self, mqtt: AlertPublisher, claim: _Claim) -> Verdict:
        try:
            async with asyncio.timeout(claim.webhook.timeout):
                outcome, why = await mqtt.publish(claim.body)
        except TimeoutError:
            return Verdict("retry", None, f"not published within {claim.webhook.timeout:g}s")
        except (ValueError, KeyError, TypeError) as exc:  # a body that names no rule and device: never publishable
            return Verdict("failed", None, f"the body names no rule and device: {describe(exc)}")
        except Exception as exc:  # a bug here must not stop the other deliveries
            log.exception("delivery msg_%d over MQTT: unexpected error", claim.id)
            return Verdict("retry", None, describe(exc))
        # "failed": a refusal a retry cannot change (the broker's ACL, an invalid topic, too large), as a 4xx.
        return Verdict(outcome, None, why)

    async def _settle(self, claim: _Claim, verdict: Verdict, *, chain: bool = False) -> _Claim | None:
        """Record the result; after a delivery (``chain``), the series' next row if that claimed it."""
        hook, now = claim.webhook, self._clock()
        error = None if verdict.error is None else verdict.error[:ERROR_LIMIT]
        sql: str
        args: tuple[Any, ...]
        if verdict.outcome == "delivered":
            sql, args = _DELIVERED, (claim.id, _at(now), verdict.status)
            if self._failing.pop(hook.name, False):
                log.info("webhook %s takes deliveries again", hook.name)
        elif verdict.outcome == "failed":
            sql, args = _FAILED, (claim.id, verdict.status, error, claim.lease_until)
            log.warning("alert delivery msg_%d to webhook %s failed: %s", claim.id, hook.name, error)
        else:
            if verdict.outcome == "gone":
                if hook.name not in self.disabled and self._webhooks.get(hook.name) is hook:
                    self.disabled.add(hook.name)
                    log.error("webhook %s answered 410 Gone: it is disabled until the config is reloaded or the "
                              "service restarts; its pending deliveries are kept", hook.name)
                at = now  # due at once: the webhook's claims stop, not the row's schedule
            else:
                delay = verdict.retry_after
                if delay is None:
                    delay = backoff(claim.attempts, self.retry_max, self._jitter())
                # Past max_age the next claim fails the row: schedule that, not a later try.
                at = min(now + delay, claim.created_at + hook.max_age)
                self._soonest = min(self._soonest, at)
                if hook.name not in self._failing:
                    # A receiver that fails now and then must not write two lines per failure.
                    loud = time.monotonic() - self._warned.get(hook.name, -math.inf) >= FAILING_LOG_EVERY
                    self._failing[hook.name] = loud
                    if loud:
                        self._warned[hook.name] = time.monotonic()
                        log.warning("webhook %s: %s; retrying with backoff (up to %gs between attempts)", hook.name,
                                    error, self.retry_max)
            sql, args = _RETRY, (claim.id, _at(at), verdict.status, error, claim.lease_until)
        if self._metrics is not None:
            self._metrics.webhook_deliveries.labels(hook.name, verdict.outcome).inc()
            if verdict.outcome == "delivered":
                self._metrics.webhook_delivery_seconds.observe(max(0.0, now - claim.created_at))
        if chain and verdict.outcome == "delivered" and not self._closing and self._active().get(hook.name) is hook:
            # The series' next row comes with the result, under the same webhook (not removed or
            # disabled by a reload meanwhile).
            return await self._record_and_next(claim, args, hook)
        await self._record(claim, sql, args)
        return None

    async def _record_and_next(self, claim: _Claim, args: tuple[Any, ...], hook: Webhook) -> _Claim | None:
        now = self._clock()
        row = await self._record(claim, _DELIVERED_NEXT, (*args, _at(now), self._lease_of(hook)), fetch=True)
        if row is None or row["id"] is None:
            return None
        return _Claim(row["id"], hook, row["body"].encode(), row["attempts"], row["created_at"].timestamp(),
                      row["lease_until"], row["last_error"])

    async def _record(self, claim: _Claim, sql: str, args: tuple[Any, ...], *,
                      fetch: bool = False) -> asyncpg.Record | None:
        """Write a result, retrying a database that is away while the lease lasts: after it, another
        dispatcher may deliver the row again anyway."""
        deadline = time.monotonic() + max(0.0, claim.lease_until.timestamp() - self._clock())
        delay = 0.1
        while True:
            row: asyncpg.Record | None = None
            try:
                if fetch:
                    row = await self._pool.fetchrow(sql, *args)
                    status = f"UPDATE {row['recorded'] if row is not None else 0}"
                else:
                    status = await self._pool.execute(sql, *args)
            except Exception as exc:
                if is_retryable(exc) and time.monotonic() + delay < deadline:
                    self._database_trouble(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                log.warning("alert delivery msg_%d to webhook %s: the result could not be recorded (%s); the row "
                            "is attempted again when its lease ends", claim.id, claim.webhook.name, describe(exc))
                return None
            if status.endswith(" 0"):
                log.info("alert delivery msg_%d to webhook %s: the result was not recorded: the lease had passed to "
                         "another dispatcher", claim.id, claim.webhook.name)
            return row

    # -- the task ----------------------------------------------------------------------------------

    def _database_trouble(self, exc: BaseException) -> None:
        why = describe(exc)
        if self._db_trouble is None:
            log.warning("alert outbox: database unavailable (%s); retrying with backoff", why)
        self._db_trouble = why

    def _database_ok(self) -> None:
        if self._db_trouble is not None:
            log.info("alert outbox: the dispatcher reaches the database again")
            self._db_trouble = None

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def _listen(self) -> Any:
        if self._pool.get_max_size() < 2:
            return None  # one connection: it is the claims'; polling alone
        conn = await self._pool.acquire(timeout=5.0)
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except BaseException:
            await self._unlisten(conn)
            raise
        return conn

    async def _unlisten(self, conn: Any) -> None:
        """Give the listening connection back; never raises (but CancelledError)."""
        if conn is None or _gone(conn):
            return  # the pool took it back when it closed
        try:
            await asyncio.wait_for(conn.remove_listener(CHANNEL, self._notified), 2.0)
        except Exception:
            with contextlib.suppress(Exception):
                conn.terminate()  # the pool replaces it
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pool.release(conn), 2.0)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set: LISTEN for the writer's NOTIFY, claim at least every ``poll``
        seconds, keep up to ``batch`` deliveries in flight. A database outage is retried with
        backoff (logged when it starts and when it ends); nothing here ends the task but ``stop``
        or a cancellation. After ``stop``, requests in flight get SHUTDOWN_GRACE to finish; a row
        cut short is delivered again after its lease."""
        inflight: set[asyncio.Task[None]] = set()
        listener: Any = None
        delay = 0.5
        self._closing = False
        waker = asyncio.create_task(self._wake_on(stop))
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    if listener is None or _gone(listener):
                        await self._unlisten(listener)
                        listener = None
                        listener = await self._listen()
                    room = self.batch - len(inflight)
                    claims = await self._claim(room) if room > 0 else []
                except Exception as exc:
                    if is_retryable(exc):
                        self._database_trouble(exc)
                    elif self._db_trouble != describe(exc):  # a bug or a schema problem: loudly, once
                        log.error("alert outbox: claim failed (%s); retrying with backoff", describe(exc),
                                  exc_info=exc)
                        self._db_trouble = describe(exc)
                    await self._unlisten(listener)
                    listener = None
                    await self._pause(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                delay = 0.5
                self._database_ok()
                for claim in claims:
                    task = asyncio.create_task(self._deliver(claim), name=f"deliver msg_{claim.id}")
                    inflight.add(task)
                    task.add_done_callback(self._done(inflight))
                if claims and len(claims) == room:
                    await asyncio.sleep(0)  # more may be due: claim again at once
                    continue
                wait = self.poll
                if self._soonest < math.inf:
                    wait = min(wait, max(0.0, self._soonest - self._clock()) + 0.005)
                await self._pause(wait)
                if self._soonest <= self._clock():
                    self._soonest = math.inf
        except asyncio.CancelledError:
            for task in inflight:
                task.cancel()  # cancelled, not stopped: no grace
            raise
        finally:
            self._closing = True
            waker.cancel()
            if inflight:
                _, late = await asyncio.wait(inflight, timeout=SHUTDOWN_GRACE)
                for task in late:
                    task.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)
            await self._unlisten(listener)

    def _done(self, inflight: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            inflight.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("alert delivery task failed", exc_info=task.exception())
            self._wake.set()  # room for more claims
        return done

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def aclose(self) -> None:
        """Close the HTTP client if this dispatcher made it, and the MQTT publisher's connection."""
        if self._mqtt is not None:
            await self._mqtt.aclose()
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> Dispatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
