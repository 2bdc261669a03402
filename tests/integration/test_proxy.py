"""The fault-injecting proxy (tests/proxy.py) itself, against the real PostgreSQL and Mosquitto."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.proxy import CONNACK, CONNECT, PUBACK, PUBLISH, FaultProxy, MqttPacket, _MqttStream, puback_problems
from tests.services import Mosquitto, Postgres, wait_until


def _via(url: str, proxy: FaultProxy) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}").geturl()


def _select(url: str, sql: str = "SELECT 1", connect_timeout: int = 10) -> object:
    with psycopg.connect(url, connect_timeout=connect_timeout) as c:
        row = c.execute(sql).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def test_pass_forwards_both_ways_unchanged(pg: Postgres, make_proxy: Callable[[int], FaultProxy]) -> None:
    proxy = make_proxy(pg.port)
    url = _via(pg.url("postgres"), proxy)
    assert _select(url) == 1
    # Larger than one read in each direction, so chunking and flow control are exercised.
    big = "x" * 3_000_000
    with psycopg.connect(url) as c:
        row = c.execute("SELECT length(%s::text), md5(%s::text)", (big, big)).fetchone()
        echoed = c.execute("SELECT repeat('y', 5000000)").fetchone()
    assert row is not None
    assert row[0] == len(big)
    assert echoed is not None
    assert echoed[0] == "y" * 5_000_000
    assert proxy.accepted == 2
    wait_until(lambda: proxy.connections == 0, 10, "the closed connections to leave the proxy")


def test_refuse_cuts_current_connections_and_fails_new_ones_fast(
    pg: Postgres, make_proxy: Callable[[int], FaultProxy]
) -> None:
    proxy = make_proxy(pg.port)
    url = _via(pg.url("postgres"), proxy)
    held = psycopg.connect(url, autocommit=True)
    try:
        assert held.execute("SELECT 1").fetchone() == (1,)
        proxy.mode = "refuse"
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    finally:
        held.close()
    with pytest.raises(psycopg.OperationalError) as refused:
        _select(url, connect_timeout=30)
    # Reset by the proxy, which accepted it: not a timeout (a blackhole), not ECONNREFUSED (a free port).
    assert "timeout" not in str(refused.value)
    assert proxy.accepted == 2
    proxy.mode = "pass"
    assert _select(url) == 1


def test_blackhole_times_connects_out_and_silences_current_connections(
    pg: Postgres, make_proxy: Callable[[int], FaultProxy]
) -> None:
    proxy = make_proxy(pg.port)
    url = _via(pg.url("postgres"), proxy)
    held = psycopg.connect(url, autocommit=True)
    outcome: list[BaseException | object] = []

    def query() -> None:
        try:
            outcome.append(held.execute("SELECT 42").fetchone())
        except BaseException as exc:  # recorded for the main thread
            outcome.append(exc)

    backend = held.info.backend_pid
    assert held.execute("SELECT 1").fetchone() == (1,)
    try:
        proxy.mode = "blackhole"
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            _select(url, connect_timeout=1)
        assert time.monotonic() - t0 >= 0.9, "a blackholed connect must hang until its timeout, not fail fast"

        waiter = threading.Thread(target=query, daemon=True)
        waiter.start()
        # The query reaches the proxy (its bytes wait, unread, on the held connection: number 1) and
        # goes no further: the server never sees it, so no answer can come.
        wait_until(lambda: proxy.unread_bytes(conn=1) > 0, 30, "the query to reach the proxy")
        assert _last_query(pg, backend) == "SELECT 1"
        assert waiter.is_alive(), "a query on a blackholed connection must get no answer"
        assert not outcome

        proxy.mode = "pass"
        assert _select(url) == 1  # new connections work again
        # ... while the frozen connection stays frozen: its query still waits at the proxy.
        assert proxy.unread_bytes(conn=1) > 0
        assert _last_query(pg, backend) == "SELECT 1"
        assert waiter.is_alive(), "a connection frozen by the blackhole stays frozen"

        proxy.cut()
        waiter.join(10)
        assert not waiter.is_alive()
        assert isinstance(outcome[0], psycopg.OperationalError)
    finally:
        proxy.cut()
        held.close()


def _last_query(pg: Postgres, backend: int) -> object:
    """The last statement the server received from backend ``backend`` (asked directly, not via the proxy)."""
    return _select(pg.url("postgres"), f"SELECT query FROM pg_stat_activity WHERE pid = {int(backend)}")


def test_mqtt_passes_through_and_a_blackhole_makes_the_client_keepalive_fail(
    broker: Mosquitto, make_proxy: Callable[[int], FaultProxy]
) -> None:
    proxy = make_proxy(broker.port)
    connected = threading.Event()
    disconnected = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="proxy-" + uuid.uuid4().hex[:8],
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.on_connect = lambda *a: connected.set()
    client.on_disconnect = lambda *a: disconnected.set()
    client.connect("127.0.0.1", proxy.port, keepalive=5)
    client.loop_start()
    try:
        assert connected.wait(10)
        info = client.publish("proxy/test", b"x", qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
        proxy.mode = "blackhole"
        # No PINGRESP comes back, so the client gives the connection up after its keepalive.
        assert disconnected.wait(30), "the client should see its keepalive fail"
    finally:
        client.disconnect()
        client.loop_stop()


def test_mqtt_recording_keeps_each_packet_per_connection_in_order(
    broker: Mosquitto, topic_prefix: str
) -> None:
    """record_mqtt: what a client and the broker send each other, packet by packet, per connection."""
    with FaultProxy(broker.port, record_mqtt=True) as proxy:
        got: list[paho.MQTTMessage] = []
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="rec-" + uuid.uuid4().hex[:8],
                             protocol=MQTTProtocolVersion.MQTTv5)
        client.on_message = lambda c, u, m: got.append(m)
        client.connect("127.0.0.1", proxy.port)
        client.loop_start()
        try:
            topic = f"{topic_prefix}/rec"
            client.subscribe(topic, qos=1)
            wait_until(lambda: len(proxy.packets(9)) == 1, 30, "the SUBACK")  # 9: SUBACK
            infos = [client.publish(topic, b"m%d" % i, qos=1) for i in range(3)]
            for info in infos:
                info.wait_for_publish(30)
            wait_until(lambda: len(got) == 3 and len(proxy.packets(PUBACK, direction="up")) == 3, 30,
                       "the three messages back, acknowledged")
        finally:
            client.disconnect()
            client.loop_stop()
        second = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        second.connect("127.0.0.1", proxy.port)
        second.loop_start()
        try:
            wait_until(lambda: len(proxy.packets(CONNACK)) == 2, 30, "the second CONNACK")
        finally:
            second.disconnect()
            second.loop_stop()

        first = proxy.packets(conn=1)
        assert first[0].type == CONNECT  # (the client may send its SUBSCRIBE before the CONNACK comes)
        connack = next(p for p in first if p.direction == "down")
        assert (connack.type, connack.reason) == (CONNACK, 0)
        sent = [p for p in first if p.type == PUBLISH and p.direction == "up"]
        assert [(p.packet_id, p.topic, p.payload, p.qos, p.dup) for p in sent] == [
            (info.mid, topic, b"m%d" % i, 1, False) for i, info in enumerate(infos)]
        delivered = [p for p in first if p.type == PUBLISH and p.direction == "down"]
        assert [(p.packet_id, p.payload) for p in delivered] == [(m.mid, m.payload) for m in got]
        # Each delivery is recorded before the PUBACK that answers it.
        for p in delivered:
            ack = next(q for q in first if q.type == PUBACK and q.direction == "up" and q.packet_id == p.packet_id)
            assert first.index(p) < first.index(ack)
        assert puback_problems(proxy.packets()) == []
        assert [p.type for p in proxy.packets(conn=2)][:2] == [CONNECT, CONNACK]  # nothing else to send first
        assert sum(p.size for p in first if p.direction == "down") > 0
        assert proxy.parse_errors == []


def test_mqtt_stream_is_split_into_packets_whatever_the_chunking() -> None:
    wire = (bytes([0x30 | 0x02 | 0x08, 11]) + b"\x00\x03a/b" + b"\x01\x02" + b"\x00" + b"xyz"  # PUBLISH DUP QoS1 id 258
            + bytes([0x40, 2, 0x01, 0x02])  # PUBACK 258
            + bytes([0x30, 200, 1]) + b"\x00\x01t" + b"\x00" + b"p" * 196)  # QoS 0, 2-byte remaining length
    whole = list(_MqttStream(1, "down", [5]).feed(wire))
    stream = _MqttStream(1, "down", [5])
    bytewise = [p for i in range(len(wire)) for p in stream.feed(wire[i:i + 1])]
    assert whole == bytewise
    assert [(p.type, p.packet_id, p.dup, p.qos, p.topic, p.payload, p.size) for p in whole] == [
        (PUBLISH, 258, True, 1, "a/b", b"xyz", 13), (PUBACK, 258, False, 0, None, None, 4),
        (PUBLISH, None, False, 0, "t", b"p" * 196, 203)]


def test_puback_problems_names_acks_of_another_connection_and_second_acks() -> None:
    def pub(conn: int, pid: int) -> MqttPacket:
        return MqttPacket(conn, "down", PUBLISH, 0x02, 10, pid)

    def ack(conn: int, pid: int) -> MqttPacket:
        return MqttPacket(conn, "up", PUBACK, 0, 4, pid)

    assert puback_problems([pub(1, 7), ack(1, 7), pub(1, 7), ack(1, 7)]) == []  # an id is reused once acked
    assert len(puback_problems([pub(1, 7), ack(2, 7)])) == 1  # acked on another connection
    assert len(puback_problems([pub(1, 7), ack(1, 7), ack(1, 7)])) == 1  # acked twice
    assert len(puback_problems([ack(1, 7), pub(1, 7)])) == 1  # acked before it was sent
