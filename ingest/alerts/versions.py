"""Rule versions across workers: after a reload, workers can hold different versions of a rule for a
while (one has read the new file, another not yet). Each series' state remembers the version that
judged it last (alert_state.version = Rule.version, a fingerprint of what decides its events; the
value rules of a rule set, judged together, are one entry "*value" whose fingerprint covers them
all), and each worker writes the versions it holds to alert_workers every few seconds (``beat``).

Who judges a series (``Versions.decide``), for a worker holding version V of the rule and a state
judged by version S:
- S is V, or the series was never judged: this worker judges it.
- S is not held by any live worker (its workers reloaded to V, or stopped): this worker takes it
  over. So the newer version wins once every worker has it.
- otherwise S is still held by a live worker: the series is left to it (deferred; its waiting
  readings are judged there), so two versions never take turns on one series.
A take-over and a deferral are logged once per rule and pair of versions. Live: seen within LIVE
seconds. Until this worker's first beat it knows no one: it judges only what S or nothing judged.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = ["BEAT_EVERY", "LIVE", "Versions", "worker_name"]

log = logging.getLogger(__name__)

BEAT_EVERY = 5.0  # seconds between a worker's writes of its versions
LIVE = 30.0  # seconds since its last write within which a worker counts as live

_BEAT = """
INSERT INTO alert_workers (worker, versions, started_at, seen_at) VALUES ($1, $2::jsonb, $3, now())
ON CONFLICT (worker) DO UPDATE SET versions = EXCLUDED.versions, seen_at = now()
"""
_LIVE = "SELECT versions FROM alert_workers WHERE seen_at > now() - make_interval(secs => $1)"
_GONE = "DELETE FROM alert_workers WHERE worker = $1 OR seen_at < now() - make_interval(secs => $2)"


class Versioned(Protocol):
    """A rule, or the value rules judged together (ingest.alerts.model.ValueRules, name "*value")."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


def worker_name(client_id: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{client_id}"[:200]


class Versions:
    def __init__(self, worker: str, started_at: datetime) -> None:
        self.worker = worker
        self.started_at = started_at
        self.ready = False  # a first beat has been read
        self._live: dict[str, frozenset[str]] = {}  # rule -> the versions live workers hold
        self._logged: set[tuple[str, str, str, str]] = set()

    async def beat(self, conn: Conn, rules: Sequence[Versioned]) -> None:
        """Write this worker's versions and read every live worker's (this one's included)."""
        await conn.execute(_BEAT, self.worker, json.dumps({r.name: r.version for r in rules}), self.started_at)
        live: dict[str, set[str]] = {}
        for (raw,) in await conn.fetch(_LIVE, LIVE):
            held = json.loads(raw) if isinstance(raw, str) else raw
            for name, version in (held or {}).items():
                live.setdefault(name, set()).add(str(version))
        self._live = {name: frozenset(vs) for name, vs in live.items()}
        self.ready = True

    async def leave(self, conn: Conn) -> None:
        """At a clean stop: this worker's row goes (and those of workers long gone)."""
        await conn.execute(_GONE, self.worker, LIVE * 10)

    def decide(self, rule: Versioned, stored: str | None) -> bool:
        """True: this worker judges the series (see the module's docstring)."""
        mine = rule.version
        if stored is None or stored == mine:
            return True
        if not self.ready:
            return False
        held = self._live.get(rule.name, frozenset())
        if stored not in held:
            self._once("take", rule.name, stored, mine, "rule %s: its series judged by version %s, which no live "
                       "worker holds any more, are now judged by this worker's version %s")
            return True
        self._once("defer", rule.name, stored, mine, "rule %s: its series judged by version %s are left to the "
                   "worker that still holds it, until every worker has this worker's version %s (reload them all)")
        return False

    def blocking(self, rule: Versioned) -> str:
        """The stored versions that keep this worker off a series of ``rule``, for the evaluator's claim
        (the same decision as ``decide``, in SQL): "*" any other than its own (no beat read yet), else
        the other versions, comma-separated, that live workers hold ("" none)."""
        if not self.ready:
            return "*"
        return ",".join(sorted(self._live.get(rule.name, frozenset()) - {rule.version}))

    def _once(self, what: str, rule: str, old: str, new: str, text: str) -> None:
        key = (what, rule, old, new)
        if key not in self._logged:
            self._logged.add(key)
            log.info(text, rule, old, new)
