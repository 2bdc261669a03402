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

from ingest.catalog import Catalog, MetricRow

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = ["IdCache", "sync_bindings"]

_INSERT_DEVICES = """
INSERT INTO devices (uid, source, last_seen)
SELECT u, s, now() FROM unnest($1::text[], $2::text[]) AS t(u, s) ORDER BY u
ON CONFLICT (uid) DO NOTHING
"""
_SELECT_DEVICES = "SELECT uid, id FROM devices WHERE uid = ANY($1::text[])"
_METRIC_COLUMNS = ("unit", "kind", "quantity", "valid_min", "valid_max", "plausible_min", "plausible_max",
                   "range_source")
_METRIC_TYPES = ("text", "text", "text", "float8", "float8", "float8", "float8", "text")
_INSERT_METRICS = f"""
INSERT INTO metrics (name, {", ".join(_METRIC_COLUMNS)})
SELECT * FROM unnest($1::text[], {", ".join(f"${i + 2}::{t}[]" for i, t in enumerate(_METRIC_TYPES))})
    AS t(name, {", ".join(_METRIC_COLUMNS)}) ORDER BY name
ON CONFLICT (name) DO NOTHING
"""
# A binding that changed (a new release's catalog, a [[metrics]] entry): bound metrics take the
# quantity's unit, kind and ranges; a metric that lost its binding keeps its unit and kind.
_UPDATE_BINDINGS = f"""
UPDATE metrics AS m SET {", ".join(f"{c} = t.{c}" for c in _METRIC_COLUMNS)}
FROM unnest($1::text[], {", ".join(f"${i + 2}::{t}[]" for i, t in enumerate(_METRIC_TYPES))})
    AS t(name, {", ".join(_METRIC_COLUMNS)})
WHERE m.name = t.name
  AND ({", ".join(f"m.{c}" for c in _METRIC_COLUMNS)}) IS DISTINCT FROM ({", ".join(f"t.{c}" for c in _METRIC_COLUMNS)})
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

    async def create_devices(self, conn: Conn, uids: Iterable[str],
                             sources: dict[str, str | None] | None = None) -> None:
        """``sources``: the source that first wrote each new device (devices.source)."""
        new = sorted(set(uids))
        if not new:
            return
        of = sources or {}
        async with conn.transaction():
            await conn.execute(_INSERT_DEVICES, new, [of.get(u) for u in new])
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

    async def create_metrics(self, conn: Conn, metrics: dict[str, MetricRow]) -> None:
        """metrics: name -> its row (the catalog's binding, else the first reading's unit and kind)."""
        names = sorted(metrics)
        if not names:
            return
        async with conn.transaction():
            await conn.execute(_INSERT_METRICS, names, *_columns(metrics, names))
        for name, id_ in await conn.fetch(_SELECT_METRICS, names):
            self.metrics[name] = id_


def _columns(rows: dict[str, MetricRow], names: list[str]) -> list[list[object]]:
    return [[getattr(rows[n], c) for n in names] for c in _METRIC_COLUMNS]


async def sync_bindings(conn: Conn, catalog: Catalog | None) -> tuple[int, list[str]]:
    """Bring every metrics row's binding up to the catalog (at start-up: the catalog or the config may
    have changed since the row was made). A metric whose row holds another unit than its quantity's
    keeps it (Catalog.pin): its stored history is in that unit, and so are its new readings. A row the
    catalog binds to nothing, now as before, is left as it is (its ranges may be an operator's).
    Returns how many rows changed, and a line for each metric that kept its unit."""
    if catalog is None:
        return 0, []
    rows: dict[str, MetricRow] = {}
    kept: list[str] = []
    for name, unit, kind, quantity in await conn.fetch("SELECT name, unit, kind, quantity FROM metrics ORDER BY name"):
        bound = catalog.quantity_of(name)
        pinned = catalog.pin(name, unit)
        if bound is not None and pinned is not bound:
            kept.append(
                f"{name!r} keeps its unit {unit!r}, the unit of its stored readings: new readings are converted to "
                f"it (other metrics of {bound.name!r} are stored in {bound.unit!r})" if pinned is not None else
                f"{name!r} stays unbound: its stored readings are in {unit!r}, which does not convert to "
                f"{bound.unit!r} of {bound.name!r}")
        row = catalog.row(name, unit, kind)
        if row.quantity is None and quantity is None:
            continue
        rows[name] = row
    names = sorted(rows)
    if not names:
        return 0, kept
    async with conn.transaction():
        status = await conn.execute(_UPDATE_BINDINGS, names, *_columns(rows, names))
    return int(status.split()[-1]), kept
