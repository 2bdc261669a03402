"""How the service subscribes, on the real Mosquitto: retained messages are not replayed to it."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from tests.integration.harness import IngestProcess, count, native, stored_readings, write_config
from tests.services import Mosquitto, wait_until

T0 = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)


def _client() -> paho.Client:
    return paho.Client(CallbackAPIVersion.VERSION2, client_id="t-" + uuid.uuid4().hex[:8],
                       protocol=MQTTProtocolVersion.MQTTv5)


def _publish(port: int, topic: str, payload: bytes, *, retain: bool) -> None:
    """One QoS 1 PUBLISH; returns once the broker has acknowledged it (PUBACK)."""
    client = _client()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(30)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def _retained_at(port: int, topic: str) -> paho.MQTTMessage:
    """What a plain subscriber (retain handling 0, the default) is sent for ``topic`` on subscribing."""
    got: list[paho.MQTTMessage] = []
    lock = threading.Lock()

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with lock:
            got.append(msg)

    client = _client()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        wait_until(lambda: bool(got), 30, f"the retained message of {topic} at a plain subscriber")
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def test_a_message_retained_before_the_service_subscribed_is_not_sent_to_it(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    """The service subscribes with retain handling 2: the broker sends it no retained message.

    Why the retained message's absence is conclusive, and not just a quiet period:
    - it was on the broker before the service subscribed (a plain subscriber is sent it, with the
      retain flag, before the service starts);
    - Mosquitto sends a subscription's retained messages at once, while it handles the SUBSCRIBE,
      right behind the SUBACK and ahead of anything published later, on the same connection;
    - the service is ready (/readyz 200) only after it has the SUBACK of its new session, and the
      second, live message is published only then, so it is routed after the SUBSCRIBE was handled;
    - the service reads its one connection in order and commits its batches in order.
    So had the retained message been sent, it would have been received, and stored, no later than
    the live one. Once the live one is stored, the retained one is neither stored nor rejected, and
    the service has received exactly one message: it never arrived.
    """
    retained_topic = f"{topic_prefix}/hn-retained-1/up"
    retained = native("hn-retained-1", T0.isoformat(), {"level": 1.0})
    live = native("hn-live-1", T0.isoformat(), {"level": 2.0})
    _publish(broker.port, retained_topic, retained, retain=True)
    try:
        probe = _retained_at(broker.port, retained_topic)
        assert probe.retain, "the broker does not hold the message as retained"
        assert probe.payload == retained

        cfg = write_config(tmp_path / "c.toml", prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url)
        ingest = IngestProcess(cfg, tmp_path / "ingest.log")
        try:
            ingest.start()  # ready: connected, and the SUBACK of its new session has come
            _publish(broker.port, f"{topic_prefix}/hn-live-1/up", live, retain=False)
            wait_until(lambda: count(database_url, "readings") >= 1, 60, "the live reading")
            assert stored_readings(database_url) == {("hn-live-1", "level", T0.isoformat(), 2.0)}
            assert count(database_url, "rejected_messages") == 0
            assert ingest.metric("sensor_ingest_messages_received_total") == 1
            assert ingest.terminate() == 0
        finally:
            ingest.close()
    finally:
        _publish(broker.port, retained_topic, b"", retain=True)  # an empty retained payload clears it
