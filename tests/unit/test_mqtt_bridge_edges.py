"""MqttBridge at packet orders Mosquitto will not produce on demand, against a scripted broker peer.

tests/mqtt_script.py is a real TCP server on loopback that speaks just enough MQTT 5 to place a
PUBLISH before the SUBACK, alongside the CONNACK, or right before a hang-up. A message here
"commits" the moment it arrives: its sink schedules ``bridge.ack`` with ``loop.call_soon``, so the
acknowledgement is asked for before the bridge has finished connecting.
"""

from __future__ import annotations

import asyncio
import select
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from ingest.model import RawMessage
from ingest.mqtt import MqttBridge
from ingest.settings import MqttSettings
from tests.mqtt_script import Publish, ScriptedBroker
from tests.services import until as _until

FLOOD = "inbox full"  # the reason the pipeline's pause/resume should give (service.py wires it)


def _settings(broker: ScriptedBroker) -> MqttSettings:
    return MqttSettings(url=broker.url, client_id="edge-" + uuid.uuid4().hex[:8], receive_maximum=10,
                        keepalive=30, reconnect_min=0.1, reconnect_max=0.5, connect_timeout=10)




async def _loop_turns(n: int = 50) -> None:
    """Give every callback the loop has (or will have at once) its chance to run."""
    for _ in range(n):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


class _Running:
    """A real MqttBridge, run() as a task, and the acknowledgements its sink asked for."""

    def __init__(self, broker: ScriptedBroker, *, commit_at_once: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.received: list[RawMessage] = []
        self.acks: list[tuple[int, int]] = []  # (what ack() returned, tracker.unacked right after)
        self.commit_at_once = commit_at_once
        self.bridge = MqttBridge(_settings(broker), ["edge/#"], self._sink)
        self.task: asyncio.Task[None] | None = None

    def _sink(self, msg: RawMessage) -> None:
        self.received.append(msg)
        if self.commit_at_once:
            self.loop.call_soon(self._commit, msg)

    def _commit(self, msg: RawMessage) -> None:
        sent = self.bridge.ack(msg.epoch, [msg.seq])
        self.acks.append((sent, self.bridge.tracker.unacked))

    def socket_has_bytes(self) -> bool:
        # Private on purpose: the test must know a packet waits in the socket, unread.
        sock = self.bridge._sock
        return sock is not None and bool(select.select([sock], [], [], 0)[0])

    def peer_hung_up(self) -> bool:
        """The broker's FIN has reached the bridge's socket (so has all it sent before)."""
        sock = self.bridge._sock
        # Linux: tcpi_state, the first byte of TCP_INFO, is TCP_CLOSE_WAIT (8) once the FIN is in.
        return sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 8


Start = Callable[[ScriptedBroker, bool], Awaitable[_Running]]


@pytest_asyncio.fixture
async def start() -> AsyncIterator[Start]:
    """``await start(broker, commit_at_once)``: the broker listening and a bridge running against it.

    Afterwards the bridges stop (a clean DISCONNECT) before their brokers close.
    """
    started: list[tuple[ScriptedBroker, _Running]] = []

    async def _start(broker: ScriptedBroker, commit_at_once: bool) -> _Running:
        await broker.__aenter__()
        r = _Running(broker, commit_at_once=commit_at_once)
        started.append((broker, r))
        r.task = asyncio.create_task(r.bridge.run())
        return r

    yield _start
    for _, r in started:
        await r.bridge.stop()
        assert r.task is not None
        await asyncio.wait_for(r.task, 10)
    for broker, _ in started:
        await broker.close()


# ---- acknowledgements -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_message_committed_before_the_suback_of_a_new_session_is_acknowledged(
    start: Start,
) -> None:
    early = Publish("edge/early", b"1", qos=1, packet_id=7)
    broker = ScriptedBroker(before_suback=[early], hold_suback=True)
    r = await start(broker, True)

    await _until(lambda: r.acks, "the message sent ahead of the SUBACK did not arrive and commit")
    assert [m.mid for m in r.received] == [7]
    assert not r.bridge.connected, "the SUBACK is held: the bridge is not subscribed yet"
    assert broker.subacks_sent == 0

    broker.release_suback()
    await asyncio.wait_for(r.bridge.wait_ready(), 10)
    await _until(lambda: broker.pubacks, "the broker never got the PUBACK of the early message")
    assert broker.pubacks == [7]
    assert r.bridge.tracker.unacked == 0
    assert broker.connections == 1
    assert broker.problems == []


