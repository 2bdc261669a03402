"""Alert events over MQTT: the topic they go to, and the publisher the dispatcher delivers with.

Topic. ``<alerts.mqtt_prefix>/alerts/<rule>/<device>``, where the rule and the device id are each
one topic level: the characters that cannot stand in a level (``/``, ``+``, ``#``), the ones a
broker refuses in a topic (NUL and the other control characters), a leading ``$`` (topics starting
with ``$`` are the broker's own) and ``%`` itself are percent-encoded as the bytes of their UTF-8
(``%2F``, ``%2B``, ``%23``, ``%00``, ``%24``, ``%25``), so that ``unescape_level`` gives the name
back exactly. The prefix is plain levels (no wildcard, no leading ``$``), and the settings refuse a
prefix whose ``<prefix>/alerts/#`` any subscription of the service could match
(ingest.settings ``_alerts_mqtt_fits``): the service never reads its own alerts back.

Delivery (AlertPublisher). The event's row in alert_outbox (webhook ``mqtt:alerts``) is claimed,
ordered, leased, retried and failed by the dispatcher exactly as a webhook's; the attempt is a
PUBLISH at QoS 1, retain false, and it succeeds only on the broker's PUBACK with a success reason
code (below 0x80: 0x00, or 0x10 "no matching subscribers", which Mosquitto sends when nobody
subscribes: the broker has taken the message, so it is delivered in the sense of this outbox).

The client is its own (client id ``<mqtt.client_id>-alerts``, so it never takes over the ingest
session; clean start: it receives nothing, and nothing of an old session is resent), made with the
service's broker settings (URL, credentials, TLS), and runs paho's network thread (loop_start): it
only publishes, and its callbacks only hand the PUBACK to the event loop (call_soon_threadsafe).
A connection is made when a row is to be delivered and kept; when it is lost, or a PUBACK does not
come within PUBLISH_TIMEOUT, the client is thrown away, not reconnected: a new one is made for the
next attempt, so that a message that was retried is never also resent by paho from the old
connection's in-flight queue (a broker that took the first copy but whose PUBACK was lost still
gets the retry: at least once, like a webhook; receivers deduplicate on the body's ``id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:
    from ingest.settings import MqttSettings

__all__ = ["CHANNEL_NAME", "PUBLISH_TIMEOUT", "AlertPublisher", "alert_topic", "alerts_filter", "escape_level",
           "prefix_problem", "unescape_level"]

CHANNEL_NAME = "mqtt:alerts"  # alert_outbox.webhook of MQTT rows: ":" is in no [[webhooks]] name
PUBLISH_TIMEOUT = 10.0  # seconds from PUBLISH to PUBACK before the attempt is retried
_UNSAFE = frozenset("/+#%")


def _encoded(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8"))


def _unsafe(c: str) -> bool:
    return c in _UNSAFE or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F


def escape_level(name: str) -> str:
    """``name`` as one topic level (see the module's docstring); reversed by unescape_level."""
    out = "".join(_encoded(c) if _unsafe(c) else c for c in name)
    return "%24" + out[1:] if out.startswith("$") else out


def unescape_level(level: str) -> str:
    return urllib.parse.unquote(level, errors="strict")


def alert_topic(prefix: str, rule: str, device: str) -> str:
    return f"{prefix}/alerts/{escape_level(rule)}/{escape_level(device)}"


def alerts_filter(prefix: str) -> str:
    """The filter every alert topic under ``prefix`` matches (what no subscription may overlap)."""
    return f"{prefix}/alerts/#"


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be alerts.mqtt_prefix, or None."""
    if not prefix:
        return "is empty"
    if any(c in prefix for c in "+#"):
        return "holds a wildcard ('+' or '#'): a PUBLISH topic cannot"
    if prefix.startswith("$"):
        return "starts with '$': such topics are the broker's own ($SYS) and subscribers of '#' do not see them"
    if prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
        return "has an empty level (a leading, trailing or double '/')"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in prefix):
        return "holds a control character"
    return None


def _topic_of(prefix: str, body: bytes) -> str:
    """The topic of an outbox row: its body is the standard JSON body, which names rule and device."""
    data = json.loads(body)
    rule, device = data["rule"], data["device"]
    if not isinstance(rule, str) or not isinstance(device, str):
        raise ValueError("rule and device are not strings")
    return alert_topic(prefix, rule, device)


def _stop(client: paho.Client) -> None:
    with contextlib.suppress(Exception):
        client.disconnect()
    with contextlib.suppress(Exception):
        client.loop_stop()


class AlertPublisher:
    """Publishes outbox bodies (see the module's docstring). Used from one event loop."""

    def __init__(self, settings: MqttSettings, prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix
        self.client_id = f"{settings.client_id}-alerts"
        self._client: paho.Client | None = None
        self._connected = False
        self._connecting = asyncio.Lock()
        self._lock = threading.Lock()  # between the publishing loop and paho's thread: the two maps
        self._waiting: dict[int, asyncio.Future[str | None]] = {}
        self._early: dict[int, str | None] = {}  # PUBACKs that came before publish() returned its mid
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connack: asyncio.Future[str | None] | None = None

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.settings.tls else 'mqtt'}://{self.settings.host}:{self.settings.port}"

    # -- the client ---------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=MQTTProtocolVersion.MQTTv5)
        from ingest.mqtt import configure_client  # here: ingest.mqtt imports the settings, which import this

        configure_client(client, s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _settle(self, fut: asyncio.Future[str | None] | None, value: str | None) -> None:
        if fut is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: None if fut.done() else fut.set_result(value))

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        self._connected = not reason.is_failure
        self._settle(self._connack, f"the broker refused the connection: {reason}" if reason.is_failure else None)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        if client is not self._client:
            return
        self._connected = False
        self._settle(self._connack, f"disconnected before CONNACK: {reason}")
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            self._settle(fut, f"the broker connection was lost before the PUBACK ({reason})")

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        # A success code below 0x80: 0x00, or 0x10 "no matching subscribers" (the broker has the message).
        verdict = None if not reason.is_failure else f"the broker refused the PUBLISH: {reason} (0x{reason.value:02x})"
        with self._lock:
            fut = self._waiting.pop(mid, None)
            if fut is None:
                self._early[mid] = verdict
        self._settle(fut, verdict)

    def _drop(self) -> None:
        """Throw the client away (see the module's docstring: nothing of it is ever resent)."""
        client, self._client, self._connected = self._client, None, False
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            self._early.clear()
        for fut in waiting.values():
            if not fut.done():
                fut.set_result("the broker connection was closed")
        if client is not None:
            # loop_stop() joins paho's thread: not on the event loop.
            threading.Thread(target=_stop, args=(client,), name="mqtt-alerts-stop", daemon=True).start()

    async def _connect(self) -> str | None:
        """Connected, or why not."""
        async with self._connecting:
            if self._client is not None and self._connected:
                return None
            self._drop()
            self._loop = loop = asyncio.get_running_loop()
            client = self._client = self._make_client()
            self._connack = loop.create_future()
            s = self.settings
            try:
                await loop.run_in_executor(None, lambda: client.connect(s.host, s.port, s.keepalive,
                                                                        clean_start=True))
            except (OSError, ValueError) as exc:
                self._drop()
                return f"broker {self.address} unavailable: {exc}"
            client.loop_start()
            try:
                why = await asyncio.wait_for(self._connack, s.connect_timeout)
            except TimeoutError:
                why = f"no CONNACK from {self.address} within {s.connect_timeout:g}s"
            if why is not None:
                self._drop()
            return why

    # -- delivery -----------------------------------------------------------------------------------

    async def publish(self, body: bytes) -> tuple[bool, str | None]:
        """Publish one outbox body: (True, None) on a successful PUBACK; (False, why) to retry; a
        body that names no rule and device raises ValueError (the row can never be published)."""
        topic = _topic_of(self.prefix, body)
        why = await self._connect()
        if why is not None:
            return False, why
        client = self._client
        assert client is not None
        assert self._loop is not None
        fut: asyncio.Future[str | None] = self._loop.create_future()
        with self._lock:
            info = client.publish(topic, body, qos=1, retain=False)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._drop_later()
                return False, f"the PUBLISH could not be sent: {paho.error_string(info.rc)}"
            if info.mid in self._early:
                fut.set_result(self._early.pop(info.mid))
            else:
                self._waiting[info.mid] = fut
        try:
            verdict = await asyncio.wait_for(fut, PUBLISH_TIMEOUT)
        except TimeoutError:
            self._drop()
            return False, f"no PUBACK from {self.address} within {PUBLISH_TIMEOUT:g}s"
        return verdict is None, verdict

    def _drop_later(self) -> None:
        assert self._loop is not None
        self._loop.call_soon(self._drop)  # not under self._lock, which _drop takes

    async def aclose(self) -> None:
        self._drop()
