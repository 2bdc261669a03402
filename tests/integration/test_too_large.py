"""Oversized payloads end to end, on the broker started with the project's deploy/mosquitto/mosquitto.conf.

The broker's message_size_limit is larger than the service's ingest.max_message_bytes by design, so
that a payload between the two reaches the service and becomes a too_large rejection row (its first
max_message_bytes bytes, its size in the detail) instead of vanishing at the broker. A payload
above the broker's limit is refused there, as Mosquitto 2.0.11 does it: an MQTT v5 QoS 1 PUBLISH is
answered with a PUBACK of reason code 0x95 (Packet too large) on a connection that stays open, and
nothing reaches the service. That code is not one MQTT 5 allows on a PUBACK: paho-mqtt takes the
packet for malformed, drops the connection and sends the message again on every reconnect.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from ingest.settings import IngestSettings
from tests.integration.harness import IngestProcess, Publisher, count, native, stored_readings, write_config
from tests.integration.test_pipeline import T0
from tests.mqtt_script import CONNACK, PUBACK, Publish, packet, publish, utf8
from tests.services import REPO, Mosquitto, wait_until

HANG = 60  # seconds: a bound on a hang only
BROKER_LIMIT = int(re.findall(r"^message_size_limit (\d+)$",
                              (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text(), re.M)[-1])
SERVICE_LIMIT = IngestSettings().max_message_bytes
PACKET_TOO_LARGE = 0x95


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """(first byte, body) of the next packet the broker sends."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            data += chunk
        return data

    first = exactly(1)[0]
    length, shift = 0, 0
    while True:
        byte = exactly(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return first, exactly(length)


def _publish_v5_qos1(port: int, topic: str, payload: bytes) -> tuple[int, bool]:
    """Publish over a hand-written MQTT v5 connection: (PUBACK reason code, connection still usable
    afterwards, shown by a PINGREQ answered with a PINGRESP)."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG) as sock:
        # CONNECT: protocol "MQTT", level 5, clean start, keepalive 60, no properties; client id.
        sock.sendall(packet(0x10, utf8("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + b"\x00"
                            + utf8("big-" + uuid.uuid4().hex[:8])))
        first, body = _read_packet(sock)
        assert first >> 4 == CONNACK, first
        assert body[1] == 0, f"CONNACK reason code {body[1]:#x}"
        sock.sendall(publish(Publish(topic, payload, qos=1, packet_id=7)))
        first, body = _read_packet(sock)
        assert first >> 4 == PUBACK, first
        assert struct.unpack_from("!H", body)[0] == 7
        reason = body[2] if len(body) > 2 else 0  # no reason code: Success (MQTT 5 §3.4.2.1)
        sock.sendall(bytes([0xC0, 0]))  # PINGREQ
        try:
            first, _ = _read_packet(sock)
        except (ConnectionError, OSError):
            return reason, False
        return reason, first == 0xD0


def test_limits_are_ordered_by_design() -> None:
    assert BROKER_LIMIT > SERVICE_LIMIT


def test_a_payload_between_the_two_limits_becomes_a_too_large_row_and_one_above_is_refused_by_the_broker(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    cfg = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url)
    ingest = IngestProcess(cfg, tmp_path / "ingest.log")
    big_topic, huge_topic = f"{topic_prefix}/hn-aq-big/up", f"{topic_prefix}/hn-aq-huge/up"
    head = b'{"device": "hn-aq-big", "padding": "'
    big = head + b"x" * (100 * 1024 - len(head) - 2) + b'"}'
    assert len(big) == 100 * 1024
    at_limit, huge = b"z" * BROKER_LIMIT, b"y" * (BROKER_LIMIT + 1)
    after = native("hn-aq-1", T0.isoformat(), {"pm25": 1.0})
    try:
        ingest.start()
        # Above the broker's limit: a PUBACK with 0x95, the connection stays open.
        assert _publish_v5_qos1(broker.port, huge_topic, huge) == (PACKET_TOO_LARGE, True)
        # Between the limits, and at the broker's limit exactly: accepted (reason Success).
        assert _publish_v5_qos1(broker.port, big_topic, big) == (0, True)
        assert _publish_v5_qos1(broker.port, big_topic, at_limit) == (0, True)
        pub = Publisher(broker.port)
        try:
            pub.publish_all([(f"{topic_prefix}/hn-aq-1/up", after)])
        finally:
            pub.close()
        wait_until(lambda: count(database_url, "readings") == 1, HANG, "the good message after the large ones")
        wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= 3, HANG, "all three acknowledged")

        assert stored_readings(database_url) == {("hn-aq-1", "pm25", T0.isoformat(), 1.0)}
        with psycopg.connect(database_url) as c:
            rows = c.execute("SELECT topic, reason, detail, payload, source FROM rejected_messages"
                             " ORDER BY length(detail), detail").fetchall()
        assert len(rows) == 2  # the refused payload left no trace here
        for (topic, reason, detail, payload, source), sent in zip(rows, [big, at_limit], strict=True):
            assert (topic, reason, source) == (big_topic, "too_large", None)
            assert bytes(payload) == sent[:SERVICE_LIMIT]
            assert f"payload of {len(sent)} bytes exceeds ingest.max_message_bytes = {SERVICE_LIMIT}" in detail
        # The broker never handed the refused payload over: the service received three messages.
        assert ingest.metric("sensor_ingest_messages_received_total") == 3
        assert ingest.terminate() == 0
    finally:
        ingest.close()


def test_paho_reconnects_and_resends_a_payload_the_broker_refuses_for_its_size(
    broker: Mosquitto, topic_prefix: str
) -> None:
    """What a paho-mqtt 2.2 gateway does with Mosquitto's 0x95 PUBACK (operators see a client
    reconnecting every few seconds, and nothing else)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="pub-" + uuid.uuid4().hex[:8],
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.reconnect_delay_set(1, 1)
    connects = threading.Semaphore(0)
    resent: list[str] = []
    client.on_connect = lambda *args: connects.release()
    client.on_log = lambda _c, _u, _level, text: resent.append(text) if text.startswith("Sending PUBLISH (d1") else None
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert connects.acquire(timeout=HANG)
        info = client.publish(f"{topic_prefix}/hn-aq-huge/up", b"z" * (BROKER_LIMIT + 1), qos=1)
        for _ in range(3):  # reconnected, with the message sent again, again and again
            assert connects.acquire(timeout=HANG)
        wait_until(lambda: len(resent) >= 2, HANG, "the message sent again")
        assert not info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
