"""Workers that drain a backlog together judge what one worker judges.

The problem. With several workers on a shared subscription, the broker holds part of every device's
queue for each worker's session while they are away (Mosquitto queues a shared subscription's
messages for a member that is offline with its session). After an outage each worker drains its own
part at its own pace, so the readings of one series reach the database out of event-time order by
far more than alerts.lateness: one worker's stored readings of a series are minutes newer than
readings the other still has to fetch. Judged past them, those would come late (stored, not judged).

The rule. Each worker says, several times a second, whether it has **caught up** (``CatchUp``): it is
connected, and every message it received while the broker may still have held a backlog for it is
committed. Such a backlog is possible from a CONNACK that resumed a session until BURST seconds after
it (a backlog smaller than the receive window arrives at once), and while the receive window is full
(the broker has more than the window) until BURST seconds after it last was. A worker that is not
connected has a queue growing at the broker, so it has not caught up either.

Each worker writes its state to alert_sessions (``Sessions.beat``): seen_at (its clock),
caught_up_at (its clock at its last write while caught up; for the operator) and behind_since. From
the rows of all the workers it computes the **floor** (``floor_of``): EPOCH while any worker has not
caught up (nothing is judged: the series wait, due, and the no-data job waits too), None when all
have. Judged up to where the one behind was last caught up, the series would be judged in order only
if nothing it fetches were older than that; a gateway that uploads what it stored while it was cut
off (or a device whose clock is behind) sends exactly that, so nothing is judged. The series are
judged once all of it is stored. A worker counts as not caught up when:
- its row says so (alive, seen_at within ``stale`` seconds) and it has been behind for at most
  ``wait`` seconds (alerts.catch_up_wait): one behind for longer is judged without (logged), so that an
  overloaded worker, whose window is always full, does not stop every alert;
- its row has not been written for ``stale`` seconds (it died, or hangs: its session keeps
  queueing), for at most ``wait`` seconds since it was last seen or since this worker started;
- it is a worker of this supervisor (``siblings``: the client ids of `run --workers N`) with no row
  yet, for at most ``wait`` seconds after this worker's start: at a start after an outage, the first
  worker up must not judge past what the others' sessions hold.
This worker itself counts like the others: what its own session holds is older than the others'
newest readings. Alone too, though it could judge in its own arrival order: judged in the batch, a
backlog's readings cost the drain a judgement per batch and series (one worker's drain of 5-reading
messages with 20 rules took a quarter longer, BENCHMARKS.md), and the alerts of a backlog's newest
readings come at its end either way. A worker that stops marks its row stopped (``stopped``): the
broker goes on queueing its share, so its siblings wait for it (a supervisor restarts it, or a
restart of them all brings it back); any other worker does not (a replica scaled down, a run with
another client id: waiting would hold every alert for the wait). Rows are
``stale`` after alerts.lateness without a beat (at least two beats; beats come every lateness / 4,
0.1 to 1 s): a worker that hangs right after a beat is noticed before the others' watermark (the
clock minus the lateness) passes that beat (with a lateness under 0.2 s, up to 0.2 s later).

Until its first beat is read a worker judges nothing (floor EPOCH); so after a failed beat, until
the next succeeds; beats that fail for longer than ``wait`` stop that (judging goes on, logged). The
floor lowers the watermark only: it can delay a judgement, never judge early.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = ["BURST", "EPOCH", "CatchUp", "Session", "Sessions", "floor_of"]

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # a floor before every storable reading: nothing is judged
BURST = 1.0  # seconds after a resumed CONNACK, or a full window, within which a backlog may still arrive

# One round trip: write this worker's row and read every row (the CTE's write is not visible to the
# outer scan, so this worker's row comes from RETURNING).
_BEAT = """
WITH mine AS (
    INSERT INTO alert_sessions AS s (client_id, seen_at, caught_up_at, behind_since)
    VALUES ($1, $2::timestamptz, CASE WHEN $3::bool THEN $2::timestamptz END,
            CASE WHEN $3::bool THEN NULL ELSE $2::timestamptz END)
    ON CONFLICT (client_id) DO UPDATE SET seen_at = EXCLUDED.seen_at, stopped_at = NULL,
        caught_up_at = CASE WHEN $3 THEN EXCLUDED.seen_at ELSE s.caught_up_at END,
        behind_since = CASE WHEN $3 THEN NULL ELSE coalesce(s.behind_since, EXCLUDED.seen_at) END
    RETURNING client_id, seen_at, caught_up_at, behind_since, stopped_at
)
SELECT client_id, seen_at, caught_up_at, behind_since, stopped_at FROM alert_sessions WHERE client_id <> $1
UNION ALL SELECT * FROM mine
"""
# At a stop: the broker goes on queueing this session's share, so the worker is behind from now on.
_STOPPED = """
UPDATE alert_sessions SET seen_at = $2, stopped_at = $2, behind_since = coalesce(behind_since, $2)
WHERE client_id = $1
"""


class CatchUp:
    """This worker's side: fed by the MQTT bridge, read by ``caught_up`` (monotonic clock)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self.up = False  # connected (CONNACK accepted)
        self.until = math.inf  # messages that arrived before this may be a backlog's

    def connected(self, resumed: bool) -> None:
        self.up = True
        now = self._monotonic()
        self.until = now + BURST if resumed else now

    def disconnected(self) -> None:
        self.up = False
        self.until = math.inf

    def window_full(self) -> None:
        self.until = max(self.until, self._monotonic() + BURST)

    def caught_up(self, oldest_unacked: float | None) -> bool:
        """``oldest_unacked``: the monotonic arrival of the oldest message not yet acknowledged (None: none)."""
        if not self.up or self._monotonic() < self.until:
            return False
        return oldest_unacked is None or oldest_unacked >= self.until


