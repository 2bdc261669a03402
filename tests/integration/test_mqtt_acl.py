"""The broker binds each device to its own topics: deploy/mosquitto/acl.example, on the real Mosquitto.

The broker runs with the committed example ACL itself (not a copy) and a password file made here with
random passwords, one user per device and gateway plus ``ingest``. The clients are plain paho MQTT v5
clients, so each test sees exactly what the broker answers (CONNACK, PUBACK, SUBACK reason codes).

No test sleeps to show that something did not arrive. Mosquitto decides the delivery of a publish
to every subscriber before it acknowledges it, and writes to each connection in order, so a later
message that does arrive proves that an earlier one never will.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.integration.harness import native
from tests.services import REPO, Mosquitto, wait_until

MOSQUITTO_DIR = REPO / "deploy" / "mosquitto"
ACL = MOSQUITTO_DIR / "acl.example"

INGEST = "ingest"
DEVICE_A = "hn-aq-0001"
DEVICE_B = "hn-aq-0002"
GATEWAY = "gw-0007"

SUCCESS = 0x00  # PUBACK success, CONNACK success
GRANTED_QOS_1 = 0x01  # SUBACK
NOT_AUTHORIZED = 0x87  # PUBACK and CONNACK
INGEST_FILTERS = ["city/+/+/up", "city/+/+/senml", "gw/+/up"]  # what the example sources subscribe to
TIME = "2026-11-25T08:00:00+07:00"


def senml(device: str) -> bytes:
    return json.dumps([{"bn": f"{device}:", "bt": 1795654800, "n": "rain", "u": "mm", "v": 1.5}]).encode()


class Client:
    """A paho MQTT v5 client (its own network thread) that keeps what the broker answered."""

    def __init__(self, port: int, username: str | None, password: str | None) -> None:
        # No "+" or "#" in the client id: Mosquitto denies every pattern ACL to such a client.
        self.client_id = f"{username or 'anonymous'}-{uuid.uuid4().hex[:8]}"
        self._mqtt = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        if username is not None:
            self._mqtt.username_pw_set(username, password)
        self._lock = threading.Lock()
        self._connack: ReasonCode | None = None
        self._pubacks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._messages: list[tuple[str, bytes]] = []
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_publish = self._on_publish
        self._mqtt.on_subscribe = self._on_subscribe
        self._mqtt.on_message = self._on_message
        self._mqtt.connect("127.0.0.1", port)
        self._mqtt.loop_start()
        wait_until(lambda: self.connack is not None, 10, f"the CONNACK to {self.client_id}")

    def _on_connect(self, client: object, userdata: object, flags: object, rc: ReasonCode, props: object) -> None:
        with self._lock:
            if self._connack is None:  # paho retries a refused connection: keep the first answer
                self._connack = rc

    def _on_publish(self, client: object, userdata: object, mid: int, rc: ReasonCode, props: object) -> None:
        with self._lock:
            self._pubacks[mid] = rc

    def _on_subscribe(
        self, client: object, userdata: object, mid: int, rcs: list[ReasonCode], props: object
    ) -> None:
        with self._lock:
            self._subacks[mid] = rcs

    def _on_message(self, client: object, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self._messages.append((msg.topic, bytes(msg.payload)))

    @property
    def connack(self) -> ReasonCode | None:
        with self._lock:
            return self._connack

    @property
    def messages(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self._messages)

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1; the reason code of the broker's PUBACK."""
        info = self._mqtt.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self._pubacks, 10, f"the PUBACK to {self.client_id} for {topic}")
        with self._lock:
            return self._pubacks[info.mid].value

    def subscribe(self, filters: list[str]) -> list[int]:
        """Subscribe at QoS 1; the reason codes of the broker's SUBACK, one per filter."""
        result, mid = self._mqtt.subscribe([(f, 1) for f in filters])
        assert result == paho.MQTT_ERR_SUCCESS
        assert mid is not None
        wait_until(lambda: mid in self._subacks, 10, f"the SUBACK to {self.client_id}")
        with self._lock:
            return [rc.value for rc in self._subacks[mid]]

    def wait_for(self, n: int) -> list[tuple[str, bytes]]:
        """Wait until at least n messages have arrived; all that have arrived."""
        wait_until(lambda: len(self.messages) >= n, 10, f"{n} messages to {self.client_id}")
        return self.messages

    @property
    def connected(self) -> bool:
        return self._mqtt.is_connected()

    def close(self) -> None:
        self._mqtt.disconnect()
        self._mqtt.loop_stop()


