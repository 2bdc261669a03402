"""Alert events over MQTT (issue #16, item 4): the outbox row "mqtt:alerts", published at QoS 1 by the
dispatcher to the real Mosquitto, seen by a real subscriber.

- end to end, the service as a process: a scripted series fires and resolves once; the subscriber on
  <prefix>/alerts/# gets one firing and one resolved message, QoS 1, the standard body; the webhook
  gets its own two as before;
- the writer and the dispatcher in the test's loop, the broker behind tests/proxy.py's FaultProxy:
  refused for a while, nothing lost, published once after; a silenced episode publishes nothing
  until its silence ends, then once; topic-unsafe characters of a device id are escaped;
- deploy/mosquitto/acl.example on its own broker: `ingest` may publish under the default prefix; a
  prefix it has no grant for is answered 0x87 and the row is failed at once, the code in last_error;
- the publisher alone (review of #16): 64 concurrent publishes, many rounds, never hang and each is
  delivered once; a connection cut between PUBLISH and PUBACK is not reconnected and resent by paho
  (one copy per event at a subscriber); a late PUBACK of a thrown-away client settles nothing of the
  new one; a device id with a Unicode non-character is published and received.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as paho
import pytest
import pytest_asyncio
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from ingest.alerts.dispatch import Dispatcher
from ingest.alerts.model import Webhook
from ingest.alerts.mqtt_channel import CHANNEL_NAME, AlertPublisher, alert_topic
from ingest.alerts.runtime import AlertRuntime, RuleSet
from ingest.alerts.silence import release_held
from ingest.alerts.stage import AlertStage
from ingest.metrics import Metrics
from ingest.settings import DatabaseSettings, MqttSettings
from ingest.store.pool import create_pool
from ingest.store.writer import Writer
from tests.integration.harness import IngestProcess, Publisher, native, write_config
from tests.integration.test_alert_stage import outcome
from tests.integration.test_alerts_e2e import LEVEL_RULE, SECRET_ENV, new_secret
from tests.integration.test_silences import Clock, at, pm, pm25
from tests.proxy import PUBLISH, FaultProxy
from tests.services import REPO, Mosquitto, until, wait_until
from tests.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

WAIT = 60.0  # only bounds a hang


class Subscriber:
    """A real MQTT v5 client subscribed at QoS 1; keeps (topic, qos, retain, body) of each message."""

    def __init__(self, port: int, filter_: str) -> None:
        self.got: list[tuple[str, int, bool, dict[str, Any]]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(filter_, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, msg.qos, bool(msg.retain), json.loads(msg.payload)))

    def messages(self) -> list[tuple[str, int, bool, dict[str, Any]]]:
        with self._lock:
            return list(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def deliveries(ingest: IngestProcess, webhook: str) -> float:
    """sensor_ingest_webhook_deliveries_total{webhook=..., outcome="delivered"} from /metrics."""
    text = httpx.get(f"http://{ingest.http}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sensor_ingest_webhook_deliveries_total{") and f'webhook="{webhook}"' in line
               and 'outcome="delivered"' in line)


# --- end to end: the service as a process --------------------------------------------------------------


def test_a_series_fires_and_resolves_once_over_mqtt_and_to_its_webhook(
        tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, ingests: list[IngestProcess]) -> None:
    receiver = WebhookReceiver().up()
    prefix = f"{topic_prefix}-alerts/ops"
    sub = Subscriber(broker.port, f"{prefix}/alerts/#")
    pub = Publisher(broker.port)
    try:
        alerts = (f'\n[alerts]\nretry_max = "2s"\nmqtt = true\nmqtt_prefix = "{prefix}"\n\n[[webhooks]]\nname = "ops"\n'
                  f'url = "{receiver.url()}"\nsecret_env = "{SECRET_ENV}"\ntimeout = 2.0\n{LEVEL_RULE}')
        cfg = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url,
                           mqtt_url=broker.url, extra=alerts)
        ingest = IngestProcess(cfg, tmp_path / "ingest.log", env={SECRET_ENV: new_secret()})
        ingests.append(ingest)
        ingest.start()
        t0 = (datetime.now(UTC) - timedelta(minutes=30)).replace(second=0, microsecond=0)
        device = "hn-lv%01"  # "%" is escaped too, so that the topic level decodes back to the id
        for i, value in enumerate([3.0, 5.5, 5.8, 3.9, 3.0]):
            pub.publish_all([(f"{topic_prefix}/{device}/up",
                              native(device, (t0 + timedelta(minutes=i)).isoformat(), {"level": value}))])
            wait_until(lambda n=i + 1: ingest.metric("sensor_ingest_messages_acked_total") >= n, WAIT, "acked")
        wait_until(lambda: len(sub.messages()) >= 2 and len(receiver.delivered()) >= 2, WAIT, "2 + 2 deliveries")
        got = sub.messages()
        topic = f"{prefix}/alerts/level-high/hn-lv%2501"
        assert [(t, q, r, b["status"], b["value"]) for t, q, r, b in got] == [
            (topic, 1, False, "firing", 5.5), (topic, 1, False, "resolved", 3.9)]
        assert [d.json() for d in receiver.delivered()] == [b for _, _, _, b in got]  # the standard body
        assert got[0][3]["device"] == device
        assert got[0][3]["labels"] == {"team": "hydro"}
        wait_until(lambda: deliveries(ingest, CHANNEL_NAME) == 2, WAIT, "counted")
        assert deliveries(ingest, "ops") == 2
        assert len(sub.messages()) == 2
        assert ingest.terminate() == 0
    finally:
        sub.close()
        pub.close()
        receiver.close()


# --- the writer and the dispatcher in the test's loop ------------------------------------------------


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(DatabaseSettings(url=database_url))
    yield p
    await p.close()


@pytest.fixture
def proxy(broker: Mosquitto) -> Iterator[FaultProxy]:
    with FaultProxy(broker.port) as p:
        yield p


def writer_of(pool: asyncpg.Pool, prefix: str, clock: Clock | None = None) -> Writer:
    rules = RuleSet((pm25(webhooks=()),), {}, mqtt=True, mqtt_prefix=prefix)
    return Writer(pool, alerts=AlertStage(AlertRuntime(rules), clock=clock or Clock()))


def publisher(port: int, prefix: str) -> AlertPublisher:
    return AlertPublisher(MqttSettings(url=f"mqtt://127.0.0.1:{port}", client_id=f"t-{uuid.uuid4().hex[:8]}",
                                       connect_timeout=2.0), prefix)


async def rows(pool: asyncpg.Pool) -> list[tuple[str, str, int]]:
    return [tuple(r) for r in await pool.fetch("SELECT webhook, status, attempts FROM alert_outbox ORDER BY id")]


async def retry_due(pool: asyncpg.Pool) -> None:
    """Wait until the oldest pending row's next attempt is due (the backoff is at most 0.2 s here)."""
    end = asyncio.get_running_loop().time() + WAIT
    oldest = "SELECT next_attempt_at <= $1 FROM alert_outbox WHERE status = 'pending' ORDER BY id LIMIT 1"
    while not await pool.fetchval(oldest, datetime.now(UTC)):
        assert asyncio.get_running_loop().time() < end, "no retry came due"
        await asyncio.sleep(0.02)


