"""The MQTT bridge against a real Mosquitto: the Receive Maximum window holds whatever the broker does.

Mosquitto 2.0 does not keep to a client's Receive Maximum on a session it restored from its
persistence file: it sends one window when the client resumes the session, and then, for each
PUBACK, up to a further window (observed with 2.0.11 through the recording proxy: a window of 10,
one PUBACK, 20 PUBLISHes sent). The bridge must hold the bound itself, or a broker restart during a
database outage could hand the service the whole backlog at once.

The bridge talks to the broker through a recording proxy (tests/proxy.py), which shows what the
broker really sent and what the bridge acknowledged, packet by packet.
"""

from __future__ import annotations

import asyncio
import fcntl
import signal
import struct
import termios
import uuid
from collections.abc import Iterator

import pytest

from ingest.model import RawMessage
from ingest.mqtt import MqttBridge
from ingest.mqttwire import READ_AHEAD_MAX, READ_SIZE
from ingest.settings import MqttSettings
from tests.integration.harness import Publisher
from tests.proxy import CONNECT, PUBACK, PUBLISH, FaultProxy, puback_problems
from tests.services import Mosquitto
from tests.services import until as _until

WINDOW = 10
BACKLOG = 100
ACK_SIZES = (1, 1, 2, 3, 5, WINDOW)  # acknowledgements of 1 to a whole window, then windows to the end




def _unread(sock: object) -> int:
    """Bytes that wait in a socket's receive buffer, read by nobody yet."""
    fileno = sock.fileno()  # type: ignore[attr-defined]
    return int(struct.unpack("i", fcntl.ioctl(fileno, termios.FIONREAD, b"\0\0\0\0"))[0])


@pytest.fixture
def proxy(own_broker: Mosquitto) -> Iterator[FaultProxy]:
    """A recording proxy in front of the test's own broker."""
    with FaultProxy(own_broker.port, record_mqtt=True) as recorder:
        yield recorder


@pytest.mark.asyncio
async def test_restored_session_is_read_no_faster_than_receive_maximum(
    own_broker: Mosquitto, proxy: FaultProxy, topic_prefix: str
) -> None:
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{proxy.port}", client_id="bridge-" + uuid.uuid4().hex[:8],
                            receive_maximum=WINDOW, keepalive=30, reconnect_min=0.1, reconnect_max=0.5)
    received: list[RawMessage] = []
    sessions: list[tuple[int, bool]] = []
    bridge = MqttBridge(settings, [f"{topic_prefix}/#"], received.append,
                        on_session=lambda epoch, resumed: sessions.append((epoch, resumed)))

    # 1. Create the persistent session and subscription, then leave.
    run = asyncio.create_task(bridge.run())
    await asyncio.wait_for(bridge.wait_ready(), 15)
    await bridge.stop()
    await asyncio.wait_for(run, 10)

    # 2. A backlog queues in the session; the broker stops cleanly (saving it) and starts again.
    pub = Publisher(own_broker.port)
    try:
        await asyncio.to_thread(pub.publish_all, [(f"{topic_prefix}/d{i}", str(i).encode()) for i in range(BACKLOG)])
    finally:
        pub.close()
    assert pub.acked == BACKLOG
    own_broker.stop(signal.SIGTERM)
    own_broker.start()

    # 3. Resume the session with nothing acknowledged.
    bridge = MqttBridge(settings, [f"{topic_prefix}/#"], received.append,
                        on_session=lambda epoch, resumed: sessions.append((epoch, resumed)))
    run = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.wait_ready(), 15)
        assert sessions, "the broker did not resume the persistent session"
        assert sessions[-1][1]
        conn = proxy.packets(CONNECT)[-1].conn  # the resumed connection through the proxy

        def sent() -> list[int | None]:
            """Packet ids of the PUBLISHes the broker sent on the resumed connection, in order."""
            return [p.packet_id for p in proxy.packets(PUBLISH, conn=conn, direction="down")]

        def acked() -> list[int | None]:
            return [p.packet_id for p in proxy.packets(PUBACK, conn=conn, direction="up")]

        # One window arrives, and the bridge reads it.
        await _until(lambda: len(received) >= WINDOW, "the first window")
        assert len(received) == WINDOW
        assert [m.mid for m in received] == sent()[:WINDOW]
        assert acked() == []

        # 4. Each acknowledgement lets in exactly as many messages as it acknowledged: the next ones
        #    the broker sent, in order, never more than the window, however many the broker sent.
        done, most_ahead = 0, 0
        sizes = iter(ACK_SIZES)
        while done < BACKLOG:
            n = min(next(sizes, WINDOW), BACKLOG - done)
            assert bridge.ack(bridge.tracker.epoch, [m.seq for m in received[done:done + n]]) == n
            done += n
            want = min(done + WINDOW, BACKLOG)
            await _until(lambda d=done: len(acked()) >= d, "the PUBACKs at the broker")  # type: ignore[misc]
            assert acked() == sent()[:done]
            if done == n:
                # The broker answers the first PUBACK with more than the window allows.
                await _until(lambda d=done: len(sent()) > d + WINDOW,  # type: ignore[misc]
                             "the broker to send more than Receive Maximum (Mosquitto 2.0 does so on a restored "
                             "session; if it no longer does, this test proves nothing against it)")
            # Reading stops at a full window, or when the bridge has read all that was sent.
            await _until(lambda w=want: len(received) > w or (  # type: ignore[misc]
                len(received) == w and (bridge.window_full or len(sent()) == w)),
                f"the next messages after {done} acknowledged")
            assert len(received) == want, f"{len(received)} read after {done} acknowledged, window {WINDOW}"
            assert [m.mid for m in received] == sent()[:want]
            assert bridge.tracker.unacked == want - done <= WINDOW
            ahead = len(sent()) - want
            most_ahead = max(most_ahead, ahead)
            if ahead > 0:
                # What the broker sent beyond the window waits, not handed over: in the bridge's socket,
                # or in its read buffer, which reads ahead of a full window up to READ_AHEAD_MAX (plus one read).
                waiting = sum(p.size for p in proxy.packets(PUBLISH, conn=conn, direction="down")[want:])
                assert bridge._reader is not None
                await _until(lambda w=waiting: _unread(bridge._sock) + len(bridge._reader.buf) >= w,  # type: ignore[misc, union-attr]
                             "the messages beyond the window to wait in the socket or the read buffer")
                assert len(bridge._reader.buf) <= READ_AHEAD_MAX + READ_SIZE
        assert most_ahead > 0, "the broker never sent more than the window: the bound was not tested"
        assert sorted(int(m.payload) for m in received) == list(range(BACKLOG))
        assert len(sent()) == BACKLOG  # nothing sent twice
        assert puback_problems(proxy.packets()) == []
    finally:
        await bridge.stop()
        await asyncio.wait_for(run, 10)
