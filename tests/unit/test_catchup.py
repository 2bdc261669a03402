"""ingest.alerts.catchup: when a worker has caught up, and the floor the workers' rows give."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ingest.alerts.catchup import BURST, EPOCH, CatchUp, Session, floor_of

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
STARTED = NOW - timedelta(seconds=60)
STALE, WAIT = 0.625, 600.0


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def live(cid: str) -> Session:
    return Session(cid, ago(0.1), ago(0.1), None)


def behind(cid: str, caught_up: float | None, since: float = 5.0) -> Session:
    return Session(cid, ago(0.1), None if caught_up is None else ago(caught_up), ago(since))


def floor(rows: list[Session], me: str = "a", siblings: tuple[str, ...] = ()) -> datetime | None:
    return floor_of(rows, me, siblings, NOW, STARTED, stale=STALE, wait=WAIT)[0]


def test_a_new_session_is_caught_up_once_connected_and_a_resumed_one_after_its_burst_is_committed() -> None:
    clock = Clock()
    c = CatchUp(clock)
    assert not c.caught_up(None)  # not connected yet: the broker queues for this session
    c.connected(resumed=False)
    assert c.caught_up(None)
    assert c.caught_up(clock.t)  # a message that came after the connect is live
    c.disconnected()
    assert not c.caught_up(None)
    c.connected(resumed=True)
    assert not c.caught_up(None)  # the session's backlog may still be arriving
    arrived = clock.t + 0.2
    clock.t += BURST + 0.1
    assert not c.caught_up(arrived)  # a message of the burst is not committed yet
    assert c.caught_up(clock.t)  # everything of the burst is; what is unacknowledged came after it
    assert c.caught_up(None)


def test_a_full_window_means_more_at_the_broker_until_a_burst_after_it_is_committed() -> None:
    clock = Clock()
    c = CatchUp(clock)
    c.connected(resumed=False)
    clock.t += 5
    c.window_full()
    arrived = clock.t + 0.5
    assert not c.caught_up(None)
    clock.t += BURST / 2
    c.window_full()  # full again: the broker still has more
    clock.t += BURST
    assert not c.caught_up(arrived)
    clock.t += 0.01
    assert c.caught_up(None)


def test_workers_that_have_caught_up_hold_nothing_and_a_lone_worker_behind_holds_itself() -> None:
    assert floor([live("a"), live("b")]) is None
    assert floor([live("a")]) is None
    # Alone, a worker could judge in its own arrival order; it waits until its backlog is stored
    # instead (a faster drain, the same events), for at most the wait.
    assert floor([behind("a", 30.0)]) == EPOCH
    assert floor([behind("a", None)]) == EPOCH
    assert floor([behind("a", None, since=WAIT + 1.0)]) is None


def test_while_any_worker_is_behind_this_one_included_nothing_is_judged() -> None:
    # Not up to where it was last caught up either: what it fetches may be older than that (a gateway
    # uploading what it stored while cut off).
    assert floor([live("a"), behind("b", 30.0)]) == EPOCH
    assert floor([behind("a", 40.0), behind("b", 30.0)]) == EPOCH
    # This worker behind, the other live: this one's session holds what is older than the other's readings.
    assert floor([behind("a", 40.0), live("b")]) == EPOCH
    assert floor([live("a"), behind("b", None)]) == EPOCH


def test_a_silent_worker_holds_judging_until_the_wait_since_it_was_seen() -> None:
    dead = Session("b", ago(5.0), ago(5.0), None)  # caught up when it died 5 s ago
    assert floor([live("a"), dead]) == EPOCH
    gone = Session("b", ago(WAIT + 5), ago(WAIT + 5), None)
    assert floor([live("a"), gone]) is None  # gone long before this worker started: not waited for
    # A sibling (a worker of this supervisor) is waited for from this worker's start, however old its row.
    held, why, given_up = floor_of([live("a"), gone], "a", ("a", "b"), NOW, STARTED, stale=STALE, wait=WAIT)
    assert held == EPOCH
    assert "b" in why
    assert not given_up
    later = NOW + timedelta(seconds=WAIT)
    held, why, given_up = floor_of([Session("a", later, later, None), gone], "a", ("a", "b"), later, STARTED,
                                   stale=STALE, wait=WAIT)
    assert held is None
    assert "b" in given_up


def test_a_sibling_not_started_yet_holds_everything_until_the_wait() -> None:
    assert floor([live("a")], siblings=("a", "b")) == EPOCH
    held, _, given_up = floor_of([live("a")], "a", ("a", "b"), STARTED + timedelta(seconds=WAIT + 1), STARTED,
                                 stale=STALE, wait=WAIT)
    assert held is None
    assert given_up == {"b": "not started"}


def test_a_worker_behind_for_longer_than_the_wait_is_judged_without() -> None:
    held, why, given_up = floor_of([live("a"), behind("b", 700.0, since=WAIT + 1)], "a", (), NOW, STARTED,
                                   stale=STALE, wait=WAIT)
    assert held is None
    assert not why
    assert given_up == {"b": "catching up"}
    assert floor([live("a"), behind("b", 700.0, since=WAIT - 1)]) == EPOCH
    # A wait of 0 turns the floor off.
    assert floor_of([live("a"), behind("b", 30.0)], "a", (), NOW, STARTED, stale=STALE, wait=0.0)[0] is None


def test_a_stopped_worker_is_waited_for_by_its_siblings_only() -> None:
    stopped = Session("b", ago(5.0), ago(5.1), ago(5.0), ago(5.0))  # a clean stop 5 s ago
    # A worker of the same supervisor: its session goes on taking its share, and it comes back.
    held, why, _ = floor_of([live("a"), stopped], "a", ("a", "b"), NOW, STARTED, stale=STALE, wait=WAIT)
    assert held == EPOCH
    assert why["b"] == "stopped"
    # Any other (a replica scaled down, a run under another client id): not coming back as one of these.
    assert floor([live("a"), stopped]) is None
    # A sibling stopped for longer than the wait is no longer waited for.
    later = NOW + timedelta(seconds=WAIT + 10)
    held, _, given_up = floor_of([Session("a", later, later, None), stopped], "a", ("a", "b"), later, STARTED,
                                 stale=STALE, wait=WAIT)
    assert held is None
    assert given_up == {"b": "stopped"}
