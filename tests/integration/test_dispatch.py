"""The webhook dispatcher (ingest.alerts.dispatch) on the real database and a real local HTTP receiver.

Rows are put in alert_events and alert_outbox with SQL, as the writer's alert stage commits them.
Tests that drive run_once() use an injected clock (leases, retries and max_age without waiting);
the tests of run() use the real clock with small retry bounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio

from ingest.alerts.body import Annotations, StandardBody
from ingest.alerts.dispatch import CHAIN_MAX, CHANNEL, LEASE_MARGIN, Dispatcher, backoff, judge, retry_after
from ingest.alerts.model import Webhook
from ingest.alerts.sign import SignatureError, verify
from ingest.metrics import Metrics
from tests.proxy import FaultProxy
from tests.services import free_port, until

KEY = bytes(range(24))
T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


# --- a real HTTP receiver ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False  # hold the request without an answer until release() (then drop the connection)
    delay: float = 0.0
    gate: threading.Event | None = None  # answer only once this is set


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int | None  # the status sent, None for a request held without an answer

    @property
    def msg_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """http.server on 127.0.0.1 in a thread. It records each request (path, headers, body) before it
    answers, and answers from ``script[path]`` in order, then ``default``."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[Request] = []
        self.script: dict[str, list[Answer]] = {}
        self.default = Answer(200)
        # (path, webhook-id, number of the request from 1) -> an answer that overrides the script, or None
        self.decide: Callable[[str, str, int], Answer | None] | None = None
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answers(self, path: str, *answers: Answer | int) -> None:
        with self._lock:
            self.script.setdefault(path, []).extend(a if isinstance(a, Answer) else Answer(a) for a in answers)

    def _next(self, path: str, msg_id: str) -> Answer:
        with self._lock:
            if self.decide is not None:
                chosen = self.decide(path, msg_id, len(self.requests) + 1)
                if chosen is not None:
                    return chosen
            queue = self.script.get(path)
            return queue.pop(0) if queue else self.default

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def got(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def release(self) -> None:
        self._released.set()

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                answer = receiver._next(self.path, self.headers.get("webhook-id", ""))
                heads = {k.lower(): v for k, v in self.headers.items()}
                receiver._record(Request(self.path, heads, body, None if answer.hang else answer.status))
                if answer.hang:
                    receiver._released.wait(30)
                    self.close_connection = True
                    return
                if answer.delay:
                    time.sleep(answer.delay)
                if answer.gate is not None:
                    answer.gate.wait(30)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5)
            self._server = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


# --- the database side -------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4, server_settings={"TimeZone": "UTC"})
    yield p
    await p.close()


class Clock:
    """Unix seconds that move only when told; starts a second past the real clock, so that rows just
    inserted (next_attempt_at = the database's now()) are due."""

    def __init__(self) -> None:
        self.now = time.time() + 1.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def hook(name: str, receiver: Receiver, *, timeout: float = 2.0, max_age: float = 3600.0) -> Webhook:
    return Webhook(name, receiver.url(f"/{name}"), KEY, timeout=timeout, max_age=max_age)


async def add(pool: asyncpg.Pool, webhook: str = "ops", series: str = "pm25-high\x1f1\x1f1",
              status: str = "firing", *, age: float = 0.0, notify: bool = False) -> int:
    """An alert event and its outbox row for ``webhook``; ``age``: seconds since created_at."""
    rule, device, metric = series.split("\x1f")
    async with pool.acquire() as conn, conn.transaction():
        event = await conn.fetchval(
            "INSERT INTO alert_events (rule, device_id, metric_id, status, event_time, starts_at, value, threshold, "
            "severity, notified) VALUES ($1, $2, $3, $4, $5, $5, 61.5, 55.5, 'warning', true) RETURNING id",
            rule, int(device), int(metric), status, T0)
        body = StandardBody(
            id=f"evt_{event}", status=status, rule=rule, severity="warning", device=f"hn-aq-{device}",
            metric="pm2_5", value=61.5, unit="ug/m3", threshold=55.5, starts_at=T0,
            ends_at=T0 + timedelta(minutes=5) if status == "resolved" else None, event_time=T0,
            labels={"team": "environment"}, annotations=Annotations(summary=f"PM2.5 at hn-aq-{device} is 61.5"),
            device_attributes={"district": "hoan-kiem"},
        ).model_dump_json()
        outbox: int = await conn.fetchval(
            "INSERT INTO alert_outbox (event_id, webhook, series, body, created_at) "
            "VALUES ($1, $2, $3, $4::jsonb, now() - make_interval(secs => $5)) RETURNING id",
            event, webhook, series, body, age)
        if notify:
            await conn.execute(f"NOTIFY {CHANNEL}")
    return outbox