@pytest.mark.asyncio
async def test_a_message_that_comes_with_the_connack_of_a_resumed_session_is_acknowledged(
    start: Start,
) -> None:
    # The CONNACK and a message of the session in one TCP write: read in one go, the message is
    # handed over (and here committed) while the bridge is still taking in the CONNACK.
    held = Publish("edge/held", b"2", qos=1, packet_id=9)
    broker = ScriptedBroker(session_present=True, with_connack=[held])
    r = await start(broker, True)

    await asyncio.wait_for(r.bridge.wait_ready(), 10)
    await _until(lambda: broker.pubacks, "the broker never got the PUBACK of the session's message")
    assert broker.pubacks == [9]
    assert r.bridge.tracker.unacked == 0
    assert broker.connections == 1
    assert broker.problems == []


@pytest.mark.asyncio
@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="needs Linux TCP_INFO")
async def test_a_commit_after_the_socket_closed_claims_no_acknowledgement(
    start: Start,
) -> None:
    # The message commits after its connection's socket is gone but before the bridge has noticed:
    # no PUBACK can go out, so none may be counted, and the message stays unacknowledged (the
    # broker redelivers it).
    broker = ScriptedBroker()
    r = await start(broker, True)
    await asyncio.wait_for(r.bridge.wait_ready(), 10)

    # Both must be in the socket before the bridge reads: it then reads the PUBLISH and the EOF in
    # one go, and the commit (call_soon) comes after the socket closed, before run() notices.
    r.bridge.pause_reading()
    await broker.publish(Publish("edge/last", b"3", qos=1, packet_id=11), then_hang_up=True)
    await _until(r.peer_hung_up, "the broker's PUBLISH and FIN did not reach the bridge's socket")
    r.bridge.resume_reading()
    await _until(lambda: r.acks, "the message did not arrive and commit")
    assert r.acks == [(0, 1)]  # nothing sent; still one unacknowledged message
    await _until(lambda: broker.connections == 2 and r.bridge.connected, "the bridge did not reconnect")
    assert r.bridge.tracker.unacked == 0  # the new connection's epoch starts afresh
    assert broker.pubacks == []
    assert broker.problems == []


# ---- pausing ------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("first", "second"), [(FLOOD, "shutdown"), ("shutdown", FLOOD)])
async def test_each_pause_reason_holds_reading_until_it_is_released(
    start: Start, first: str, second: str
) -> None:
    broker = ScriptedBroker()
    r = await start(broker, False)
    bridge = r.bridge
    await asyncio.wait_for(bridge.wait_ready(), 10)

    bridge.pause_reading(FLOOD)  # the pipeline's inbox of QoS 0 messages passed twice the window
    bridge.pause_reading()  # then the service began to shut down (the old signature: "shutdown")
    await broker.publish(Publish("edge/late", b"4", qos=0))
    await _until(r.socket_has_bytes, "the PUBLISH did not reach the bridge's socket")

    bridge.resume_reading(first)  # e.g. the inbox drained below half the window
    await _loop_turns()
    assert r.received == [], f"reading resumed when only {first!r} was released"
    assert r.socket_has_bytes()
    assert bridge.reading_paused == {second}

    bridge.resume_reading(second)
    await _until(lambda: r.received, "reading did not resume when no reason held it any more")
    assert [m.topic for m in r.received] == ["edge/late"]
    assert bridge.reading_paused == frozenset()
    assert broker.problems == []


@pytest.mark.asyncio
async def test_pausing_twice_for_one_reason_is_released_by_one_resume(
    start: Start,
) -> None:
    # The pipeline pauses and resumes on edges, but a repeated pause must not need two resumes,
    # and a resume for a reason that holds nothing must not release another.
    broker = ScriptedBroker()
    r = await start(broker, False)
    bridge = r.bridge
    await asyncio.wait_for(bridge.wait_ready(), 10)

    bridge.pause_reading(FLOOD)
    bridge.pause_reading(FLOOD)
    bridge.resume_reading()  # "shutdown" holds nothing
    await broker.publish(Publish("edge/again", b"5", qos=0))
    await _until(r.socket_has_bytes, "the PUBLISH did not reach the bridge's socket")
    await _loop_turns()
    assert r.received == []

    bridge.resume_reading(FLOOD)
    await _until(lambda: r.received, "one resume did not release the reason paused twice")
    assert [m.topic for m in r.received] == ["edge/again"]
