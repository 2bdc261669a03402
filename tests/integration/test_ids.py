"""The id cache never holds an id the database does not (ingest/store/ids.py), on a real TimescaleDB.

There is no foreign key from readings to devices or metrics, so a cached id whose row was rolled
back would not fail later writes: it would silently store readings that join to nothing. The
database itself is made to refuse, with test-only DDL in this test's own database:

- a deferred constraint trigger on devices (or metrics) that fails at COMMIT for one key: the INSERT
  of the new keys succeeds, and only the commit of their short transaction fails, which is the
  moment a cache filled too early would go wrong;
- a row trigger on readings that refuses one marked value: the batch transaction rolls back after
  the ids were created in their own transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import pytest_asyncio

from ingest.metrics import Metrics
from ingest.model import RawMessage, Reading
from ingest.pipeline import Pipeline
from ingest.process import Outcome, Processor
from ingest.settings import DatabaseSettings, IngestSettings, Settings
from ingest.store.classify import classify
from ingest.store.pool import create_pool
from ingest.store.writer import Writer

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
HANG = 60  # seconds: a bound on a hang, never an expectation of speed
BLOCKED = "blocked-1"  # the one key the commit trigger refuses
POISON = 666.0  # the one reading value the readings trigger refuses

# (table, key column): a new device id, or a new metric name, is refused at COMMIT.
_KEYS = {"devices": "uid", "metrics": "name"}


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(DatabaseSettings(url=database_url))
    yield p
    await p.close()


def outcome(i: int, device: str, metric: str = "pm25", value: float = 1.0) -> Outcome:
    msg = RawMessage(f"city/{device}/up", b'{"n": %d}' % i, T0, 1, i, 1, i)
    return Outcome(msg, "native", [Reading(device, metric, T0 + timedelta(minutes=i), value)])


def pipeline_of(writer: Writer) -> Pipeline:
    return Pipeline(IngestSettings(), Processor.from_settings(Settings()), writer, Metrics(),
                    ack=lambda epoch, seqs: len(seqs), inbox_limit=100)


async def refuse_commit_of(pool: asyncpg.Pool, table: str, key: str) -> None:
    column = _KEYS[table]
    await pool.execute(f"""
        CREATE FUNCTION test_refuse_key() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'test: % refused at commit', NEW.{column} USING ERRCODE = '23514';
        END $$;
        CREATE CONSTRAINT TRIGGER test_refuse_key AFTER INSERT ON {table}
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
            WHEN (NEW.{column} = '{key}') EXECUTE FUNCTION test_refuse_key();
    """)


async def in_database(pool: asyncpg.Pool, table: str) -> dict[str, int]:
    return {r[0]: r[1] for r in await pool.fetch(f"SELECT {_KEYS[table]}, id FROM {table}")}


def cached(writer: Writer, table: str) -> dict[str, int]:
    return writer.ids.devices if table == "devices" else writer.ids.metrics


async def assert_cache_holds_only_committed_ids(pool: asyncpg.Pool, writer: Writer) -> None:
    for table in _KEYS:
        committed = await in_database(pool, table)
        stale = {k: v for k, v in cached(writer, table).items() if committed.get(k) != v}
        assert stale == {}, f"{table}: cached ids that the database does not hold"


async def orphan_readings(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval(
        "SELECT count(*) FROM readings r WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.id = r.device_id)"
        " OR NOT EXISTS (SELECT 1 FROM metrics m WHERE m.id = r.metric_id)"))


@pytest.mark.asyncio
@pytest.mark.parametrize("table", ["devices", "metrics"])
async def test_an_id_whose_creating_transaction_rolled_back_is_never_cached(pool: asyncpg.Pool, table: str) -> None:
    await refuse_commit_of(pool, table, BLOCKED)
    writer = Writer(pool)

    def message(i: int, key: str) -> Outcome:
        return outcome(i, key) if table == "devices" else outcome(i, "dev-1", key)

    good, blocked = message(1, "ok-1"), message(2, BLOCKED)

    # 1. The writer alone: both new keys go in one short transaction, whose COMMIT the trigger
    #    refuses. The batch fails with a data-class error and neither key is cached.
    with pytest.raises(asyncpg.PostgresError) as refused:
        await writer.write([good, blocked])
    assert refused.value.sqlstate == "23514"
    assert classify(refused.value) == "data"
    assert await in_database(pool, table) == {}
    assert "ok-1" not in cached(writer, table)
    assert BLOCKED not in cached(writer, table)
    await assert_cache_holds_only_committed_ids(pool, writer)
    assert await pool.fetchval("SELECT count(*) FROM readings") == 0

    # 2. Through the pipeline: the batch is narrowed, the good message is stored with its new key,
    #    the blocked one becomes a db_rejected row, and only the committed key is cached.
    await asyncio.wait_for(pipeline_of(writer)._commit([good, blocked]), HANG)
    committed = await in_database(pool, table)
    assert "ok-1" in committed
    assert BLOCKED not in committed
    assert cached(writer, table)["ok-1"] == committed["ok-1"]
    assert BLOCKED not in cached(writer, table)
    await assert_cache_holds_only_committed_ids(pool, writer)
    rows = await pool.fetch("SELECT reason, detail, payload FROM rejected_messages")
    assert [(r["reason"], bytes(r["payload"])) for r in rows] == [("db_rejected", blocked.message.payload)]
    assert "SQLSTATE 23514" in rows[0]["detail"]
    assert await pool.fetchval("SELECT count(*) FROM readings") == 1

    # 3. The obstacle removed, the same key is created, cached with its real id, and written.
    await pool.execute(f"DROP TRIGGER test_refuse_key ON {table}")
    result = await writer.write([message(3, BLOCKED)])
    assert result.readings == 1
    committed = await in_database(pool, table)
    assert cached(writer, table)[BLOCKED] == committed[BLOCKED]
    await assert_cache_holds_only_committed_ids(pool, writer)
    assert await pool.fetchval("SELECT count(*) FROM readings") == 2
    assert await orphan_readings(pool) == 0


@pytest.mark.asyncio
async def test_ids_created_for_a_batch_that_rolls_back_exist_and_are_reused(pool: asyncpg.Pool) -> None:
    await pool.execute(f"""
        CREATE FUNCTION test_refuse_value() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'test: value % refused', NEW.value USING ERRCODE = '22023';
        END $$;
        CREATE TRIGGER test_refuse_value BEFORE INSERT ON readings
            FOR EACH ROW WHEN (NEW.value = {POISON}) EXECUTE FUNCTION test_refuse_value();
    """)
    writer = Writer(pool)
    poisoned = outcome(1, "fresh-1", "fresh-metric", POISON)

    # The new device and metric are committed in their own transaction; the batch transaction
    # is then refused by the readings trigger and rolls back. The ids stay cached, and exist.
    with pytest.raises(asyncpg.PostgresError) as refused:
        await writer.write([poisoned])
    assert refused.value.sqlstate == "22023"
    assert await pool.fetchval("SELECT count(*) FROM readings") == 0
    devices, metrics = await in_database(pool, "devices"), await in_database(pool, "metrics")
    assert writer.ids.devices["fresh-1"] == devices["fresh-1"]
    assert writer.ids.metrics["fresh-metric"] == metrics["fresh-metric"]
    await assert_cache_holds_only_committed_ids(pool, writer)

    # Narrowed by the pipeline, the message becomes a rejection; the cached ids are then used, with
    # no lookup, by the next batch of that device and metric, whose readings join to their rows.
    await asyncio.wait_for(pipeline_of(writer)._commit([poisoned, outcome(2, "fresh-1", "fresh-metric", 2.0)]), HANG)
    assert await pool.fetchval("SELECT count(*) FROM rejected_messages WHERE reason = 'db_rejected'") == 1
    rows = await pool.fetch("SELECT d.uid, m.name, r.value FROM readings r JOIN devices d ON d.id = r.device_id"
                            " JOIN metrics m ON m.id = r.metric_id")
    assert [(r["uid"], r["name"], r["value"]) for r in rows] == [("fresh-1", "fresh-metric", 2.0)]
    assert await orphan_readings(pool) == 0
    await assert_cache_holds_only_committed_ids(pool, writer)