DEVICE = "hn-aq-$1/a+b#c%"  # selected by pm25()'s devices glob "hn-aq-*"


@pytest.mark.asyncio
async def test_a_broker_away_loses_nothing_and_each_event_is_published_once(
        pool: asyncpg.Pool, broker: Mosquitto, proxy: FaultProxy, topic_prefix: str) -> None:
    prefix = f"{topic_prefix}-alerts"
    sub = Subscriber(broker.port, f"{prefix}/alerts/#")
    writer = writer_of(pool, prefix)
    metrics = Metrics()
    try:
        proxy.mode = "refuse"
        await writer.write([outcome(1, [pm(DEVICE, 1, 60.5)])])
        await writer.write([outcome(2, [pm(DEVICE, 2, 40.0)])])
        assert [(w, s) for w, s, _ in await rows(pool)] == [(CHANNEL_NAME, "pending")] * 2
        async with Dispatcher(pool, {}, metrics, retry_max=0.2, mqtt=publisher(proxy.port, prefix)) as dispatcher:
            assert await dispatcher.run_once() == 1  # the oldest of the series only: the resolved one waits
            for _ in range(3):  # still refused: retried with backoff, never failed, never overtaken
                await retry_due(pool)
                assert await dispatcher.run_once() == 1
            assert [(s, a) for _, s, a in await rows(pool)] == [("pending", 4), ("pending", 0)]  # 1 + 3 attempts
            assert sub.messages() == []
            proxy.mode = "pass"

            for _ in range(2):  # the firing event, then (no longer behind it) the resolved one
                await retry_due(pool)
                assert await dispatcher.run_once() == 1
            assert [s for _, s, _ in await rows(pool)] == ["delivered", "delivered"]
            assert await dispatcher.run_once() == 0
        await until(lambda: len(sub.messages()) >= 2, "both published")
        topic = alert_topic(prefix, "pm25-high", DEVICE)
        assert topic == f"{prefix}/alerts/pm25-high/hn-aq-$1%2Fa%2Bb%23c%25"
        assert [(t, q, r, b["status"], b["device"]) for t, q, r, b in sub.messages()] == [
            (topic, 1, False, "firing", DEVICE), (topic, 1, False, "resolved", DEVICE)]
        sample = metrics.webhook_deliveries.labels(CHANNEL_NAME, "delivered")._value.get()
        assert sample == 2
        assert metrics.webhook_deliveries.labels(CHANNEL_NAME, "retry")._value.get() == 4
    finally:
        sub.close()