Connect = Callable[..., Client]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """``connect(user)`` logs in with the user's right password, ``connect(user, password)`` with
    another, ``connect(None, None)`` anonymously, to a broker of this test's own that runs the
    example ACL."""
    passwords = {user: secrets.token_urlsafe(18) for user in (INGEST, DEVICE_A, DEVICE_B, GATEWAY)}
    broker = Mosquitto(users=passwords, acl=ACL)
    clients: list[Client] = []

    def make(username: str | None, password: str | None = None) -> Client:
        if password is None and username is not None:
            password = passwords[username]
        client = Client(broker.port, username, password)
        clients.append(client)
        return client

    try:
        broker.start()
        yield make
    finally:
        for client in clients:
            client.close()
        broker.cleanup()


def ingest_subscriber(connect: Connect, share: str = "") -> Client:
    ingest = connect(INGEST)
    assert ingest.connack is not None
    assert ingest.connack.value == SUCCESS
    assert ingest.subscribe([share + f for f in INGEST_FILTERS]) == [GRANTED_QOS_1] * len(INGEST_FILTERS)
    return ingest


@pytest.mark.parametrize("share", ["", "$share/ingest/"], ids=["plain", "shared"])
def test_devices_and_gateways_publish_under_their_own_ids_and_ingest_receives_it(
    connect: Connect, share: str
) -> None:
    ingest = ingest_subscriber(connect, share)
    device, gateway = connect(DEVICE_A), connect(GATEWAY)
    own = [
        (device, f"city/hoan-kiem/{DEVICE_A}/up", native(DEVICE_A, TIME, {"pm25": 35.2})),
        (device, f"city/cau-giay/{DEVICE_A}/senml", senml(DEVICE_A)),  # any district
        (gateway, f"gw/{GATEWAY}/up", json.dumps([json.loads(native("hn-flood-9", TIME, {"level": 1.5}))]).encode()),
    ]
    assert [client.publish(topic, payload) for client, topic, payload in own] == [SUCCESS] * 3
    # In the order published (each publish waited for its PUBACK), each exactly once.
    assert ingest.wait_for(3) == [(topic, payload) for _, topic, payload in own]


def test_a_device_cannot_publish_as_another_device_and_nothing_of_it_is_delivered(connect: Connect) -> None:
    ingest = ingest_subscriber(connect)
    device = connect(DEVICE_A)
    not_its_own = [
        f"city/hoan-kiem/{DEVICE_B}/up",
        f"city/hoan-kiem/{DEVICE_B}/senml",
        f"gw/{DEVICE_B}/up",  # a gateway topic: DEVICE_A's username is not that gateway's
        f"gw/{DEVICE_A}/down",  # outside every source
        f"city/hoan-kiem/{DEVICE_A}/down",
        "city/hoan-kiem/ingest/up",
    ]
    refused = [device.publish(topic, native(DEVICE_B, TIME, {"pm25": 1.0})) for topic in not_its_own]
    # MQTT v5 at QoS 1: a PUBACK with 0x87 Not authorized for each, and the device stays connected.
    assert refused == [NOT_AUTHORIZED] * len(not_its_own)
    assert device.connected
    # The barrier: a good message published after the refusals. Once it arrives, the refused ones
    # (never queued by the broker) cannot arrive any more.
    good = (f"city/hoan-kiem/{DEVICE_A}/up", native(DEVICE_A, TIME, {"pm25": 2.0}))
    assert device.publish(*good) == SUCCESS
    assert ingest.wait_for(1) == [good]


def test_the_ingest_user_reads_but_is_no_device(connect: Connect) -> None:
    ingest = ingest_subscriber(connect)
    assert ingest.publish(f"city/hoan-kiem/{DEVICE_A}/up", native(DEVICE_A, TIME, {"pm25": 3.0})) == NOT_AUTHORIZED
    # The `deny` lines of the example: the %u patterns would otherwise let it publish as "ingest".
    assert ingest.publish("city/hoan-kiem/ingest/up", native("ingest", TIME, {"pm25": 3.0})) == NOT_AUTHORIZED
    assert ingest.publish("city/hoan-kiem/ingest/senml", senml("ingest")) == NOT_AUTHORIZED
    assert ingest.publish("gw/ingest/up", native("ingest", TIME, {"pm25": 3.0})) == NOT_AUTHORIZED
    good = (f"city/hoan-kiem/{DEVICE_B}/up", native(DEVICE_B, TIME, {"pm25": 4.0}))
    assert connect(DEVICE_B).publish(*good) == SUCCESS
    assert ingest.wait_for(1) == [good]


