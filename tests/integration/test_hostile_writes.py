"""The write path cannot be stopped by one message, on a real TimescaleDB.

Validation stops unstorable text before it reaches a query; these tests bypass it, as a decoder bug
would, and show that the write path still narrows the failure to the one message, stores that
message as a rejection, and writes every other message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import psycopg
import pytest
import pytest_asyncio

from ingest.metrics import Metrics
from ingest.model import RawMessage, Reading, Rejection
from ingest.pipeline import Pipeline
from ingest.process import Outcome, Processor
from ingest.settings import DatabaseSettings, IngestSettings, Settings, SourceSettings
from ingest.store.pool import create_pool
from ingest.store.writer import Writer, WriteResult
from tests.services import until as _until

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
HANG = 60  # seconds: a bound on a hang, never an expectation of speed


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(DatabaseSettings(url=database_url))
    yield p
    await p.close()


def outcome(i: int, readings: list[Reading], *, topic: str | None = None, rejection: Rejection | None = None,
            source: str = "native") -> Outcome:
    msg = RawMessage(topic or f"city/d{i}/up", b'{"x": %d}' % i, T0, 1, i, 1, i)
    return Outcome(msg, source, readings, rejection)


def reading(device: str, metric: str = "pm25", minutes: int = 0, value: float | bool | str = 1.0,
            unit: str | None = None, flags: int = 0) -> Reading:
    return Reading(device, metric, T0 + timedelta(minutes=minutes), value, unit, flags)


def pipeline_of(writer: Writer, acked: list[int] | None = None) -> Pipeline:
    def ack(epoch: int, seqs: list[int]) -> int:
        if acked is not None:
            acked.extend(seqs)
        return len(seqs)

    return Pipeline(IngestSettings(), Processor.from_settings(Settings()), writer, Metrics(), ack=ack,
                    inbox_limit=100)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (reading("\udc80x"), "a lone surrogate in the device id (the driver refuses to encode it)"),
        (reading("d-nul\x00"), "NUL in the device id"),
        (reading("d7", "pm\udfff"), "a lone surrogate in the metric name"),
        (reading("d7", "pm\x0025"), "NUL in the metric name (the server refuses it)"),
        (reading("d7", "status", value="op\ud800en"), "a lone surrogate in a text state"),
        (reading("d7", "status", value="op\x00en"), "NUL in a text state"),
        (reading("d7", "temp", unit="\udc80C"), "a lone surrogate in the unit of a new metric"),
        (reading("d7", flags=70000), "flags out of the smallint range"),
    ],
)
async def test_one_unstorable_message_is_a_rejection_and_the_rest_are_stored(
    pool: asyncpg.Pool, bad: Reading, what: str
) -> None:
    renewed: list[int] = []

    async def renew() -> asyncpg.Pool:
        renewed.append(1)
        return pool

    writer = Writer(pool, renew_pool=renew)
    acked: list[int] = []
    pipeline = pipeline_of(writer, acked)
    good = [outcome(i, [reading(f"d{i}", "pm25", 0, float(i))]) for i in range(6)]
    poison = outcome(6, [bad])
    batch = [*good[:3], poison, *good[3:]]
    await asyncio.wait_for(pipeline._commit(batch), HANG)

    assert await pool.fetchval("SELECT count(*) FROM readings") == 6, what
    rows = await pool.fetch("SELECT reason, detail, payload, device_uid FROM rejected_messages")
    assert len(rows) == 1, what
    assert rows[0]["reason"] == "db_rejected"
    assert bytes(rows[0]["payload"]) == poison.message.payload
    assert pipeline.db_ok, "a data error is not an outage"
    assert renewed == [], "a data error must not renew the connection pool"


@pytest.mark.asyncio
async def test_rejection_rows_escape_what_they_quote(pool: asyncpg.Pool) -> None:
    writer = Writer(pool)
    nasty = outcome(1, [], topic="city/\x00/up",
                    rejection=Rejection("malformed", "bad \udc80 and \x00 here", "dev\ud800\x00ice"))
    result = await writer.write([nasty])
    assert result.rejections == 1
    row = await pool.fetchrow("SELECT topic, detail, device_uid, payload FROM rejected_messages")
    assert row is not None
    assert row["topic"] == "city/\\0/up"
    assert row["detail"] == "bad \\udc80 and \\0 here"
    assert row["device_uid"] == "dev\\ud800\\0ice"
    assert bytes(row["payload"]) == nasty.message.payload  # the raw bytes stay bytes


@pytest.mark.asyncio
async def test_new_devices_and_metrics_are_bounded_per_source_per_minute(pool: asyncpg.Pool) -> None:
    now = [1000.0]
    writer = Writer(pool, new_devices_per_minute=3, new_metrics_per_minute=2, clock=lambda: now[0])
    # Source "a" brings five new devices in one batch: three are created, the other two become
    # too_many_new_series rejections. Source "b" has a budget of its own.
    batch = [outcome(i, [reading(f"a-{i}")], source="a") for i in range(5)]
    batch.append(outcome(9, [reading("b-1")], source="b"))
    result = await writer.write(batch)
    assert result.reasons == {"too_many_new_series": 2}
    assert sorted(await pool.fetchval("SELECT array_agg(uid) FROM devices")) == ["a-0", "a-1", "a-2", "b-1"]
    details = await pool.fetch("SELECT detail, device_uid FROM rejected_messages ORDER BY device_uid")
    assert [d["device_uid"] for d in details] == ["a-3", "a-4"]
    assert "ingest.max_new_devices_per_minute = 3" in details[0]["detail"]

    # Known devices are never limited; a new metric counts against the metric budget, of which
    # "pm25" above took one of two.
    result = await writer.write([outcome(20 + i, [reading("a-0", f"m{i}", 1)], source="a") for i in range(3)])
    assert result.reasons == {"too_many_new_series": 2}
    assert result.readings == 1
    assert sorted(await pool.fetchval("SELECT array_agg(name) FROM metrics")) == ["m0", "pm25"]

    # The next minute brings a new budget.
    now[0] += 60
    result = await writer.write([outcome(30, [reading("a-3", "m2", 2)], source="a")])
    assert (result.readings, result.rejections) == (1, 0)


@pytest.mark.asyncio
async def test_post_commit_work_cannot_rerun_a_committed_batch(database_url: str) -> None:
    """devices.last_seen is updated after the commit. Before the fix that update ran inside the
    write attempt and its timeout: held up there (here by a row lock), the attempt timed out after
    its COMMIT, the pipeline wrote the committed batch again, and its rejection rows were doubled."""
    pool = await create_pool(DatabaseSettings(url=database_url, command_timeout=60))
    try:
        writer = Writer(pool, timeout=0.5)  # a write attempt may take 2 s
        acked: list[int] = []
        pipeline = pipeline_of(writer, acked)
        await writer.write([outcome(1, [reading("lamp-1", "on", 0, True)])])  # the device exists
        await writer.touch_devices()
        with psycopg.connect(database_url) as locker:
            locker.execute("SELECT 1 FROM devices WHERE uid = 'lamp-1' FOR UPDATE")  # held until the block ends
            batch = [outcome(2, [reading("lamp-1", "on", 5, False)]),
                     outcome(3, [], rejection=Rejection("malformed", "cut short"))]
            task = asyncio.create_task(pipeline._commit(batch))
            await asyncio.wait_for(task, HANG)
            await asyncio.wait_for(writer.touch_devices(), HANG)  # bounded; gives up on the lock
        assert await pool.fetchval("SELECT count(*) FROM rejected_messages") == 1
        assert await pool.fetchval("SELECT count(*) FROM readings") == 2
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_post_commit_work_held_up_counts_as_the_database_not_answering(database_url: str) -> None:
    """The last_seen update after the acks is a wait on the database like a write: while it is held
    up, stalled_for grows, so that a database gone away right after a commit suspends the broker
    connection after the stall limit. Before the fix the pipeline looked idle (stalled_for 0) for the
    whole 5 s bound of the update, while the receive window filled and the keepalive ran out."""
    pool = await create_pool(DatabaseSettings(url=database_url, command_timeout=60))
    tasks: list[asyncio.Task[None]] = []
    try:
        writer = Writer(pool)
        # The device exists, seen now (devices.last_seen only moves forward: the update must have a later time).
        now = datetime.now(UTC)
        await writer.write([outcome(1, [Reading("lamp-1", "on", now - timedelta(minutes=2), True)])])
        await writer.touch_devices()
        acked: list[int] = []

        def ack(epoch: int, seqs: list[int]) -> int:
            acked.extend(seqs)
            return len(seqs)

        source = SourceSettings(name="n", topic="n/{device}", format="native")
        pipeline = Pipeline(IngestSettings(batch_max_age=0.05), Processor.from_settings(Settings(sources=[source])),
                            writer, Metrics(), ack=ack, inbox_limit=100)
        tasks = [asyncio.create_task(pipeline.consume()), asyncio.create_task(pipeline.write_loop())]
        with psycopg.connect(database_url) as locker:
            locker.execute("SELECT 1 FROM devices WHERE uid = 'lamp-1' FOR UPDATE")  # held until the block ends
            later = (now + timedelta(minutes=1)).isoformat().encode()
            payload = b'{"time": "%s", "readings": {"on": false}}' % later
            pipeline.submit(RawMessage("n/lamp-1", payload, now + timedelta(minutes=2), 1, 1, 1, 0))
            await _until(lambda: acked == [0], "the message committed and acknowledged")
            await asyncio.sleep(0.5)  # the update now waits on the row lock
            assert pipeline.stalled_for(time.monotonic()) >= 0.4
        await _until(lambda: pipeline.stalled_for(time.monotonic()) == 0, "the update to end")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()


class _PoisonWriter(Writer):
    """The real writer, except that a message on a "poison" topic trips an unexpected error, as a
    bug in the write path would."""

    always = False
    failed_always = 0  # writes refused because of `always`

    async def write(self, outcomes: Sequence[Outcome]) -> WriteResult:
        if self.always:
            self.failed_always += 1
            raise RuntimeError("a bug the tests put here")
        if any("poison" in o.message.topic and o.readings for o in outcomes):
            raise RuntimeError("a bug the tests put here")
        return await super().write(outcomes)


@pytest.mark.asyncio
async def test_an_unexpected_failure_is_narrowed_to_its_message_and_logged_once(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    writer = _PoisonWriter(pool)
    pipeline = pipeline_of(writer)
    batch = [outcome(i, [reading(f"d{i}")]) for i in range(6)]
    batch[1] = outcome(1, [reading("d1")], topic="city/poison-1/up")
    batch[4] = outcome(4, [reading("d4")], topic="city/poison-2/up")
    with caplog.at_level(logging.DEBUG, logger="ingest.pipeline"):
        await asyncio.wait_for(pipeline._commit(batch), HANG)
    assert await pool.fetchval("SELECT count(*) FROM readings") == 4
    rows = await pool.fetch("SELECT topic, reason, detail FROM rejected_messages ORDER BY topic")
    assert [(r["topic"], r["reason"]) for r in rows] == [("city/poison-1/up", "write_error"),
                                                        ("city/poison-2/up", "write_error")]
    assert "RuntimeError" in rows[0]["detail"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "logged in full once, not once per message"
    assert "poison-1" in errors[0].getMessage()
    assert errors[0].exc_info is not None


@pytest.mark.asyncio
async def test_when_even_the_rejection_row_fails_unexpectedly_the_write_is_retried_not_acked(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ingest.pipeline._RETRY_MIN", 0.05)
    monkeypatch.setattr("ingest.pipeline._RETRY_MAX", 0.1)
    writer = _PoisonWriter(pool)
    writer.always = True  # the cause is not the message: nothing can be written
    pipeline = pipeline_of(writer)
    task = asyncio.create_task(pipeline._commit([outcome(i, [reading(f"d{i}")]) for i in range(3)]))
    # The batch is split down to its first message (1 + 1 + 1 refused writes), whose rejection row is
    # then refused too; from there on every write is a retry of that row, with backoff.
    for _ in range(2000):  # a bound on a hang only
        if writer.failed_always >= 10 or task.done():
            break
        await asyncio.sleep(0.01)
    assert writer.failed_always >= 10
    assert not task.done(), "held (unacknowledged) while nothing can be written, never given up"
    assert not pipeline.db_ok
    writer.always = False
    await asyncio.wait_for(task, HANG)
    # Narrowing reached the first message, whose rejection row could not be written either: that row
    # was retried until the writer worked again; the other messages were then written as readings.
    rows = await pool.fetch("SELECT topic, reason FROM rejected_messages")
    assert [(r["topic"], r["reason"]) for r in rows] == [("city/d0/up", "write_error")]
    assert await pool.fetchval("SELECT count(*) FROM readings") == 2
    assert pipeline.db_ok


class _TouchRecorder(Writer):
    """The real writer, recording how many messages were acknowledged when last_seen was updated."""

    acked: list[int]
    acked_at_touch: list[int]

    async def touch_devices(self) -> None:
        self.acked_at_touch.append(len(self.acked))
        await super().touch_devices()


@pytest.mark.asyncio
async def test_a_committed_batch_is_acknowledged_before_any_post_commit_work(pool: asyncpg.Pool) -> None:
    """Between COMMIT and the acknowledgement there is no await: nothing (a slow last_seen update,
    a suspension of the broker connection decided meanwhile) can come between them."""
    writer = _TouchRecorder(pool)
    writer.acked_at_touch = []
    acked: list[int] = []
    writer.acked = acked
    pipeline = pipeline_of(writer, acked)
    tasks = [asyncio.create_task(pipeline.consume()), asyncio.create_task(pipeline.write_loop())]
    try:
        payload = b'{"device": "hn-aq-1", "time": "2026-11-25T03:00:00Z", "readings": {"pm25": 1}}'
        for i in range(3):
            pipeline.submit(RawMessage("nowhere/x", payload, T0, 1, i + 1, 1, i))
        for _ in range(400):
            if len(acked) == 3 and writer.acked_at_touch:
                break
            await asyncio.sleep(0.05)
        assert sorted(acked) == [0, 1, 2]
        assert writer.acked_at_touch[:1] == [3], "touch_devices ran before the acknowledgement"
    finally:
        pipeline.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), HANG)
