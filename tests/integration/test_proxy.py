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

from tests.proxy import FaultProxy
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
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        _select(url, connect_timeout=30)
    assert time.monotonic() - t0 < 10, "a refused connect must fail at once, not wait for its timeout"
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

    try:
        proxy.mode = "blackhole"
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            _select(url, connect_timeout=1)
        assert time.monotonic() - t0 >= 0.9, "a blackholed connect must hang until its timeout, not fail fast"

        waiter = threading.Thread(target=query, daemon=True)
        waiter.start()
        waiter.join(1.5)
        assert waiter.is_alive(), "a query on a blackholed connection must get no answer"
        assert not outcome

        proxy.mode = "pass"
        assert _select(url) == 1  # new connections work again
        waiter.join(0.5)
        assert waiter.is_alive(), "a connection frozen by the blackhole stays frozen"

        proxy.cut()
        waiter.join(10)
        assert not waiter.is_alive()
        assert isinstance(outcome[0], psycopg.OperationalError)
    finally:
        proxy.cut()
        held.close()


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