def test_a_device_subscribing_to_the_city_receives_nothing(connect: Connect) -> None:
    ingest = ingest_subscriber(connect)
    spy, other = connect(DEVICE_A), connect(DEVICE_B)
    filters = ["#", "city/#", f"city/+/{DEVICE_B}/up", f"city/hoan-kiem/{DEVICE_A}/up", "gw/+/up"]
    # Mosquitto 2.0's acl_file does not check SUBSCRIBE: the SUBACK grants every filter (QoS 1, not
    # 0x87); what the ACL refuses is each delivery, checked against the device's read access.
    assert spy.subscribe(filters) == [GRANTED_QOS_1] * len(filters)
    theirs = (f"city/hoan-kiem/{DEVICE_B}/up", native(DEVICE_B, TIME, {"pm25": 5.0}))
    own = (f"city/hoan-kiem/{DEVICE_A}/up", native(DEVICE_A, TIME, {"pm25": 6.0}))
    assert other.publish(*theirs) == SUCCESS
    # The broker decided every delivery of `theirs` before it acked it, and writes to the spy's
    # connection in order: by the PUBACK for the spy's own publish, anything meant for the spy,
    # including its own message, has reached it.
    assert spy.publish(*own) == SUCCESS
    assert ingest.wait_for(2) == [theirs, own]
    assert spy.messages == []


@pytest.mark.parametrize(
    ("username", "password"),
    [(DEVICE_A, "wrong-" + secrets.token_urlsafe(8)), ("nobody", secrets.token_urlsafe(8)), (None, None)],
    ids=["wrong-password", "unknown-user", "anonymous"],
)
def test_a_client_without_valid_credentials_is_refused_at_connect(
    connect: Connect, username: str | None, password: str | None
) -> None:
    ingest = ingest_subscriber(connect)
    intruder = connect(username, password)
    # Mosquitto 2.0 answers 0x87 Not authorized here, not 0x86 Bad user name or password.
    assert intruder.connack is not None
    assert intruder.connack.value == NOT_AUTHORIZED
    assert not intruder.connected
    good = (f"city/hoan-kiem/{DEVICE_A}/up", native(DEVICE_A, TIME, {"pm25": 7.0}))
    assert connect(DEVICE_A).publish(*good) == SUCCESS
    assert ingest.wait_for(1) == [good]


def _settings(text: str) -> dict[str, str]:
    lines = (line.strip() for line in text.splitlines())
    return dict(line.split(None, 1) for line in lines if line and not line.startswith("#"))


def test_the_auth_snippet_enables_what_these_tests_run() -> None:
    """auth.conf.example turns on the three settings the test broker above runs with."""
    snippet = _settings((MOSQUITTO_DIR / "auth.conf.example").read_text())
    assert set(snippet) == {"allow_anonymous", "password_file", "acl_file"}
    assert snippet["allow_anonymous"] == "false"
    broker = Mosquitto(users={INGEST: "x"}, acl=ACL)
    try:
        test_conf = (broker.dir / "mosquitto.conf").read_text()
        acl_used = (broker.dir / "acl").read_bytes()
    finally:
        broker.cleanup()
    assert "allow_anonymous false\n" in test_conf
    assert f"acl_file {broker.dir / 'acl'}\n" in test_conf
    assert acl_used == ACL.read_bytes(), "the broker runs the committed ACL, byte for byte"
    assert re.search(r"^password_file \S+$", test_conf, re.MULTILINE)


def test_the_password_example_holds_no_user_and_no_hash() -> None:
    text = (MOSQUITTO_DIR / "passwd.example").read_text()
    assert all(line.startswith("#") for line in text.splitlines() if line.strip())
    assert not re.search(r"\$[67]\$\S*\$[A-Za-z0-9+/]{16,}", text)  # a mosquitto_passwd hash