async def row(pool: asyncpg.Pool, outbox_id: int) -> asyncpg.Record:
    r = await pool.fetchrow("SELECT *, body::text AS body_text FROM alert_outbox WHERE id = $1", outbox_id)
    assert r is not None
    return r


def checked(request: Request, at: float) -> str:
    """The request verifies (Standard Webhooks, v1) at ``at``; its webhook-id."""
    return verify(KEY, request.headers, request.body, now=at)


def ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def near(a: datetime, b: datetime) -> bool:
    """Equal but for the microsecond rounding of float seconds."""
    return abs(a - b) <= timedelta(microseconds=2)


# --- the pure decisions -----------------------------------------------------------------------------------


def test_backoff_full_jitter_doubles_to_the_cap() -> None:
    assert [backoff(n, 300.0, 0.999999) for n in (1, 2, 3, 4)] == pytest.approx([1.0, 2.0, 4.0, 8.0], rel=1e-5)
    assert backoff(9, 300.0, 0.999999) == pytest.approx(256.0, rel=1e-5)
    assert backoff(10, 300.0, 0.999999) == pytest.approx(300.0, rel=1e-5)
    assert backoff(10_000, 300.0, 0.5) == 150.0
    assert backoff(3, 300.0, 0.0) == 0.0


def test_retry_after_seconds_and_dates() -> None:
    now = T0.timestamp()
    assert retry_after("7", now) == 7.0
    assert retry_after(" 120 ", now) == 120.0
    assert retry_after(format_datetime(T0 + timedelta(seconds=90), usegmt=True), now) == 90.0
    assert retry_after(format_datetime(T0 - timedelta(seconds=90), usegmt=True), now) == 0.0
    assert retry_after(None, now) is None
    assert retry_after("soon", now) is None
    assert retry_after("-5", now) is None


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "delivered"), (204, "delivered"), (299, "delivered"), (301, "failed"), (400, "failed"),
     (401, "failed"), (404, "failed"), (408, "retry"), (410, "gone"), (422, "failed"), (429, "retry"),
     (500, "retry"), (502, "retry"), (503, "retry"), (504, "retry")],
)
def test_what_an_answer_means(status: int, outcome: str) -> None:
    assert judge(status, None, b"", 0.0).outcome == outcome


# --- delivery -----------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_500_then_200_arrives_once_with_a_valid_signature(pool: asyncpg.Pool, receiver: Receiver) -> None:
    receiver.answers("/ops", Answer(500, body=b"database\nis down"), 200)
    outbox = await add(pool)
    clock, metrics = Clock(), Metrics()
    async with Dispatcher(pool, {"ops": hook("ops", receiver)}, metrics, clock=clock) as d:
        first_try = clock.now
        assert await d.run_once() == 1
        r = await row(pool, outbox)
        assert (r["status"], r["attempts"], r["last_status"]) == ("pending", 1, 500)
        assert r["last_error"] == "HTTP 500: database is down"
        assert r["lease_until"] is None
        # The first retry comes within a second.
        assert ts(first_try) <= r["next_attempt_at"] <= ts(first_try + 1.0)
        assert await d.run_once() == 0  # not due yet
        clock.advance(1.0)
        second_try = clock.now
        assert await d.run_once() == 1
    r = await row(pool, outbox)
    assert (r["status"], r["attempts"], r["last_status"], r["last_error"]) == ("delivered", 2, 200, None)
    assert r["delivered_at"] == ts(second_try)
    got = receiver.got()
    assert [q.answered for q in got] == [500, 200]
    assert [checked(q, second_try) for q in got] == [f"msg_{outbox}", f"msg_{outbox}"]  # the same id each time
    assert [q.headers["webhook-timestamp"] for q in got] == [str(int(first_try)), str(int(second_try))]
    assert got[1].headers["content-type"] == "application/json"
    assert got[1].body == r["body_text"].encode()  # the stored body, byte for byte, is what was signed
    sent = StandardBody.model_validate_json(got[1].body)
    assert (sent.status, sent.device, sent.labels) == ("firing", "hn-aq-1", {"team": "environment"})
    # A signature over other bytes (the body re-serialised) does not verify.
    with pytest.raises(SignatureError):
        verify(KEY, got[1].headers, json.dumps(json.loads(got[1].body)).encode() + b" ", now=second_try)
    assert metrics.webhook_deliveries.labels("ops", "retry")._value.get() == 1
    assert metrics.webhook_deliveries.labels("ops", "delivered")._value.get() == 1
    assert metrics.registry.get_sample_value("sensor_ingest_webhook_delivery_seconds_count") == 1