@pytest.mark.asyncio
async def test_a_silenced_episode_publishes_nothing_until_released_then_once(
        pool: asyncpg.Pool, broker: Mosquitto, topic_prefix: str) -> None:
    prefix = f"{topic_prefix}-alerts"
    sub = Subscriber(broker.port, f"{prefix}/alerts/#")
    hooks: dict[str, Webhook] = {}
    writer = writer_of(pool, prefix)
    try:
        await pool.execute("INSERT INTO silences (rule, device, labels, starts_at, ends_at, comment, created_by)"
                           " VALUES ('pm25-high', 'hn-aq-1', '{}', $1, $2, 'test', 'tester')", at(0), at(30))
        done = await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.5)])])
        assert done.alerts is not None
        assert (done.alerts.silenced, done.alerts.outbox) == (1, 0)
        assert await rows(pool) == []
        [held] = await pool.fetch("SELECT outbox::text FROM alert_held")
        assert [w for w, _, _ in json.loads(held[0])] == [CHANNEL_NAME]  # the MQTT row waits with the others
        async with Dispatcher(pool, hooks, mqtt=publisher(broker.port, prefix)) as dispatcher:
            assert await dispatcher.run_once() == 0
            async with pool.acquire() as conn:
                released = await release_held(conn, at(30))
            assert released is not None
            assert (released.events, released.outbox) == (1, 1)
            assert await dispatcher.run_once() == 1
            assert await dispatcher.run_once() == 0
        await until(lambda: len(sub.messages()) >= 1, "published")
        assert [(t, b["status"]) for t, _, _, b in sub.messages()] == [
            (alert_topic(prefix, "pm25-high", "hn-aq-1"), "firing")]
        assert await rows(pool) == [(CHANNEL_NAME, "delivered", 1)]
        async with pool.acquire() as conn:
            again = await release_held(conn, at(31))
        assert again is not None
        assert again.events == 0
    finally:
        sub.close()


# --- the publisher alone -----------------------------------------------------------------------------


def body(n: int, device: str = "d") -> bytes:
    return json.dumps({"id": n, "rule": "r", "device": device}).encode()


@pytest.mark.asyncio
async def test_concurrent_publishes_never_hang_and_each_is_delivered_once(broker: Mosquitto, topic_prefix: str) -> None:
    """The old publisher held its lock around paho's publish() while paho's thread, holding paho's
    lock, waited for it in on_publish: a deadlock within a few rounds of 64."""
    sub = Subscriber(broker.port, f"{topic_prefix}/alerts/#")
    pub = publisher(broker.port, topic_prefix)
    rounds, n = 30, 64
    try:
        for r in range(rounds):
            got = await asyncio.wait_for(asyncio.gather(*(pub.publish(body(r * n + i, f"d{i % 7}"))
                                                          for i in range(n))), WAIT)  # only catches a hang
            assert got == [("delivered", None)] * n
        await until(lambda: len(sub.messages()) >= rounds * n, "all received")
        assert sorted(b["id"] for _, _, _, b in sub.messages()) == list(range(rounds * n))
    finally:
        await pub.aclose()
        sub.close()


@pytest.mark.asyncio
async def test_a_connection_lost_before_the_puback_is_not_resent_by_paho(
        broker: Mosquitto, topic_prefix: str) -> None:
    """paho's own reconnect (1 s, then 2 s...) would resend the in-flight PUBLISH (DUP) while the
    dispatcher retries it too: two copies. The publisher's client does not reconnect."""
    sub = Subscriber(broker.port, f"{topic_prefix}/alerts/#")
    with FaultProxy(broker.port, record_mqtt=True) as proxy:
        pub = publisher(proxy.port, topic_prefix)
        try:
            assert await pub.publish(body(1)) == ("delivered", None)
            proxy.mode = "blackhole"
            task = asyncio.create_task(pub.publish(body(2)))
            await until(lambda: proxy.unread_bytes() > 0, "the PUBLISH sent into the void")
            proxy.cut()  # lost between PUBLISH and PUBACK
            outcome, why = await task
            assert outcome == "retry"
            assert why is not None
            assert "lost" in why
            proxy.mode = "pass"
            await asyncio.sleep(2.5)  # longer than paho's reconnect delay: the window of its resend
            assert proxy.accepted == 1  # nobody reconnected
            assert await pub.publish(body(2)) == ("delivered", None)  # the dispatcher's retry
            assert await pub.publish(body(3)) == ("delivered", None)
            await until(lambda: 3 in [b["id"] for _, _, _, b in sub.messages()], "the last one")
            ups = [(p.conn, p.dup) for p in proxy.packets(PUBLISH, direction="up")]
            assert ups == [(1, False), (2, False), (2, False)]
            assert sorted(b["id"] for _, _, _, b in sub.messages()) == [1, 2, 3]
        finally:
            await pub.aclose()
            sub.close()


