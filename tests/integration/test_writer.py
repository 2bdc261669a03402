"""The batch writer and the pipeline's failure narrowing, on a real TimescaleDB (asyncpg)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio

from ingest.metrics import Metrics
from ingest.model import RawMessage, Reading, Rejection
from ingest.pipeline import Pipeline
from ingest.process import Outcome, Processor
from ingest.settings import DatabaseSettings, IngestSettings, Settings
from ingest.store.pool import create_pool
from ingest.store.writer import Writer
from tests.proxy import FaultProxy
from tests.services import until as _until

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(DatabaseSettings(url=database_url))
    yield p
    await p.close()




def outcome(
    i: int, readings: list[Reading], *, redelivered: bool = False, rejection: Rejection | None = None
) -> Outcome:
    msg = RawMessage(f"city/d{i}/up", b'{"x": %d}' % i, T0, 1, i, 1, i, redelivered)
    return Outcome(msg, "native", readings, rejection)


def reading(device: str, metric: str, minutes: int, value: float | bool | str) -> Reading:
    return Reading(device, metric, T0 + timedelta(minutes=minutes), value)


@pytest.mark.asyncio
async def test_a_released_connection_is_rolled_back_but_its_session_is_not_reset(database_url: str) -> None:
    # The pool skips asyncpg's reset round trip on release (ingest.store.pool._keep_session): a session
    # setting survives, an unfinished transaction does not.
    one = await create_pool(DatabaseSettings(url=database_url, pool_size=1))
    try:
        async with one.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.execute("SET work_mem = '7MB'")
            await conn.execute("BEGIN")
            await conn.execute("CREATE TABLE released_mid_transaction (x int)")
        async with one.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid  # the same session
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('released_mid_transaction')") is None
            assert await conn.fetchval("SHOW work_mem") == "7MB"
            assert await conn.fetchval("SHOW TimeZone") == "UTC"
    finally:
        await one.close()


@pytest.mark.asyncio
async def test_copy_then_duplicates_take_the_on_conflict_path(pool: asyncpg.Pool) -> None:
    writer = Writer(pool)
    batch = [
        outcome(i, [reading(f"d{i}", "pm25", 0, float(i)), reading(f"d{i}", "pm10", 0, 2.0 * i)]) for i in range(50)
    ]
    first = await writer.write(batch)
    assert (first.readings, first.conflict_path) == (100, False)
    # The same batch again, plus one new reading: the COPY conflicts, the transaction is rolled back,
    # and the batch is written again through the ON CONFLICT insert, with its other work (the new
    # reading and a rejection).
    again = [
        *batch,
        outcome(99, [reading("d99", "pm25", 5, 1.5)]),
        outcome(100, [], rejection=Rejection("malformed", "cut short")),
    ]
    second = await writer.write(again)
    assert second.conflict_path is True
    assert await pool.fetchval("SELECT count(*) FROM readings") == 101
    assert await pool.fetchval("SELECT count(*) FROM rejected_messages") == 1


@pytest.mark.asyncio
async def test_a_batch_written_again_after_its_copy_conflicts_is_calibrated_once(pool: asyncpg.Pool) -> None:
    from ingest.store.calibration import set_calibration

    writer = Writer(pool)
    first = await writer.write([outcome(1, [reading("d1", "pm25", 0, 10.0)])])
    assert first.readings == 1
    async with pool.acquire() as conn:
        d = await conn.fetchval("SELECT id FROM devices WHERE uid = 'd1'")
        m = await conn.fetchval("SELECT id FROM metrics WHERE name = 'pm25'")
        await set_calibration(conn, d, m, T0 + timedelta(minutes=1), 2.0, 0.0)
    # Not redelivered: the COPY is tried, meets the stored reading, and the batch goes again.
    second = await writer.write([outcome(2, [reading("d1", "pm25", 0, 10.0), reading("d1", "pm25", 5, 3.0)])])
    assert (second.conflict_path, second.readings, second.duplicates, second.calibrated) == (True, 1, 1, 1)
    assert [tuple(r) for r in await pool.fetch("SELECT time, value FROM readings ORDER BY time")] == [
        (T0, 10.0), (T0 + timedelta(minutes=5), 6.0)]  # x 2 once


@pytest.mark.asyncio
async def test_redelivered_batches_skip_the_copy_attempt(pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[str] = []
    copy = asyncpg.connection.Connection.copy_records_to_table

    async def counted(self: asyncpg.connection.Connection, table_name: str, **kwargs: Any) -> str:
        copies.append(table_name)
        return await copy(self, table_name, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "copy_records_to_table", counted)
    writer = Writer(pool)
    batch = [outcome(i, [reading(f"d{i}", "pm25", 0, float(i))]) for i in range(3)]
    first = await writer.write(batch)
    assert (first.readings, first.conflict_path, copies) == (3, False, ["readings"])
    # The same messages again, redelivered, and one new one: no COPY is tried; the unique key absorbs
    # the three rows already stored and the new one is added, in the same transaction.
    again = [outcome(i, o.readings, redelivered=True) for i, o in enumerate(batch)]
    second = await writer.write([*again, outcome(9, [reading("d9", "pm25", 0, 9.0)], redelivered=True)])
    assert second.conflict_path is True
    assert copies == ["readings"]
    assert await pool.fetchval("SELECT count(*) FROM readings") == 4
    assert await pool.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM readings GROUP BY device_id, metric_id, time HAVING count(*) > 1) d"
    ) == 0
    assert await pool.fetchval("SELECT count(*) FROM rejected_messages") == 0


@pytest.mark.asyncio
async def test_bools_are_one_and_zero_and_text_goes_to_states(pool: asyncpg.Pool) -> None:
    writer = Writer(pool)
    await writer.write(
        [
            outcome(
                1,
                [
                    reading("lamp-1", "on", 0, True),
                    reading("lamp-1", "on", 1, False),
                    reading("lamp-1", "mode", 0, "eco"),
                ],
            )
        ]
    )
    assert [r[0] for r in await pool.fetch("SELECT value FROM readings ORDER BY time")] == [1.0, 0.0]
    assert await pool.fetchval("SELECT value FROM states") == "eco"
    kinds = dict(await pool.fetch("SELECT name, kind FROM metrics"))
    assert kinds == {"on": "bool", "mode": "state"}
    assert await pool.fetchval("SELECT count(*) FROM devices WHERE uid = 'lamp-1' AND last_seen IS NOT NULL") == 1


@pytest.mark.asyncio
async def test_a_data_error_is_narrowed_to_the_one_message_that_caused_it(pool: asyncpg.Pool) -> None:
    # A metric name longer than the schema allows (validation would normally stop it first) makes
    # the database refuse the batch with a data-class error (23514, check violation).
    settings = Settings()
    pipeline = Pipeline(
        IngestSettings(),
        Processor.from_settings(settings),
        Writer(pool),
        Metrics(),
        ack=lambda epoch, seqs: 0,
        inbox_limit=100,
    )
    good = [outcome(i, [reading(f"d{i}", "pm25", 0, float(i))]) for i in range(7)]
    bad = outcome(7, [reading("d7", "x" * 300, 0, 1.0)])
    await pipeline._commit([*good[:3], bad, *good[3:]])
    assert await pool.fetchval("SELECT count(*) FROM readings") == 7
    rows = await pool.fetch("SELECT reason, detail, payload FROM rejected_messages")
    assert len(rows) == 1
    assert rows[0]["reason"] == "db_rejected"
    assert "23514" in rows[0]["detail"]
    assert bytes(rows[0]["payload"]) == bad.message.payload


@pytest.mark.asyncio
async def test_a_full_receive_window_writes_the_batch_without_waiting_for_its_age(pool: asyncpg.Pool) -> None:
    """With receive_maximum below batch_max_messages, no more messages can come until some are
    acknowledged: waiting for the batch's age would only add latency. The batch age here is an
    hour, so the batch is written only because the window is full."""
    window = 3
    acked: list[int] = []
    all_acked = asyncio.Event()

    def ack(epoch: int, seqs: list[int]) -> int:
        acked.extend(seqs)
        if len(acked) >= window:
            all_acked.set()
        return len(seqs)

    pipeline = Pipeline(
        IngestSettings(batch_max_age=3600, batch_max_messages=1000),
        Processor.from_settings(Settings()),
        Writer(pool),
        Metrics(),
        ack=ack,
        inbox_limit=100,
        window_full=lambda: len(acked) + window <= submitted,
    )
    submitted = 0
    tasks = [asyncio.create_task(pipeline.consume()), asyncio.create_task(pipeline.write_loop())]
    try:
        for i in range(window):
            pipeline.submit(RawMessage(f"nowhere/d{i}", b"{}", T0, 1, i + 1, 1, i))
            submitted += 1
        await asyncio.wait_for(all_acked.wait(), 30)  # a bound on a hang only
        assert sorted(acked) == [0, 1, 2]
        # No source matches these topics: each is a committed rejection, not a silent drop.
        assert await pool.fetchval("SELECT count(*) FROM rejected_messages") == window
    finally:
        pipeline.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


@pytest.mark.asyncio
async def test_a_failing_write_retries_as_soon_as_the_database_answers_again(
    database_url: str, make_proxy: Callable[[int], FaultProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry backoff is an hour here: the write gets through only because retry_now() (called
    by the service's database probe when the database answers again) cuts the backoff short."""
    monkeypatch.setattr("ingest.pipeline._RETRY_MIN", 3600.0)
    proxy = make_proxy(urlsplit(database_url).port or 5432)
    proxied = urlsplit(database_url)._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
    pool = await create_pool(DatabaseSettings(url=proxied, connect_timeout=2, command_timeout=2))
    try:
        metrics = Metrics()
        pipeline = Pipeline(IngestSettings(), Processor.from_settings(Settings()), Writer(pool, timeout=2), metrics,
                            ack=lambda epoch, seqs: 0, inbox_limit=100)
        proxy.mode = "refuse"
        commit = asyncio.create_task(pipeline._commit([outcome(1, [reading("d1", "pm25", 0, 1.0)])]))
        await _until(lambda: not pipeline.db_ok or commit.done(), "the first attempt to fail")
        assert not pipeline.db_ok
        assert not commit.done()
        proxy.mode = "pass"
        pipeline.retry_now()
        await asyncio.wait_for(commit, 30)
        assert pipeline.db_ok
        assert await pool.fetchval("SELECT count(*) FROM readings") == 1
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_after_a_blackhole_the_writer_starts_again_on_a_new_pool(
    pool: asyncpg.Pool, database_url: str, make_proxy: Callable[[int], FaultProxy]
) -> None:
    """A write into a blackhole fails within its bound instead of hanging. The pool, whose
    connections the blackhole froze for good, is terminated, and once the network is back the next
    write runs on a new pool."""
    proxy = make_proxy(urlsplit(database_url).port or 5432)
    proxied = urlsplit(database_url)._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
    settings = DatabaseSettings(url=proxied, connect_timeout=1, command_timeout=1)
    renewed: list[asyncpg.Pool] = []

    async def renew() -> asyncpg.Pool:
        new = await create_pool(settings)
        renewed.append(new)
        return new

    first = await create_pool(settings)
    writer = Writer(first, timeout=1, renew_pool=renew)
    try:
        await writer.write([outcome(1, [reading("d1", "pm25", 0, 1.0)])])
        proxy.mode = "blackhole"
        with pytest.raises((TimeoutError, OSError, asyncpg.InterfaceError)):
            await writer.write([outcome(2, [reading("d2", "pm25", 0, 2.0)])])
        assert first.is_closing()
        proxy.mode = "pass"
        await writer.write([outcome(2, [reading("d2", "pm25", 0, 2.0)])])
        assert renewed == [writer.pool]
        assert await pool.fetchval("SELECT count(*) FROM readings") == 2
    finally:
        first.terminate()
        for p in renewed:
            await p.close()


@pytest.mark.asyncio
async def test_topic_attributes_are_stored_on_the_device_row_and_follow_a_change(pool: asyncpg.Pool) -> None:
    writer = Writer(pool)

    def attributed(i: int, device: str, attrs: dict[str, str]) -> Outcome:
        o = outcome(i, [reading(device, "pm25", i, 1.0)])
        return Outcome(o.message, o.source, o.readings, attributes=attrs)

    await writer.write([attributed(0, "aq-1", {"district": "hoan-kiem", "gateway": "gw-1"}),
                        attributed(1, "aq-2", {"district": "cau-giay"})])
    # The device moves to another gateway; an attribute set by hand (or by the register) is kept.
    await pool.execute("""UPDATE devices SET attributes = attributes || '{"height_m": 3}' WHERE uid = 'aq-1'""")
    await writer.write([attributed(2, "aq-1", {"district": "hoan-kiem", "gateway": "gw-2"})])

    rows = dict(await pool.fetch("SELECT uid, attributes::text FROM devices ORDER BY uid"))
    assert json.loads(rows["aq-1"]) == {"district": "hoan-kiem", "gateway": "gw-2", "height_m": 3}
    assert json.loads(rows["aq-2"]) == {"district": "cau-giay"}
