"""The MQTT bridge against a real Mosquitto: the Receive Maximum window holds whatever the broker does.

Mosquitto 2.0 restores a persistent session from its persistence file with up to
``max_inflight_messages`` (65535 in deploy/mosquitto/mosquitto.conf) of its queued messages already
"in flight", and sends them all when the client resumes the session, whatever Receive Maximum the
client's CONNECT asks for. The bridge must then hold the bound itself, or a broker restart during a
database outage could hand the service the whole backlog at once.
"""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from ingest.model import RawMessage
from ingest.mqtt import MqttBridge
from ingest.settings import MqttSettings
from tests.integration.harness import Publisher
from tests.services import Mosquitto

WINDOW = 10
BACKLOG = 100


async def _settle(bridge_received: list[RawMessage], quiet: float = 1.0, limit: float = 15.0) -> None:
    """Until no message has arrived for ``quiet`` seconds (or ``limit`` passed)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    seen, last_change = -1, loop.time()
    while loop.time() < end:
        if len(bridge_received) != seen:
            seen, last_change = len(bridge_received), loop.time()
        elif loop.time() - last_change >= quiet:
            return
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_restored_session_is_read_no_faster_than_receive_maximum(
    own_broker: Mosquitto, topic_prefix: str
) -> None:
    settings = MqttSettings(url=own_broker.url, client_id="bridge-" + uuid.uuid4().hex[:8],
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

    # 3. Resume the session with nothing acknowledged: exactly one window arrives, and no more.
    bridge = MqttBridge(settings, [f"{topic_prefix}/#"], received.append,
                        on_session=lambda epoch, resumed: sessions.append((epoch, resumed)))
    run = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.wait_ready(), 15)
        assert sessions, "the broker did not resume the persistent session"
        assert sessions[-1][1]
        await _settle(received)
        assert len(received) == WINDOW
        assert bridge.tracker.unacked == WINDOW

        # 4. Each acknowledged window lets exactly the next one in, until the backlog is through.
        acked = 0
        while acked < BACKLOG:
            batch = received[acked:]
            assert batch, f"nothing more arrived after {acked} acknowledged messages"
            assert len(batch) <= WINDOW
            assert bridge.ack(bridge.tracker.epoch, [m.seq for m in batch]) == len(batch)
            acked += len(batch)
            await _settle(received, quiet=0.5)
            assert bridge.tracker.unacked <= WINDOW
        assert acked == BACKLOG
        assert sorted(int(m.payload) for m in received) == list(range(BACKLOG))
    finally:
        await bridge.stop()
        await asyncio.wait_for(run, 10)