@pytest.mark.asyncio
async def test_a_receiver_down_for_a_minute_loses_nothing(pool: asyncpg.Pool) -> None:
    down = Receiver()  # nothing listens on its port yet: connection refused
    series = [f"pm25-high\x1f{d}\x1f1" for d in (1, 2, 3)]
    ids = [await add(pool, "ops", s, st) for s in series for st in ("firing", "resolved")]
    clock = Clock()
    async with Dispatcher(pool, {"ops": hook("ops", down)}, clock=clock, retry_max=8.0) as d:
        start = clock.now
        while clock.now - start < 60.0:
            await d.run_once()
            clock.advance(4.0)
        rows = [await row(pool, i) for i in ids]
        assert [r["status"] for r in rows] == ["pending"] * 6
        firing, resolved = rows[0::2], rows[1::2]
        assert all(r["attempts"] >= 5 and r["last_status"] is None for r in firing)
        assert all("ConnectError" in r["last_error"] for r in firing)
        assert all(r["attempts"] == 0 for r in resolved)  # never claimed ahead of their firing event
        # backoff capped at retry_max
        assert all(r["next_attempt_at"] <= ts(clock.now + 8.0) for r in firing)
        down.start()
        try:
            clock.advance(8.0)
            for _ in range(4):
                await d.run_once()
                clock.advance(8.0)
            rows = [await row(pool, i) for i in ids]
            assert [r["status"] for r in rows] == ["delivered"] * 6
            got = down.got()
            assert sorted(q.msg_id for q in got) == sorted(f"msg_{i}" for i in ids)  # each once
            assert all(checked(q, int(q.headers["webhook-timestamp"])) == q.msg_id for q in got)
            order = [q.msg_id for q in got]
            for firing_id, resolved_id in zip(ids[0::2], ids[1::2], strict=True):
                assert order.index(f"msg_{firing_id}") < order.index(f"msg_{resolved_id}")
        finally:
            down.stop()


@pytest.mark.asyncio
async def test_retry_after_is_honoured(pool: asyncpg.Pool, receiver: Receiver) -> None:
    clock = Clock()
    later = format_datetime(ts(int(clock.now) + 120), usegmt=True)
    receiver.answers("/ops", Answer(503, {"Retry-After": "7"}), Answer(429, {"Retry-After": later}),
                     Answer(503, {"Retry-After": "999999"}))
    outbox = await add(pool)
    async with Dispatcher(pool, {"ops": hook("ops", receiver, max_age=3600.0)}, clock=clock) as d:
        tried = clock.now
        await d.run_once()
        assert (await row(pool, outbox))["next_attempt_at"] == ts(tried + 7.0)
        clock.advance(6.9)
        assert await d.run_once() == 0
        clock.advance(0.1)
        assert await d.run_once() == 1
        assert near((await row(pool, outbox))["next_attempt_at"], ts(int(tried) + 120))  # the HTTP date
        clock.now = int(tried) + 120
        assert await d.run_once() == 1
        # A Retry-After beyond max_age: the row is due when it expires, not later.
        r = await row(pool, outbox)
        assert near(r["next_attempt_at"], r["created_at"] + timedelta(seconds=3600))
    assert [q.answered for q in receiver.got()] == [503, 429, 503]


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [408, 429, 503])
async def test_408_429_and_5xx_are_retried(pool: asyncpg.Pool, receiver: Receiver, status: int) -> None:
    receiver.answers("/ops", status, status, 200)
    outbox = await add(pool)
    clock = Clock()
    async with Dispatcher(pool, {"ops": hook("ops", receiver)}, clock=clock, jitter=lambda: 0.99) as d:
        await d.run_once()
        assert (await row(pool, outbox))["status"] == "pending"
        clock.advance(0.99)
        await d.run_once()
        r = await row(pool, outbox)
        assert (r["status"], r["last_status"], r["attempts"]) == ("pending", status, 2)
        assert r["next_attempt_at"] == ts(clock.now + 2 * 0.99)  # the second retry's range has doubled
        clock.advance(2.0)
        await d.run_once()
    assert (await row(pool, outbox))["status"] == "delivered"
    assert [q.answered for q in receiver.got()] == [status, status, 200]


