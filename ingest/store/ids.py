"""Device and metric ids: an in-memory cache, filled on a miss from the database.

A miss is first looked up; what the database does not hold either is *new*, and is created only
when the caller admits it (see ingest.budget: one publisher may not create series without bound).
Creating runs in its own short transaction, outside the batch transaction, and commits before the
ids are cached, so a batch that rolls back can never leave a cached id that does not exist. Keys are
inserted in sorted order with ON CONFLICT DO NOTHING, so concurrent workers inserting overlapping new
keys neither deadlock nor fail.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = ["IdCache"]

_INSERT_DEVICES = """
INSERT INTO devices (uid, last_seen)
SELECT u, now() FROM unnest($1::text[]) AS t(u) ORDER BY u
ON CONFLICT (uid) DO NOTHING
"""
_SELECT_DEVICES = "SELECT uid, id FROM devices WHERE uid = ANY($1::text[])"
_INSERT_METRICS = """
INSERT INTO metrics (name, unit, kind)
SELECT n, u, k FROM unnest($1::text[], $2::text[], $3::text[]) AS t(n, u, k) ORDER BY n
ON CONFLICT (name) DO NOTHING
"""
_SELECT_METRICS = "SELECT name, id FROM metrics WHERE name = ANY($1::text[])"


class IdCache:
    def __init__(self) -> None:
        self.devices: dict[str, int] = {}
        self.metrics: dict[str, int] = {}

    async def new_devices(self, conn: Conn, uids: Iterable[str]) -> set[str]:
        """Cache the ids of the known devices among ``uids``; return the ones the database lacks."""
        missing = {u for u in uids if u not in self.devices}
        if not missing:
            return set()
        for uid, id_ in await conn.fetch(_SELECT_DEVICES, sorted(missing)):
            self.devices[uid] = id_
        return {u for u in missing if u not in self.devices}

    async def create_devices(self, conn: Conn, uids: Iterable[str]) -> None:
        new = sorted(set(uids))
        if not new:
            return
        async with conn.transaction():
            await conn.execute(_INSERT_DEVICES, new)
        for uid, id_ in await conn.fetch(_SELECT_DEVICES, new):
            self.devices[uid] = id_

    async def new_metrics(self, conn: Conn, names: Iterable[str]) -> set[str]:
        """Cache the ids of the known metrics among ``names``; return the ones the database lacks."""
        missing = {n for n in names if n not in self.metrics}
        if not missing:
            return set()
        for name, id_ in await conn.fetch(_SELECT_METRICS, sorted(missing)):
            self.metrics[name] = id_
        return {n for n in missing if n not in self.metrics}

    async def create_metrics(self, conn: Conn, metrics: dict[str, tuple[str | None, str]]) -> None:
        """metrics: name -> (unit, kind) of the first reading seen, used only when creating the row."""
        names = sorted(metrics)
        if not names:
            return
        units = [metrics[n][0] for n in names]
        kinds = [metrics[n][1] for n in names]
        async with conn.transaction():
            await conn.execute(_INSERT_METRICS, names, units, kinds)
        for name, id_ in await conn.fetch(_SELECT_METRICS, names):
            self.metrics[name] = id_
