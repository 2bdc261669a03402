"""Retention of rejected_messages (issue #15): old chunks dropped on a schedule, by one worker at a time.

On the real TimescaleDB: rows are placed in time around the cut with an injected clock, the job's
advisory lock is held by another session to stand for a second worker, and the service's own
schedule is seen dropping rows that a test put 40 days back.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import psycopg
import pytest

from ingest.store.retention import LOCK_KEY, drop_old_rejections
from tests.integration.harness import IngestProcess, write_config
from tests.services import Mosquitto, wait_until

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DAY = 86400.0


async def _insert(conn: asyncpg.Connection[asyncpg.Record], times: list[datetime]) -> None:
    await conn.executemany(
        "INSERT INTO rejected_messages (received_at, source, topic, payload, reason, detail) "
        "VALUES ($1, 's', 't', '\\x00'::bytea, 'malformed', 'test row')", [(t,) for t in times])


async def _times(conn: asyncpg.Connection[asyncpg.Record]) -> list[datetime]:
    return [r[0] for r in await conn.fetch("SELECT received_at FROM rejected_messages ORDER BY received_at")]


@pytest.mark.asyncio
async def test_chunks_wholly_older_than_the_period_are_dropped_and_no_newer_row(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        old = [NOW - timedelta(days=40), NOW - timedelta(days=31)]  # chunks that end before the cut
        # The cut is 2026-11-01 12:00: the chunk of 2026-11-01 (00:00 to 24:00) ends after it, so this
        # row older than 30 days stays (at most one chunk interval longer than the period).
        edge = NOW - timedelta(days=30, hours=6)
        kept = [edge, NOW - timedelta(days=29), NOW - timedelta(hours=1)]
        await _insert(conn, old + kept)

        dropped = await drop_old_rejections(conn, 30 * DAY, NOW)
        assert dropped is not None
        assert len(dropped) == 2
        assert await _times(conn) == kept

        assert await drop_old_rejections(conn, 30 * DAY, NOW) == []  # again: nothing more to drop

        # A month later by the injected clock, everything has aged out.
        dropped = await drop_old_rejections(conn, 30 * DAY, NOW + timedelta(days=32))
        assert dropped is not None
        assert len(dropped) == 3
        assert await _times(conn) == []
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_another_worker_holding_the_lock_means_this_one_skips(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    other = await asyncpg.connect(database_url)
    try:
        await _insert(conn, [NOW - timedelta(days=40)])
        await other.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)  # a worker running the job now
        assert await drop_old_rejections(conn, 30 * DAY, NOW) is None
        assert len(await _times(conn)) == 1
        await other.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        dropped = await drop_old_rejections(conn, 30 * DAY, NOW)
        assert dropped is not None
        assert len(dropped) == 1
        assert await _times(conn) == []
    finally:
        await other.close()
        await conn.close()


def test_the_service_drops_old_rejections_on_its_schedule(
    tmp_path: Path, broker: Mosquitto, database_url: str, topic_prefix: str
) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(database_url, autocommit=True) as c:
        for t in (now - timedelta(days=40), now - timedelta(days=3), now - timedelta(hours=1)):
            c.execute("INSERT INTO rejected_messages (received_at, source, topic, payload, reason, detail) "
                      "VALUES (%s, 's', 't', '\\x00'::bytea, 'malformed', 'test row')", (t,))
    config = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url,
                          mqtt_url=f"mqtt://127.0.0.1:{broker.port}",
                          extra='[retention]\nrejected_messages = "2d"\nevery = "1h"\n')
    ingest = IngestProcess(config, tmp_path / "ingest.log")
    ingest.start()
    try:
        def remaining() -> int:
            with psycopg.connect(database_url) as c:
                row = c.execute("SELECT count(*) FROM rejected_messages").fetchone()
            assert row is not None
            return int(row[0])

        # The first run is at start-up: the rows of 40 and 3 days ago go, the one of an hour ago stays.
        wait_until(lambda: remaining() == 1, 30, "the retention job to drop the old chunks")
        wait_until(lambda: ingest.metric("sensor_ingest_retention_dropped_chunks_total") == 2, 10,
                   "the dropped chunks to be counted")
        with psycopg.connect(database_url) as c:
            row = c.execute("SELECT received_at FROM rejected_messages").fetchone()
        assert row is not None
        assert row[0] > now - timedelta(hours=2)
    finally:
        ingest.close()


@pytest.mark.asyncio
async def test_the_loop_runs_at_once_on_the_injected_clock_and_counts_the_chunks(database_url: str) -> None:
    import asyncio

    from ingest.metrics import Metrics
    from ingest.settings import RetentionSettings
    from ingest.store.retention import retention_loop

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await _insert(conn, [NOW - timedelta(days=3), NOW - timedelta(hours=1)])
        metrics = Metrics()
        # By the injected clock it is 40 days later: both rows are past a 30-day period.
        task = asyncio.create_task(retention_loop(lambda: pool, RetentionSettings(), metrics,
                                                  clock=lambda: NOW + timedelta(days=40)))
        try:
            for _ in range(200):
                if metrics.registry.get_sample_value("sensor_ingest_retention_dropped_chunks_total") == 2:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
        assert metrics.registry.get_sample_value("sensor_ingest_retention_dropped_chunks_total") == 2
        async with pool.acquire() as conn:
            assert await _times(conn) == []
    finally:
        await pool.close()