@pytest.mark.asyncio
async def test_400_fails_at_once_and_the_series_goes_on(pool: asyncpg.Pool, receiver: Receiver,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    receiver.answers("/ops", Answer(400, body=b"unknown rule"))
    firing = await add(pool, status="firing")
    resolved = await add(pool, status="resolved")
    clock, metrics = Clock(), Metrics()
    with caplog.at_level(logging.WARNING, "ingest.alerts.dispatch"):
        async with Dispatcher(pool, {"ops": hook("ops", receiver)}, metrics, clock=clock) as d:
            assert await d.run_once() == 1
            r = await row(pool, firing)
            assert (r["status"], r["attempts"], r["last_status"]) == ("failed", 1, 400)
            assert r["last_error"] == "HTTP 400: unknown rule"
            assert (await row(pool, resolved))["status"] == "pending"
            assert await d.run_once() == 1  # the next event of the series, not the failed one again
    assert (await row(pool, resolved))["status"] == "delivered"
    assert [q.msg_id for q in receiver.got()] == [f"msg_{firing}", f"msg_{resolved}"]
    assert metrics.webhook_deliveries.labels("ops", "failed")._value.get() == 1
    assert any(f"msg_{firing}" in m and "failed" in m for m in caplog.messages)


@pytest.mark.asyncio
async def test_410_disables_the_webhook_and_keeps_its_rows(pool: asyncpg.Pool, receiver: Receiver,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    receiver.answers("/ops", 410, 410)
    ops = [await add(pool, "ops", f"pm25-high\x1f{d}\x1f1") for d in (1, 2)]
    other = await add(pool, "other")
    clock, metrics = Clock(), Metrics()
    hooks = {"ops": hook("ops", receiver), "other": hook("other", receiver)}
    with caplog.at_level(logging.WARNING, "ingest.alerts.dispatch"):
        async with Dispatcher(pool, hooks, metrics, clock=clock) as d:
            assert await d.run_once() == 3
            assert d.disabled == {"ops"}
            rows = [await row(pool, i) for i in ops]
            assert [(r["status"], r["last_status"], r["lease_until"]) for r in rows] == [("pending", 410, None)] * 2
            assert all("410 Gone" in r["last_error"] for r in rows)
            assert (await row(pool, other))["status"] == "delivered"
            gone = [m for m in caplog.records if "410 Gone" in m.getMessage()]
            assert len(gone) == 1
            assert gone[0].levelno == logging.ERROR
            clock.advance(60.0)
            assert await d.run_once() == 0
            assert len(receiver.got("/ops")) == 2  # no request to a disabled webhook
            d.set_webhooks(hooks)  # a reload enables it again
            assert await d.run_once() == 2
    assert [(await row(pool, i))["status"] for i in ops] == ["delivered", "delivered"]
    assert metrics.webhook_deliveries.labels("ops", "gone")._value.get() == 2


@pytest.mark.asyncio
async def test_max_age_fails_the_delivery(pool: asyncpg.Pool, receiver: Receiver) -> None:
    receiver.default = Answer(500)
    stale = await add(pool, "ops", "pm25-high\x1f1\x1f1", age=120.0)
    young = await add(pool, "ops", "pm25-high\x1f2\x1f1", age=0.0)
    clock = Clock()
    async with Dispatcher(pool, {"ops": hook("ops", receiver, max_age=60.0)}, clock=clock, retry_max=30.0) as d:
        assert await d.run_once() == 2
        r = await row(pool, stale)
        assert (r["status"], r["last_status"]) == ("failed", None)
        assert r["last_error"] == "max_age: not delivered within 60s"
        assert [q.msg_id for q in receiver.got()] == [f"msg_{young}"]  # no request for the stale one
        for _ in range(12):
            clock.advance(10.0)
            await d.run_once()
        r = await row(pool, young)
        assert r["status"] == "failed"
        assert r["last_error"].startswith("max_age: not delivered within 60s (last: HTTP 500")
        assert r["next_attempt_at"] <= r["created_at"] + timedelta(seconds=60)
        assert await d.run_once() == 0


@pytest.mark.asyncio
async def test_resolved_never_overtakes_its_firing_event(pool: asyncpg.Pool, receiver: Receiver) -> None:
    receiver.answers("/ops", 500, 503, 200, 200, 200)
    firing = await add(pool, "ops", "pm25-high\x1f1\x1f1", "firing")
    resolved = await add(pool, "ops", "pm25-high\x1f1\x1f1", "resolved")
    clock = Clock()
    async with Dispatcher(pool, {"ops": hook("ops", receiver)}, clock=clock, retry_max=1.0) as d:
        for _ in range(6):
            await d.run_once()
            clock.advance(1.0)
        elsewhere = await add(pool, "ops", "pm25-high\x1f2\x1f1", "firing")
        await d.run_once()
    assert [(await row(pool, i))["status"] for i in (firing, resolved, elsewhere)] == ["delivered"] * 3
    order = [(q.msg_id, q.answered) for q in receiver.got()]
    assert order == [(f"msg_{firing}", 500), (f"msg_{firing}", 503), (f"msg_{firing}", 200),
                     (f"msg_{resolved}", 200), (f"msg_{elsewhere}", 200)]


@pytest.mark.asyncio
async def test_a_delivery_brings_its_series_next_row_and_a_retry_stops_that(pool: asyncpg.Pool,
                                                                          receiver: Receiver) -> None:
    # Three series of four rows each. Recording a delivery claims the series' next row in the same
    # statement, so the claim rounds take only the heads, and the row a retry holds back (b's second,
    # answered 500 once) is taken again by a round once due, the rest of b coming with it.
    rows = {s: [await add(pool, "ops", f"pm25-high\x1f{d}\x1f1", st) for st in ("firing", "resolved") * 2]
            for s, d in (("a", 1), ("b", 2), ("c", 3))}
    held = f"msg_{rows['b'][1]}"
    answered: set[str] = set()

    def decide(_path: str, msg_id: str, _n: int) -> Answer | None:
        if msg_id == held and msg_id not in answered:
            answered.add(msg_id)
            return Answer(500)
        return None

    receiver.decide = decide
    d = Dispatcher(pool, {"ops": hook("ops", receiver)}, jitter=lambda: 0.0, poll=0.05)
    claimed = claims_of(d)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        await until(lambda: len([q for q in receiver.got() if q.answered == 200]) == 12, "every row delivered")
    finally:
        stop.set()
        await task
        await d.aclose()
    assert sorted(claimed) == sorted([rows["a"][0], rows["b"][0], rows["c"][0], rows["b"][1]])
    got = [q.msg_id for q in receiver.got()]
    for ids in rows.values():  # each series in its order, each row once but the one retried
        assert [m for m in got if m in {f"msg_{i}" for i in ids}] == [
            f"msg_{i}" for i in ids for _ in range(2 if f"msg_{i}" == held else 1)]
    statuses = [(await row(pool, i))["status"] for ids in rows.values() for i in ids]
    assert statuses == ["delivered"] * 12


def claims_of(d: Dispatcher) -> list[int]:
    """The ids d's claim rounds return from now on (the rows a delivery claims with its result are not among them)."""
    claimed: list[int] = []
    claim = d._claim

    async def spy(limit: int) -> list[Any]:
        got = await claim(limit)
        claimed.extend(c.id for c in got)
        return got

    d._claim = spy  # type: ignore[method-assign]
    return claimed


@pytest.mark.asyncio
async def test_a_delivery_task_takes_at_most_chain_max_rows_of_its_series(pool: asyncpg.Pool,
                                                                         receiver: Receiver) -> None:
    ids = [await add(pool, "ops", "pm25-high\x1f1\x1f1", ("firing", "resolved")[k % 2]) for k in range(CHAIN_MAX + 2)]
    d = Dispatcher(pool, {"ops": hook("ops", receiver)}, poll=0.05)
    claimed = claims_of(d)
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        await until(lambda: len(receiver.got()) == len(ids), "every row delivered")
    finally:
        stop.set()
        await task
        await d.aclose()
    assert claimed == [ids[0], ids[CHAIN_MAX]]  # the head, then the row after the first task's CHAIN_MAX
    assert [q.msg_id for q in receiver.got()] == [f"msg_{i}" for i in ids]


@pytest.mark.asyncio
async def test_a_series_in_retry_does_not_hold_others(pool: asyncpg.Pool, receiver: Receiver) -> None:
    stuck = await add(pool, "ops", "pm25-high\x1f1\x1f1")
    free = await add(pool, "ops", "pm25-high\x1f2\x1f1")
    receiver.decide = lambda _path, msg_id, _n: Answer(500) if msg_id == f"msg_{stuck}" else None
    async with Dispatcher(pool, {"ops": hook("ops", receiver)}, clock=Clock(), jitter=lambda: 0.5) as d:
        assert await d.run_once() == 2
    assert [(await row(pool, i))["status"] for i in (stuck, free)] == ["pending", "delivered"]


@pytest.mark.asyncio
async def test_a_claim_takes_the_head_of_every_queue_and_nothing_behind_it(pool: asyncpg.Pool,
                                                                             receiver: Receiver) -> None:
    # Three rows deep in each of 3 series of 2 webhooks, and a webhook that is not configured between
    # them in the index's order: the claim takes the oldest row of each configured series that is due
    # and not leased, and no row behind a head, whatever state the head is in.
    rows: dict[tuple[str, int], list[int]] = {}
    for name in ("a-ops", "b-retired", "c-city"):
        for device in (1, 2, 3):
            rows[name, device] = [await add(pool, name, f"pm25-high\x1f{device}\x1f1", st)
                                  for st in ("firing", "resolved", "firing")]
    await pool.execute("UPDATE alert_outbox SET next_attempt_at = now() + interval '1 hour' WHERE id = $1",
                       rows["a-ops", 2][0])  # waiting for a retry
    await pool.execute("UPDATE alert_outbox SET lease_until = now() + interval '1 hour' WHERE id = $1",
                       rows["c-city", 3][0])  # another dispatcher's
    await pool.execute("UPDATE alert_outbox SET status = 'delivered' WHERE id = $1", rows["c-city", 1][0])
    hooks = {n: hook(n, receiver) for n in ("a-ops", "c-city")}
    async with Dispatcher(pool, hooks, clock=Clock(), batch=50) as d:
        assert await d.run_once() == 4
        first = {q.msg_id for q in receiver.got()}
        assert first == {f"msg_{rows['a-ops', 1][0]}", f"msg_{rows['a-ops', 3][0]}",
                         f"msg_{rows['c-city', 1][1]}", f"msg_{rows['c-city', 2][0]}"}
        assert await d.run_once() == 4  # each delivered head lets the row behind it through, one a round
        assert await d.run_once() == 3
        assert await d.run_once() == 0
    assert sorted(r["id"] for r in await pool.fetch("SELECT id FROM alert_outbox WHERE status = 'pending'")) == sorted(
        rows["a-ops", 2] + rows["c-city", 3] + [i for d in (1, 2, 3) for i in rows["b-retired", d]])
    got = [q.msg_id for q in receiver.got()]
    for (name, _device), ids in rows.items():
        sent = [i for i in ids if f"msg_{i}" in got]
        assert [got.index(f"msg_{i}") for i in sent] == sorted(got.index(f"msg_{i}") for i in sent), name


@pytest.mark.asyncio
async def test_a_claim_looks_at_each_series_not_at_each_pending_row(pool: asyncpg.Pool) -> None:
    # 2,000 pending rows in 4 series (a receiver that was down). "NOT EXISTS an older pending row" was
    # planned as a hash anti-join that compared every row of a series with every other one: about
    # 500,000 row comparisons here, seconds a claim at a city's backlog (BENCHMARKS.md). The claim's
    # plan, executed and rolled back, must touch a few rows per series instead.
    await pool.execute(
        "INSERT INTO alert_events (rule, device_id, metric_id, status, event_time, starts_at, value, threshold, "
        "severity, notified) SELECT 'pm25-high', g % 4, 1, 'firing', now(), now(), 1, 1, 'warning', true "
        "FROM generate_series(1, 2000) g")
    await pool.execute(
        "INSERT INTO alert_outbox (event_id, webhook, series, body) SELECT id, 'ops', "
        "rule || chr(31) || device_id || chr(31) || metric_id, '{}' FROM alert_events")
    await pool.execute("ANALYZE alert_outbox")  # as autovacuum does to a table that grew
    from ingest.alerts.dispatch import _CLAIM

    def touched(node: dict[str, Any]) -> int:
        own = node.get("Actual Rows", 0) * node.get("Actual Loops", 1)
        own += sum(node.get(k, 0) for k in ("Rows Removed by Filter", "Rows Removed by Join Filter",
                                            "Rows Removed by Index Recheck"))
        return own + sum(touched(child) for child in node.get("Plans", []))

    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            plan = json.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + _CLAIM, ["ops"], [40.0],
                                                  datetime.now(UTC) + timedelta(seconds=1), 64))
            claimed = await conn.fetchval("SELECT count(*) FROM alert_outbox WHERE lease_until IS NOT NULL")
        finally:
            await tx.rollback()
    assert claimed == 4
    work = touched(plan[0]["Plan"])
    assert work < 200, f"the claim touched {work} rows for 4 series"


