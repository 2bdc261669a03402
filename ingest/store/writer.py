"""Writes one batch in one transaction: readings (binary COPY), states, rejections.

A unique-key conflict must not abort the batch's other work: the COPY runs under a SAVEPOINT and,
on conflict, the rows go in again through INSERT ... ON CONFLICT DO NOTHING (unnest of arrays, no
DDL). A batch that holds redelivered messages takes that path directly, since conflicts are likely.

A connection that failed with a connection-class error (timeout, reset, closed) is terminated, never
returned to the pool: after a timeout its state is unknown, and giving it back would run the pool's
reset queries on a network that may drop every packet (a blackhole), which would hang the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ingest.model import Reading
from ingest.process import Outcome
from ingest.store.ids import IdCache

__all__ = ["WriteResult", "Writer"]

log = logging.getLogger(__name__)

_READING_COLUMNS = ("time", "device_id", "metric_id", "value", "flags")
_REJECTION_COLUMNS = ("received_at", "source", "topic", "payload", "reason", "detail", "device_uid")
_INSERT_READINGS = """
INSERT INTO readings (time, device_id, metric_id, value, flags)
SELECT * FROM unnest($1::timestamptz[], $2::int[], $3::int[], $4::float8[], $5::int2[])
ON CONFLICT DO NOTHING
"""
_INSERT_STATES = """
INSERT INTO states (time, device_id, metric_id, value, flags)
SELECT * FROM unnest($1::timestamptz[], $2::int[], $3::int[], $4::text[], $5::int2[])
ON CONFLICT DO NOTHING
"""
_TOUCH_DEVICES = """
UPDATE devices SET last_seen = t.ts
FROM unnest($1::int[], $2::timestamptz[]) AS t(id, ts)
WHERE devices.id = t.id AND (devices.last_seen IS NULL OR devices.last_seen < t.ts)
"""


def _text(s: str) -> str:
    # PostgreSQL text cannot hold NUL; a rejection must be storable whatever the payload held.
    return s.replace("\x00", "\\0") if "\x00" in s else s


def _kind(value: float | bool | str) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "state"
    return "number"


class WriteResult:
    __slots__ = ("conflict_path", "readings", "rejections", "states")

    def __init__(self) -> None:
        self.readings = 0
        self.states = 0
        self.rejections = 0
        self.conflict_path = False


class Writer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        ids: IdCache | None = None,
        timeout: float | None = None,
        renew_pool: Callable[[], Awaitable[asyncpg.Pool]] | None = None,
    ) -> None:
        """``timeout``: the statement timeout; it bounds acquiring a connection, and four times it
        bounds a whole write attempt, whatever the driver waits on.

        ``renew_pool``: makes a new pool. When given, a connection-class failure terminates the
        whole pool and the next write starts on a new one: the other connections went through the
        same outage (a restart, a partition) and may be dead or frozen too, and none of them can
        then hold the writer up. Without it (tests of the writer alone) the pool is kept.
        """
        self.pool = pool
        self.ids = ids or IdCache()
        self.timeout = timeout
        self._limit = None if timeout is None else 4 * timeout
        self._renew_pool = renew_pool
        self._stale = False  # the pool was terminated after a failure: renew before the next write

    async def write(self, outcomes: Sequence[Outcome]) -> WriteResult:
        """Commit every outcome's readings and rejection in one transaction, or raise."""
        try:
            async with asyncio.timeout(self._limit):
                if self._stale:
                    assert self._renew_pool is not None
                    self.pool = await self._renew_pool()
                    self._stale = False
                return await self._write_once(outcomes)
        except (OSError, TimeoutError, asyncpg.InterfaceError):
            if self._renew_pool is not None and not self._stale:
                self._stale = True
                self.pool.terminate()
            raise

    async def _write_once(self, outcomes: Sequence[Outcome]) -> WriteResult:
        async with self.pool.acquire(timeout=self.timeout) as conn:
            try:
                return await self._write(conn, outcomes)
            except (OSError, TimeoutError, asyncpg.InterfaceError):
                # asyncpg may already have aborted the connection and taken it back (its own
                # cancel request timed out): terminating again would only mask the real error.
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                raise

    async def _write(self, conn: PoolConnectionProxy[asyncpg.Record], outcomes: Sequence[Outcome]) -> WriteResult:
        result = WriteResult()
        readings: list[Reading] = [r for o in outcomes for r in o.readings]
        if readings:
            await self.ids.resolve_devices(conn, (r.device for r in readings))
            metrics: dict[str, tuple[str | None, str]] = {}
            for r in readings:
                if r.metric not in metrics:
                    metrics[r.metric] = (r.unit, _kind(r.value))
            await self.ids.resolve_metrics(conn, metrics)
        dev, met = self.ids.devices, self.ids.metrics
        rows: list[tuple[datetime, int, int, float, int]] = []
        texts: list[tuple[datetime, int, int, str, int]] = []
        last_seen: dict[int, datetime] = {}
        for r in readings:
            d = dev[r.device]
            v = r.value
            if isinstance(v, str):
                texts.append((r.time, d, met[r.metric], v, r.flags))
            else:
                rows.append((r.time, d, met[r.metric], float(v), r.flags))
            seen = last_seen.get(d)
            if seen is None or seen < r.time:
                last_seen[d] = r.time
        rejections = [
            (o.message.received_at, o.source, _text(o.message.topic), o.message.payload, o.rejection.reason,
             _text(o.rejection.detail), None if o.rejection.device is None else _text(o.rejection.device))
            for o in outcomes if o.rejection is not None
        ]
        redelivered = any(o.message.redelivered for o in outcomes)
        async with conn.transaction():
            if rows:
                result.conflict_path = await self._write_readings(conn, rows, redelivered)
            if texts:
                await conn.execute(_INSERT_STATES, *map(list, zip(*texts, strict=True)))
            if rejections:
                await conn.copy_records_to_table(
                    "rejected_messages", records=rejections, columns=_REJECTION_COLUMNS
                )
        result.readings, result.states, result.rejections = len(rows), len(texts), len(rejections)
        if last_seen:
            # After the commit and outside it: a hint for operators, never worth a row lock
            # held by the batch transaction or a retry of the batch.
            ids = sorted(last_seen)
            try:
                await conn.execute(_TOUCH_DEVICES, ids, [last_seen[i] for i in ids])
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                log.debug("devices.last_seen not updated: %s", exc)
                if not isinstance(exc, asyncpg.PostgresError):
                    conn.terminate()  # see the module docstring
        return result

    async def _write_readings(self, conn: PoolConnectionProxy[asyncpg.Record],
                              rows: list[tuple[datetime, int, int, float, int]], redelivered: bool) -> bool:
        if not redelivered:
            try:
                async with conn.transaction():  # a SAVEPOINT inside the batch transaction
                    await conn.copy_records_to_table("readings", records=rows, columns=_READING_COLUMNS)
                return False
            except asyncpg.UniqueViolationError:
                pass
        await conn.execute(_INSERT_READINGS, *map(list, zip(*rows, strict=True)))
        return True
