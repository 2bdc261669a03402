"""Retention of rejected_messages: chunks older than [retention] rejected_messages are dropped.

rejected_messages is a hypertable of one-day chunks on received_at, so a whole day goes at once
(TimescaleDB's drop_chunks: no row-by-row DELETE, no bloat). A chunk goes when all of it is older
than the period: a row is kept at least the period, and at most one chunk interval (a day) longer.

Several workers may run against one database: the job runs under a transaction-level advisory
lock taken with pg_try_advisory_xact_lock, so one of them does it and the others skip that run.
The clock is injected so that tests can stand anywhere in time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeAlias

from ingest.store.classify import describe

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    from ingest.metrics import Metrics
    from ingest.settings import RetentionSettings

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = ["LOCK_KEY", "drop_old_rejections", "retention_loop"]

log = logging.getLogger(__name__)

LOCK_KEY = 7215150002  # pg_try_advisory_xact_lock key of the retention job


def _now() -> datetime:
    return datetime.now(UTC)


async def drop_old_rejections(conn: Conn, keep: float, now: datetime) -> list[str] | None:
    """Drop the chunks of rejected_messages wholly older than ``now - keep`` seconds; returns the
    dropped chunks' names, or None when another worker holds the job's lock (nothing done)."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_KEY):
            return None
        rows = await conn.fetch("SELECT drop_chunks('rejected_messages', older_than => $1::timestamptz)",
                                now - timedelta(seconds=keep))
    return [r[0] for r in rows]


async def retention_loop(pool: Callable[[], asyncpg.Pool], settings: RetentionSettings, metrics: Metrics,
                         clock: Callable[[], datetime] = _now) -> None:
    """Run the job every ``settings.every`` seconds, the first time right away; until cancelled.
    ``pool()``: the writer's current pool. A failed run is logged and tried again at the next."""
    while True:
        try:
            p = pool()
            if not p.is_closing():
                async with p.acquire(timeout=30) as conn:
                    dropped = await asyncio.wait_for(
                        drop_old_rejections(conn, settings.rejected_messages, clock()), 300)
                if dropped:
                    metrics.retention_dropped_chunks.inc(len(dropped))
                    log.info("retention: dropped %d chunk(s) of rejected_messages older than %.0f day(s)",
                             len(dropped), settings.rejected_messages / 86400)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("retention: rejected_messages not trimmed this time (%s); next try in %.0fs",
                        describe(exc), settings.every)
        await asyncio.sleep(settings.every)