@pytest.mark.asyncio
async def test_two_dispatchers_deliver_each_row_exactly_once(database_url: str, pool: asyncpg.Pool,
                                                             receiver: Receiver) -> None:
    # Every fifth request is answered 503: retries interleave with the other dispatcher's claims.
    receiver.decide = lambda _path, _id, n: Answer(503 if n % 5 == 0 else 200, delay=0.005)
    ids = [await add(pool, "ops", f"pm25-high\x1f{d}\x1f1", st) for d in range(25) for st in ("firing", "resolved")]
    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=3) for _ in range(2)]
    metrics = [Metrics(), Metrics()]
    dispatchers = [Dispatcher(p, {"ops": hook("ops", receiver)}, m, retry_max=0.05, batch=4, poll=0.05)
                   for p, m in zip(pools, metrics, strict=True)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run(stop)) for d in dispatchers]
    try:
        async def delivered() -> int:
            return int(await pool.fetchval("SELECT count(*) FROM alert_outbox WHERE status = 'delivered'"))

        end = time.monotonic() + 30
        while await delivered() < len(ids):
            assert time.monotonic() < end, "not all rows were delivered"
            assert not any(t.done() for t in tasks)
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for d in dispatchers:
            await d.aclose()
        for p in pools:
            await p.close()
    ok = [q.msg_id for q in receiver.got() if q.answered == 200]
    assert sorted(ok) == sorted(f"msg_{i}" for i in ids)  # each once: no row delivered twice
    order = [q.msg_id for q in receiver.got()]
    for firing_id, resolved_id in zip(ids[0::2], ids[1::2], strict=True):
        first_resolved = order.index(f"msg_{resolved_id}")
        assert f"msg_{firing_id}" in [q.msg_id for q in receiver.got()[:first_resolved] if q.answered == 200]
    shares = [m.webhook_deliveries.labels("ops", "delivered")._value.get() for m in metrics]
    assert sum(shares) == len(ids)
    assert all(s > 0 for s in shares), f"one dispatcher did everything: {shares}"


