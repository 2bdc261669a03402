"""Workers hold no state of their own: two processes share one MQTT v5 shared subscription.

What Mosquitto 2.0.11 does with a member that goes away (tests below): it keeps routing the member
its share of the group's messages (round robin, whether it is connected or not), and those it sent
and those it queues stay in that member's session. Restarted with its client id before the session
expires, the member gets them all again; the other member never does. Once the session expires
they are gone with it, and a member that comes back after that starts a new, empty session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.harness import (
    IngestProcess,
    Publisher,
    count,
    fleet,
    native,
    publish_acked,
    stored_readings,
    write_config,
)
from tests.integration.test_pipeline import T0
from tests.proxy import FaultProxy
from tests.services import Mosquitto, wait_until

HANG = 120  # seconds: a bound on a hang only
RECEIVED = "sensor_ingest_messages_received_total"
ACKED = "sensor_ingest_messages_acked_total"
CONFLICT_BATCHES = "sensor_ingest_conflict_batches_total"  # batches holding redelivered messages


def test_two_workers_in_a_shared_group_store_everything_once(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    workers = []
    for i in range(2):
        cfg = write_config(tmp_path / f"w{i}.toml", prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url)
        cfg.write_text(
            cfg.read_text().replace("keepalive = 10\n", f'keepalive = 10\nshared_group = "{topic_prefix}"\n')
        )
        workers.append(IngestProcess(cfg, tmp_path / f"w{i}.log"))
    try:
        for w in workers:
            w.start()
        messages, expected = fleet(topic_prefix, 4000, T0)
        pub = Publisher(broker.port)
        try:
            pub.publish_all(messages)
        finally:
            pub.close()
        wait_until(lambda: count(database_url, "readings") >= len(expected), 120, "every reading")
        assert stored_readings(database_url) == expected
        assert count(database_url, "readings") == len(expected)
        received = [w.metric("sensor_ingest_messages_received_total") for w in workers]
        assert sum(received) == len(messages)  # each message went to exactly one worker
        assert all(r > 0 for r in received)  # and both did work
        assert all("$share/" in w.log_path.read_text() for w in workers)
    finally:
        for w in workers:
            w.close()


@pytest.fixture
def workers() -> Iterator[list[IngestProcess]]:
    procs: list[IngestProcess] = []
    yield procs
    for p in procs:
        p.close()


def _two_workers(
    tmp_path: Path, workers: list[IngestProcess], database_url: str, broker: Mosquitto, prefix: str,
    make_proxy: Callable[[int], FaultProxy], session_expiry: int = 86400,
) -> tuple[IngestProcess, IngestProcess, FaultProxy]:
    """Worker 0 reaches the database through a proxy (so its commits can be stopped) and has
    ``session_expiry``; worker 1 is direct. Both started, in one shared group."""
    db = urlsplit(database_url)
    assert db.port is not None
    proxy = make_proxy(db.port)
    via_proxy = db._replace(netloc=f"{db.username}@127.0.0.1:{proxy.port}").geturl()
    # keepalive 60: the held worker suspends its broker connection only after 30 s without a
    # commit, long after it has been killed here; until then it holds its messages in flight.
    for i, (url, expiry) in enumerate([(via_proxy, session_expiry), (database_url, 86400)]):
        cfg = write_config(tmp_path / f"w{i}.toml", prefix=prefix, database_url=url, mqtt_url=broker.url,
                           keepalive=60, mqtt_extra=f'shared_group = "{prefix}"\nsession_expiry = {expiry}',
                           database_extra="connect_timeout = 2")
        workers.append(IngestProcess(cfg, tmp_path / f"w{i}.log"))
    for w in workers:
        w.start()
    return workers[0], workers[1], proxy


def _hold_then_kill(w0: IngestProcess, w1: IngestProcess, proxy: FaultProxy, broker: Mosquitto,
                    messages: list[tuple[str, bytes]], database_url: str) -> int:
    """Stop worker 0's commits, publish, and SIGKILL worker 0 while it holds its share of the
    messages unacknowledged; worker 1 has committed its own share. Returns how many were held."""
    proxy.mode = "refuse"
    publish_acked(broker.port, messages)
    wait_until(lambda: w0.metric(RECEIVED) + w1.metric(RECEIVED) == len(messages), HANG, "every message received")
    wait_until(lambda: w1.metric(ACKED) == w1.metric(RECEIVED), HANG, "worker 1 to commit its share")
    held = int(w0.metric(RECEIVED))
    assert held > 0
    assert w0.metric(ACKED) == 0
    assert count(database_url, "readings") == 2 * (len(messages) - held)
    w0.kill()
    proxy.mode = "pass"
    return held


def test_a_worker_killed_and_restarted_with_its_client_id_gets_its_unacknowledged_messages_again(
    tmp_path: Path, workers: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy],
) -> None:
    messages, expected = fleet(topic_prefix, 4000, T0)
    first, rest = messages[:2000], messages[2000:]
    w0, w1, proxy = _two_workers(tmp_path, workers, database_url, broker, topic_prefix, make_proxy)
    held = _hold_then_kill(w0, w1, proxy, broker, first, database_url)
    w1_before = w1.metric(RECEIVED)

    # While worker 0 is dead, the group goes on: the broker keeps routing worker 0 its share,
    # queued in its session.
    publish_acked(broker.port, rest)
    w0.start()  # the same config: the same client id, so the same session
    wait_until(lambda: count(database_url, "readings") >= len(expected), HANG, "every reading")
    assert stored_readings(database_url) == expected
    assert count(database_url, "readings") == len(expected)
    assert count(database_url, "rejected_messages") == 0

    # Worker 0's held messages went back to worker 0 (marked redelivered), never to worker 1:
    # worker 1 received only its share of the rest, and worker 0 everything else, held ones again.
    wait_until(lambda: w0.metric(ACKED) + w1.metric(ACKED) == len(messages), HANG, "every message acknowledged")
    again = w0.metric(RECEIVED)
    assert again >= held
    assert (w1.metric(RECEIVED) - w1_before) + again == len(rest) + held
    assert w1.metric(RECEIVED) - w1_before < len(rest)  # some of the rest was queued for worker 0
    assert w0.metric(CONFLICT_BATCHES) >= 1
    assert w1.metric(CONFLICT_BATCHES) == 0


def test_a_worker_stopped_gracefully_still_gets_its_share_queued_until_it_returns(
    tmp_path: Path, workers: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy],
) -> None:
    """A clean stop (SIGTERM: commit, acknowledge, DISCONNECT) keeps the session, and with it the
    worker's place in the group: Mosquitto goes on routing it its share, which waits in the session
    for its return (or is lost when the session expires). Stopping a worker for good loses its share
    of what arrives in the next mqtt.session_expiry seconds."""
    messages, expected = fleet(topic_prefix, 400, T0)
    w0, w1, _ = _two_workers(tmp_path, workers, database_url, broker, topic_prefix, make_proxy)
    assert w0.terminate() == 0
    publish_acked(broker.port, messages)
    w0.start()
    wait_until(lambda: count(database_url, "readings") >= len(expected), HANG, "every reading")
    assert stored_readings(database_url) == expected
    assert w1.metric(RECEIVED) < len(messages)
    assert w0.metric(RECEIVED) + w1.metric(RECEIVED) == len(messages)  # the rest waited for worker 0


def test_a_worker_that_stays_away_past_its_session_expiry_loses_its_unacknowledged_messages(
    tmp_path: Path, workers: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy],
) -> None:
    """Mosquitto 2.0.11: the messages in an expired member's session are not handed to the other
    member of the group; they are dropped with the session. Operators: a worker that stays away
    longer than mqtt.session_expiry loses its share of the stream since it left."""
    messages, expected = fleet(topic_prefix, 2400, T0)
    first, away, after = messages[:2000], messages[2000:2200], messages[2200:]
    w0, w1, proxy = _two_workers(tmp_path, workers, database_url, broker, topic_prefix, make_proxy,
                                 session_expiry=3)
    client_id = w0.config.read_text().split('client_id = "', 1)[1].split('"', 1)[0]
    held = _hold_then_kill(w0, w1, proxy, broker, first, database_url)
    w1_before = w1.metric(RECEIVED)

    broker_log = broker.dir / "mosquitto.log"
    expired = f"Expiring client {client_id} due to timeout."
    publish_acked(broker.port, away)  # while worker 0's session still lives
    assert expired not in broker_log.read_text(), "the session expired before the messages were sent"
    wait_until(lambda: expired in broker_log.read_text(), HANG, "the broker to expire worker 0's session")
    w1_away = w1.metric(RECEIVED) - w1_before
    assert w1_away < len(away)  # some went to worker 0's session, which then expired

    # After the expiry the group has one member, which gets every message.
    w1_before = w1.metric(RECEIVED)
    publish_acked(broker.port, after)
    wait_until(lambda: w1.metric(RECEIVED) - w1_before == len(after), HANG, "worker 1 to take every new message")

    # Worker 0 back with its client id: a new, empty session; nothing of the old one comes back.
    # Two sentinels published after it subscribed: once both are stored, anything the session
    # still held would have been delivered before them.
    w0.start()
    sentinels = [(f"{topic_prefix}/hn-aq-s{i}/up", native(f"hn-aq-s{i}", T0.isoformat(), {"pm25": 1.0}))
                 for i in range(2)]
    sentinel_readings = {(f"hn-aq-s{i}", "pm25", T0.isoformat(), 1.0) for i in range(2)}
    publish_acked(broker.port, sentinels)
    wait_until(lambda: sentinel_readings <= stored_readings(database_url), HANG, "the sentinels")
    assert w0.metric(RECEIVED) <= len(sentinels)  # nothing was redelivered to it
    assert w0.metric(CONFLICT_BATCHES) == 0
    assert w1.metric(CONFLICT_BATCHES) == 0  # nor to worker 1

    stored = stored_readings(database_url) - sentinel_readings
    assert stored <= expected
    lost = expected - stored
    lost_messages = {(device, t) for device, _, t, _ in lost}
    assert len(lost) == 2 * len(lost_messages)  # whole messages, both readings of each
    assert len(lost_messages) == held + len(away) - w1_away


def test_a_session_from_before_the_shared_group_does_not_get_every_message_once_more(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    """One process ran without mqtt.shared_group (its session holds the plain filters); then it is
    worker 1 of a group with the same client id. The bridge unsubscribes the plain filters of the
    resumed session: each message reaches one worker once, not worker 1 a second time."""
    alone = write_config(tmp_path / "alone.toml", prefix=topic_prefix, database_url=database_url,
                         mqtt_url=broker.url)
    single = IngestProcess(alone, tmp_path / "alone.log")
    try:
        single.start()
    finally:
        single.close()  # a graceful stop: the session and its plain subscription stay at the broker
    workers = []
    for i in range(2):
        cfg = write_config(tmp_path / f"w{i}.toml", prefix=topic_prefix, database_url=database_url,
                           mqtt_url=broker.url)
        text = cfg.read_text().replace("keepalive = 10\n", f'keepalive = 10\nshared_group = "{topic_prefix}"\n')
        # Worker 1 keeps the single process's id, worker 2 has its own (as `run --workers 2` names them).
        own = _client_id(alone) + ("-2" if i else "")
        cfg.write_text(text.replace(f'client_id = "{_client_id(cfg)}"', f'client_id = "{own}"'))
        workers.append(IngestProcess(cfg, tmp_path / f"w{i}.log"))
    assert _client_id(tmp_path / "w0.toml") == _client_id(alone) != _client_id(tmp_path / "w1.toml")
    try:
        for w in workers:
            w.start()
        messages, expected = fleet(topic_prefix, 1000, T0)
        pub = Publisher(broker.port)
        try:
            pub.publish_all(messages)
        finally:
            pub.close()
        wait_until(lambda: count(database_url, "readings") >= len(expected), HANG, "every reading")
        wait_until(lambda: sum(w.metric(ACKED) for w in workers) >= len(messages), HANG, "every acknowledgement")
        received = [w.metric(RECEIVED) for w in workers]
        assert sum(received) == len(messages), received  # once each: no second copy for the old plain filter
        assert all(r > 0 for r in received)
        assert stored_readings(database_url) == expected
    finally:
        for w in workers:
            w.close()


def _client_id(config: Path) -> str:
    for line in config.read_text().splitlines():
        if line.strip().startswith("client_id"):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError(f"no client_id in {config}")