@dataclass(frozen=True, slots=True)
class Session:
    client_id: str
    seen_at: datetime
    caught_up_at: datetime | None
    behind_since: datetime | None
    stopped_at: datetime | None = None


def floor_of(rows: Iterable[Session], me: str, siblings: Sequence[str], now: datetime, started: datetime, *,
             stale: float, wait: float) -> tuple[datetime | None, dict[str, str], dict[str, str]]:
    """(the floor or None, the workers held for -> why, the workers no longer waited for -> why), as
    the module's docstring says."""
    stale_d, wait_d = timedelta(seconds=stale), timedelta(seconds=wait)
    held: dict[str, datetime] = {}
    why: dict[str, str] = {}
    given_up: dict[str, str] = {}
    mine: Session | None = None
    seen: set[str] = set()
    for r in rows:
        seen.add(r.client_id)
        if r.client_id == me:
            mine = r
            continue
        if r.stopped_at is not None and r.client_id not in siblings:
            continue  # stopped on purpose, and no worker of this supervisor: not coming back as one of us
        fresh = r.stopped_at is None and now - r.seen_at <= stale_d
        if fresh and r.behind_since is None:
            continue
        if fresh:
            assert r.behind_since is not None
            since, text = r.behind_since, "catching up"
        elif r.stopped_at is not None:
            since, text = max(r.stopped_at, started), "stopped"
        elif now - r.seen_at <= wait_d or r.client_id in siblings:
            since, text = max(r.seen_at, started), f"not seen for {(now - r.seen_at).total_seconds():.0f}s"
        else:
            continue  # gone long ago
        if now - since > wait_d:
            given_up[r.client_id] = text
            continue
        held[r.client_id] = EPOCH
        why[r.client_id] = text
    for sibling in siblings:
        if sibling != me and sibling not in seen:
            if now - started > wait_d:
                given_up[sibling] = "not started"
            else:
                held[sibling], why[sibling] = EPOCH, "not started yet"
    if mine is not None and mine.behind_since is not None:
        if now - mine.behind_since <= wait_d:
            held[me], why[me] = EPOCH, "catching up"
        else:
            given_up[me] = "catching up"
    return (min(held.values()) if held else None), why, given_up


class Sessions:
    """This worker's beat and the floor it reads. ``oldest_unacked()``: the bridge's oldest unacknowledged
    arrival; ``siblings``: the client ids of this supervisor's workers (empty: not run by one)."""

    def __init__(self, client_id: str, catchup: CatchUp, oldest_unacked: Callable[[], float | None], *,
                 siblings: Sequence[str] = (), wait: float = 600.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.client_id = client_id
        self.catchup = catchup
        self.oldest_unacked = oldest_unacked
        self.siblings = tuple(siblings)
        self.wait = wait
        self.clock = clock
        self.started = clock()
        self.floor: datetime | None = EPOCH  # until a beat is read: judge nothing
        self.held_since: float | None = time.monotonic()  # since when a floor has held judging back
        self._holding: dict[str, str] = {}
        self._given_up: set[str] = set()

    def floor_now(self) -> datetime | None:
        return self.floor

    async def beat(self, conn: Conn, stale: float) -> None:
        now = self.clock()
        caught = self.catchup.caught_up(self.oldest_unacked())
        rows = [Session(*r) for r in await conn.fetch(_BEAT, self.client_id, now, caught)]
        floor, holding, given_up = floor_of(rows, self.client_id, self.siblings, now, self.started,
                                            stale=stale, wait=self.wait)
        self._set(floor)
        self._log(holding, given_up)

    def _set(self, floor: datetime | None) -> None:
        self.floor = floor
        if floor is None:
            self.held_since = None
        elif self.held_since is None:
            self.held_since = time.monotonic()

    def held_for(self) -> float:
        """Seconds since judging has been held back (0: it is not)."""
        return 0.0 if self.held_since is None else time.monotonic() - self.held_since

    def failed(self) -> None:
        """A beat failed: what the others do is unknown, judge nothing until the next one succeeds."""
        self._set(EPOCH)

    async def stopped(self, conn: Conn) -> None:
        """At a stop: its row says behind since now (its session keeps the group's share coming), so the
        others judge nothing until it is back and caught up, for at most the wait."""
        await conn.execute(_STOPPED, self.client_id, self.clock())

    def _log(self, holding: dict[str, str], given_up: dict[str, str]) -> None:
        if holding.keys() != self._holding.keys():
            if holding:
                log.info("alerts: judging waits for worker(s) %s to catch up (%s): a backlog their sessions hold "
                         "is judged once it is stored", ", ".join(sorted(holding)),
                         "; ".join(f"{k}: {v}" for k, v in sorted(holding.items())))
            else:
                log.info("alerts: every worker has caught up; judging goes on")
        self._holding = holding
        for k in given_up.keys() - self._given_up:
            log.warning("alerts: no longer waiting for worker %s (%s, longer than alerts.catch_up_wait = %.0fs): "
                        "judging goes on without it; what it still brings is stored, but may come late for its "
                        "series (alert_readings_late_total)", k, given_up[k], self.wait)
        self._given_up = set(given_up)