@pytest.mark.asyncio
async def test_a_dispatcher_killed_mid_call_is_taken_over_after_its_lease(pool: asyncpg.Pool,
                                                                          receiver: Receiver) -> None:
    receiver.answers("/ops", Answer(hang=True), 200)
    outbox = await add(pool)
    clock = Clock()
    hooks = {"ops": hook("ops", receiver, timeout=1.0)}
    async with Dispatcher(pool, hooks, clock=clock, lease=5.0) as first, \
            Dispatcher(pool, hooks, clock=clock, lease=5.0) as second:
        call = asyncio.create_task(first.run_once())
        await until(lambda: len(receiver.got()) == 1, "the first request")
        call.cancel()  # the process dies mid-call: nothing is recorded
        with pytest.raises(asyncio.CancelledError):
            await call
        r = await row(pool, outbox)
        assert (r["status"], r["attempts"]) == ("pending", 1)
        lease = 1.0 + LEASE_MARGIN  # the webhook's timeout + the margin, longer than lease=5
        assert near(r["lease_until"], ts(clock.now + lease))
        clock.advance(lease - 0.5)
        assert await second.run_once() == 0  # the lease still holds
        clock.advance(0.6)
        assert await second.run_once() == 1
    receiver.release()
    r = await row(pool, outbox)
    assert (r["status"], r["attempts"]) == ("delivered", 2)
    got = receiver.got()
    assert [q.answered for q in got] == [None, 200]
    assert [checked(q, clock.now) for q in got] == [f"msg_{outbox}"] * 2  # at least once, under one id