@pytest.mark.asyncio
async def test_a_late_puback_of_a_dropped_client_settles_nothing_of_the_new_one(
        broker: Mosquitto, topic_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both clients number their messages from 1: the old client's PUBACK for its mid 1, handled
    after the new client published its own mid 1, must not mark the new message delivered."""
    import ingest.alerts.mqtt_channel as channel

    monkeypatch.setattr(channel, "PUBLISH_TIMEOUT", 0.5)
    with FaultProxy(broker.port, record_mqtt=True) as proxy:
        pub = publisher(proxy.port, topic_prefix)
        try:
            assert await pub._connect() is None
            old = pub._client
            proxy.mode = "blackhole"
            assert (await pub.publish(body(1, "A")))[0] == "retry"  # no PUBACK: the client is dropped
            assert pub._client is None
            proxy.mode = "pass"
            assert await pub._connect() is None
            assert pub._client is not old
            proxy.mode = "blackhole"
            task = asyncio.create_task(pub.publish(body(2, "B")))
            await until(lambda: 1 in pub._waiting, "B waits for the PUBACK of mid 1")
            assert old is not None
            pub._puback(old, 1, ReasonCode(PacketTypes.PUBACK, "Success"))  # what paho's old thread hands over
            outcome, why = await task
            assert outcome == "retry"
            assert why is not None
            assert "no PUBACK" in why
            assert proxy.packets(PUBLISH, direction="up") == []  # neither reached the broker
        finally:
            await pub.aclose()


@pytest.mark.asyncio
async def test_a_device_id_with_a_unicode_non_character_is_published_and_received(
        broker: Mosquitto, topic_prefix: str) -> None:
    """Mosquitto disconnects a client whose topic holds U+FFFF (or U+FFFE, U+FDD0...): escaped, it
    passes, on the same connection as the rest."""
    sub = Subscriber(broker.port, f"{topic_prefix}/alerts/#")
    with FaultProxy(broker.port) as proxy:
        pub = publisher(proxy.port, topic_prefix)
        devices = ["ok-1", "bad\uffff", "bad\ufffe", "bad\ufdd0", "ok-2"]
        try:
            for i, device in enumerate(devices):
                assert await pub.publish(body(i, device)) == ("delivered", None)
            await until(lambda: len(sub.messages()) >= len(devices), "all received")
            assert [(t, b["device"]) for t, _, _, b in sub.messages()] == [
                (alert_topic(topic_prefix, "r", d), d) for d in devices]
            assert sub.messages()[1][0] == f"{topic_prefix}/alerts/r/bad%EF%BF%BF"
            assert proxy.accepted == 1
        finally:
            await pub.aclose()
            sub.close()


@pytest.mark.asyncio
async def test_the_example_acl_grants_the_default_prefix_and_a_refusal_fails_the_row(pool: asyncpg.Pool) -> None:
    password = secrets.token_urlsafe(18)
    broker = Mosquitto(users={"ingest": password}, acl=REPO / "deploy" / "mosquitto" / "acl.example")
    broker.start()
    try:
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", client_id=f"t-{uuid.uuid4().hex[:8]}",
                                username="ingest", password=password, connect_timeout=2.0)
        granted = AlertPublisher(settings, "sensor-ingest")
        try:
            assert await granted.publish(body(1)) == ("delivered", None)
        finally:
            await granted.aclose()
        writer = writer_of(pool, "not-granted")
        await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.5)])])
        async with Dispatcher(pool, {}, retry_max=0.2, mqtt=AlertPublisher(settings, "not-granted")) as dispatcher:
            assert await dispatcher.run_once() == 1
            assert await dispatcher.run_once() == 0  # failed: not retried
        [(status, attempts, error)] = await pool.fetch("SELECT status, attempts, last_error FROM alert_outbox")
        assert (status, attempts) == ("failed", 1)
        assert "0x87" in error
    finally:
        broker.cleanup()
