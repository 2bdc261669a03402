"""The evaluator: each worker's timer that judges what batches could not judge yet.

Every ``tick`` seconds (a quarter of alerts.lateness, between 0.1 s and 1 s), in one transaction:
the series whose due_at the watermark (the clock minus alerts.lateness; less while a worker catches up
a backlog, ingest.alerts.catchup) has passed, of the rules this
worker holds, up to CLAIM of them, are taken with FOR UPDATE SKIP LOCKED in the stage's sorted order
(a series a batch or another worker holds now is left for the next tick: no wait, no deadlock) and
judged from the stored rows by the stage's own ``judge_locked``; a full claim is followed at once by
another. Then the no-data job: under pg_try_advisory_xact_lock(LOCK_KEY), so that one worker of
many runs each round, the series of no_data rules that fire nothing, wait for nothing and whose last
reading is older than the watermark minus the rule's duration, and from which nothing has arrived
for that long either (a device whose clock runs behind is not silent while it reports), are taken the
same way and judged silent. Silences are first judged a grace after the start
(alerts.no_data_grace, default the longest no_data duration, as the rules were then: a reload
during the grace does not lengthen it), and again after the service stopped taking messages
(``ready()`` false, or rounds failing: the broker or the database away), for as long as it was away,
at most that grace: what the broker kept for it is written first, so a device whose readings were
only held up by the outage is not paged for.

Every BEAT_EVERY seconds (and after a reload) the worker writes the versions of the rules it holds
(ingest.alerts.versions) and reads those of the live workers. A failure of a round (the database
away, a deadlock) is logged once and the round is tried again at the next tick: the due_at of the
series stays, nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ingest.alerts.evaluate import clock_window
from ingest.alerts.model import VALUES, Rule, ValueRules
from ingest.alerts.runtime import RuleSet
from ingest.alerts.stage import _COLUMNS, AlertStage, Key, Locked, StageResult, _locked
from ingest.alerts.versions import BEAT_EVERY, Versions
from ingest.store.classify import describe

if TYPE_CHECKING:
    import asyncpg

__all__ = ["CLAIM", "LOCK_KEY", "Evaluator", "tick_of"]

log = logging.getLogger(__name__)

LOCK_KEY = 7215160004  # pg_try_advisory_xact_lock key of the no-data job
CLAIM = 2000  # series per transaction

# The series of the rules this worker holds, except those another version keeps (Versions.blocking:
# r.mine its version, r.blocking "*" or the versions that keep it off): a claim never returns a
# series the worker would leave, so a full claim always makes progress.
_MINE = """(s.version IS NULL OR s.version = r.mine OR (r.blocking <> '*'
    AND NOT s.version = ANY(string_to_array(r.blocking, ','))))"""
# A clock window rule's series from which a reading arrived within the lateness (seen_at after the
# watermark) waits: the window holding its latest reading is judged once its readings stop arriving,
# or once a reading of a later window waits too (due_to at or after the due window's end).
_DUE = f"""
SELECT {_COLUMNS}
FROM alert_state s JOIN unnest($2::text[], $3::text[], $4::text[], $6::bool[]) AS r(name, mine, blocking, clock)
  ON s.rule = r.name
WHERE s.due_at <= $1 AND {_MINE}
  AND (NOT r.clock OR s.seen_at IS NULL OR s.seen_at <= $1 OR s.due_to >= s.due_at)
ORDER BY s.rule, s.device_id, s.metric_id
LIMIT $5
FOR UPDATE OF s SKIP LOCKED
"""
_SILENT = f"""
SELECT {_COLUMNS}
FROM alert_state s JOIN unnest($2::text[], $3::text[], $4::text[], $5::float8[]) AS r(name, mine, blocking, gap)
  ON s.rule = r.name
WHERE s.status = 'ok' AND s.due_at IS NULL AND s.last_time < $1::timestamptz - make_interval(secs => r.gap)
  AND (s.seen_at IS NULL OR s.seen_at < $7::timestamptz - make_interval(secs => r.gap))
  AND {_MINE}
ORDER BY s.rule, s.device_id, s.metric_id
LIMIT $6
FOR UPDATE OF s SKIP LOCKED
"""


def tick_of(lateness: float) -> float:
    """Seconds between the evaluator's rounds (and the catch-up beats): a quarter of the lateness, 0.1 to 1."""
    return min(1.0, max(0.1, lateness / 4))