@pytest.mark.asyncio
async def test_a_result_after_the_lease_passed_is_not_recorded(pool: asyncpg.Pool, receiver: Receiver,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    late, current = threading.Event(), threading.Event()
    receiver.answers("/ops", Answer(500, gate=late), Answer(200, gate=current))
    outbox = await add(pool)
    clock = Clock()
    hooks = {"ops": hook("ops", receiver, timeout=10.0)}
    async with Dispatcher(pool, hooks, clock=clock, lease=5.0) as slow, \
            Dispatcher(pool, hooks, clock=clock, lease=5.0) as other:
        first = asyncio.create_task(slow.run_once())
        await until(lambda: len(receiver.got()) == 1, "the first request")
        clock.advance(10.0 + LEASE_MARGIN + 0.1)  # the first lease has passed
        second = asyncio.create_task(other.run_once())
        await until(lambda: len(receiver.got()) == 2, "the second request")
        leased = (await row(pool, outbox))["lease_until"]
        assert near(leased, ts(clock.now + 10.0 + LEASE_MARGIN))
        with caplog.at_level(logging.INFO, "ingest.alerts.dispatch"):
            late.set()  # the first dispatcher's 500 comes back after its lease
            await first
        r = await row(pool, outbox)
        assert (r["status"], r["lease_until"], r["last_status"], r["attempts"]) == ("pending", leased, None, 2)
        assert any("lease had passed" in m for m in caplog.messages)
        current.set()
        await second
    assert (await row(pool, outbox))["status"] == "delivered"


@pytest.mark.asyncio
async def test_webhooks_not_configured_are_kept_and_logged_once(pool: asyncpg.Pool, receiver: Receiver,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    orphan = await add(pool, "retired")
    clock = Clock()
    with caplog.at_level(logging.WARNING, "ingest.alerts.dispatch"):
        async with Dispatcher(pool, {"ops": hook("ops", receiver)}, clock=clock) as d:
            assert await d.run_once() == 0
            d.set_webhooks({"ops": hook("ops", receiver)})  # a reload that still lacks it
            assert await d.run_once() == 0
            r = await row(pool, orphan)
            assert (r["status"], r["attempts"], r["lease_until"], r["last_error"]) == ("pending", 0, None, None)
            logged = [m for m in caplog.messages if "'retired'" in m]
            assert len(logged) == 1
            assert "not configured" in logged[0]
            d.set_webhooks({"ops": hook("ops", receiver), "retired": hook("retired", receiver)})
            assert await d.run_once() == 1
    assert (await row(pool, orphan))["status"] == "delivered"
    assert [q.path for q in receiver.got()] == ["/retired"]


# --- the task: LISTEN, poll, outages ------------------------------------------------------------------------


async def _listening(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle' AND query ILIKE $1", f"LISTEN%{CHANNEL}%"))


@pytest.mark.asyncio
async def test_run_wakes_on_notify_and_polls_without_it(pool: asyncpg.Pool, receiver: Receiver) -> None:
    first = await add(pool, "ops", "pm25-high\x1f1\x1f1")
    stop = asyncio.Event()
    # A 30 s poll: only the notification can bring the second row within seconds.
    d = Dispatcher(pool, {"ops": hook("ops", receiver)}, poll=30.0)
    task = asyncio.create_task(d.run(stop))
    try:
        await until(lambda: len(receiver.got()) == 1, "the first row", 10)
        end = time.monotonic() + 10
        while not await _listening(pool) or (await row(pool, first))["status"] != "delivered":
            assert time.monotonic() < end, "the dispatcher does not LISTEN"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # it is waiting now: nothing but a notification wakes it
        started = time.monotonic()
        second = await add(pool, "ops", "pm25-high\x1f2\x1f1", notify=True)
        await until(lambda: len(receiver.got()) == 2, "the notified row", 10)
        assert time.monotonic() - started < 5.0
        assert receiver.got()[1].msg_id == f"msg_{second}"
    finally:
        stop.set()
        await task
        await d.aclose()

    d = Dispatcher(pool, {"ops": hook("ops", receiver)})  # the default poll, every second
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        await asyncio.sleep(0.3)
        third = await add(pool, "ops", "pm25-high\x1f3\x1f1", notify=False)
        await until(lambda: len(receiver.got()) == 3, "the polled row", 5)
        assert receiver.got()[2].msg_id == f"msg_{third}"
    finally:
        stop.set()
        await task
        await d.aclose()


@pytest.mark.asyncio
async def test_run_survives_a_database_outage(database_url: str, pool: asyncpg.Pool, receiver: Receiver,
                                              make_proxy: Callable[[int], FaultProxy],
                                              caplog: pytest.LogCaptureFixture) -> None:
    proxy = make_proxy(urlsplit(database_url).port or 5432)
    proxied = urlsplit(database_url)._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
    through = await asyncpg.create_pool(proxied, min_size=1, max_size=3, timeout=2, command_timeout=2)
    d = Dispatcher(through, {"ops": hook("ops", receiver)}, poll=0.1)
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, "ingest.alerts.dispatch"):
        task = asyncio.create_task(d.run(stop))
        try:
            await asyncio.sleep(0.3)
            proxy.mode = "refuse"
            outbox = await add(pool, notify=True)  # committed straight to the database
            await asyncio.sleep(2.0)
            assert not task.done()
            assert receiver.got() == []
            proxy.mode = "pass"
            await until(lambda: len(receiver.got()) == 1, "the delivery after the outage", 20)
            end = time.monotonic() + 10
            while (await row(pool, outbox))["status"] != "delivered":
                assert time.monotonic() < end
                await asyncio.sleep(0.05)
            assert not task.done()
        finally:
            stop.set()
            await task
            await d.aclose()
            await through.close()
    down = [m for m in caplog.messages if "database unavailable" in m]
    back = [m for m in caplog.messages if "the dispatcher reaches the database again" in m]
    assert (len(down), len(back)) == (1, 1), caplog.messages