class Evaluator:
    """``pool()``: the writer's current pool; ``on_result``: counts what a round recorded (metrics)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool], stage: AlertStage, versions: Versions, *,
                 on_result: Callable[[StageResult], None] = lambda _: None,
                 monotonic: Callable[[], float] = time.monotonic,
                 ready: Callable[[], bool] = lambda: True) -> None:
        """``ready()``: the service takes and stores messages now (broker connected, database
        answering); while it does not, the grace of the no-data job starts again."""
        self.pool = pool
        self.stage = stage
        self.versions = versions
        self.on_result = on_result
        self._monotonic = monotonic
        self._ready = ready
        self.started = monotonic()  # the start, or the end of the last outage: the grace counts from here
        self.grace = stage.runtime.active.grace  # fixed when it starts: a reload does not lengthen it
        self._away_since: float | None = None  # when the service stopped taking messages (None: it takes them)
        self._beat_at = 0.0
        self.stage.runtime.on_change(lambda _active: self._beat_soon())

    def _beat_soon(self) -> None:
        self._beat_at = 0.0

    @property
    def tick(self) -> float:
        return tick_of(self.stage.runtime.active.lateness)

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        failing = False
        while True:
            try:
                p = self.pool()
                if not p.is_closing():
                    async with p.acquire(timeout=30) as conn:
                        await asyncio.wait_for(self.round(conn), 120)
                if failing:
                    log.info("alerts: the evaluator runs again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._away()  # the database away, most likely: the no-data grace starts again once it is back
                if not failing:
                    log.warning("alerts: an evaluator round failed (%s); retrying every %.1fs", describe(exc),
                                self.tick)
                failing = True
            await sleep(self.tick)

    async def round(self, conn: asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[
            asyncpg.Record]) -> StageResult:
        """One round: the beat if due, every due series, then the no-data job if past the grace."""
        total = StageResult()
        active = self.stage.runtime.active
        now = self._monotonic()
        if not self._ready():
            self._away()
        elif self._away_since is not None:
            # Back. What the broker kept meanwhile is written first: no silence is judged for as long
            # as the service was away, up to the no-data grace. A device cannot have become silent for
            # longer than the outage through the outage alone, so a blip costs a blip.
            # The grace of a start still running (the broker connected a moment after the start) is
            # never shortened by it.
            away = now - self._away_since
            until = max(self.started + self.grace, now + min(active.grace, away))
            self.started, self.grace, self._away_since = now, until - now, None
            if away >= 1.0:
                log.info("alerts: the service takes messages again after %.0fs; no silence is judged for %.0fs more",
                         away, self.grace)
        if now >= self._beat_at:
            await self.versions.beat(conn, active.versioned)
            self._beat_at = now + BEAT_EVERY
        while True:  # the due series, CLAIM at a time, each claim with the rule set of that moment
            active = self.stage.runtime.active
            if not active.rules:
                return total
            result = StageResult()
            # The value rules' series are their VALUES rows (ingest.alerts.model.ValueRules).
            claim: list[Rule | ValueRules] = [r for r in active.rules if r.signal != "value"]
            if active.values.rules:
                claim.append(active.values)
            async with conn.transaction():
                to = self.stage.watermark(active, self.stage.clock())
                claimed = await conn.fetch(_DUE, to, [r.name for r in claim], [r.version for r in claim],
                                           [self.versions.blocking(r) for r in claim], CLAIM,
                                           [isinstance(r, Rule) and clock_window(r) for r in claim])
                await self._judge(conn, active, claimed, result, silent=False)
            self._count(result, total)
            if len(claimed) < CLAIM or result.judged + result.dropped <= result.stuck:  # done, or no progress
                break
        if self._away_since is not None or now - self.started < self.grace:  # away, or within the grace
            return total
        while True:
            active = self.stage.runtime.active
            silent = [r for r in active.rules if r.signal == "no_data"]
            if not silent:
                break
            result = StageResult()
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_KEY):
                    break
                clock = self.stage.clock()
                claimed = await conn.fetch(_SILENT, self.stage.watermark(active, clock), [r.name for r in silent],
                                           [r.version for r in silent], [self.versions.blocking(r) for r in silent],
                                           [r.threshold for r in silent], CLAIM, clock)
                await self._judge(conn, active, claimed, result, silent=True)
            self._count(result, total)
            if len(claimed) < CLAIM or result.judged + result.dropped <= result.stuck:
                break
        return total

    async def _judge(self, conn: asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[
            asyncpg.Record], active: RuleSet, claimed: list[asyncpg.Record], result: StageResult, *,
            silent: bool) -> None:
        if not claimed:
            return
        rules = {r.name: r for r in active.rules}
        locked: dict[Key, Locked] = {(r["rule"], r["device_id"], r["metric_id"]): _locked(r) for r in claimed
                                     if r["rule"] in rules or r["rule"] == VALUES}
        devices = await self.stage.devices(conn, {k[1] for k in locked})
        await self.stage.judge_locked(conn, active, rules, locked, devices, result, silent=silent)

    def _away(self) -> None:
        if self._away_since is None:
            self._away_since = self._monotonic()
            log.info("alerts: the service is not taking messages (broker or database away); no silence is judged "
                     "until it has been back for as long as it was away (at most the no-data grace)")

    def _count(self, result: StageResult, total: StageResult) -> None:
        if result.events or result.deferred or result.uncovered:
            self.on_result(result)
        total.events.update(result.events)
        for name in ("notified", "outbox", "silenced", "deferred", "uncovered", "judged", "dropped", "stuck"):
            setattr(total, name, getattr(total, name) + getattr(result, name))
