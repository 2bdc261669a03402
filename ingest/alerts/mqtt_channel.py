"""Alert events over MQTT: the topic they go to, and the publisher the dispatcher delivers with.

Topic. ``<alerts.mqtt_prefix>/alerts/<rule>/<device>``, where the rule and the device id are each
one topic level: every character outside a conservative set is percent-encoded as the bytes of its
UTF-8, so that ``unescape_level`` gives the name back exactly. Encoded: those that cannot stand in a
level (``/``, ``+``, ``#``), the ones a broker refuses in a topic (NUL and the other control
characters, and the Unicode non-characters U+FDD0..U+FDEF and U+xFFFE/U+xFFFF, which Mosquitto
answers with a disconnect), a leading ``$`` (topics starting with ``$`` are the broker's own) and
``%`` itself (``%2F``, ``%2B``, ``%23``, ``%00``, ``%EF%BF%BF``, ``%24``, ``%25``). The prefix is plain
levels (no wildcard, no leading ``$``), and the settings refuse a prefix whose alert topics
(``<prefix>/alerts/+/+``) any subscription of the service could match (ingest.settings
``_alerts_mqtt_fits``): the service never reads its own alerts back.

Delivery (AlertPublisher). The event's row in alert_outbox (webhook ``mqtt:alerts``) is claimed,
ordered, leased, retried and failed by the dispatcher exactly as a webhook's; the attempt is a
PUBLISH at QoS 1, retain false, and it succeeds only on the broker's PUBACK with a success reason
code (below 0x80: 0x00, or 0x10 "no matching subscribers", which Mosquitto sends when nobody
subscribes: the broker has taken the message, so it is delivered in the sense of this outbox). A
refusal a retry cannot change fails the row, as a webhook's 4xx does: PUBACK 0x87 (not authorized:
the broker's ACL), 0x90 (topic name invalid), 0x99 (payload format invalid), or a PUBLISH larger
than the broker's Maximum Packet Size (0x95). Any other refusal, a lost connection or a missing
PUBACK is retried.

The client is its own (client id ``<mqtt.client_id>-alerts``, so it never takes over the ingest
session; clean start: it receives nothing, and nothing of an old session is resent), made with the
service's broker settings (URL, credentials, TLS), and runs paho's network thread (loop_start)
without paho's reconnecting (reconnect_on_failure false). Its callbacks only hand (client, what
happened) to the event loop (call_soon_threadsafe); all the state (the futures waiting for a
PUBACK, the current client) lives on the event loop, so there is no lock shared with paho's thread,
and a callback of a client that was thrown away is ignored. A PUBACK's handler runs on the loop, so
always after publish() registered the future of the mid paho gave it. A connection is made when a
row is to be delivered and kept; when it is lost, or a PUBACK does not come within PUBLISH_TIMEOUT,
the client is thrown away with its in-flight messages: a new one is made for the next attempt, so a
message that is retried is never also resent by paho from the old connection. A broker that took
the first copy but whose PUBACK was lost (or came too late) still gets the retry: delivery is at
least once, like a webhook's; receivers deduplicate on the body's ``id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:
    from ingest.settings import MqttSettings

__all__ = ["CHANNEL_NAME", "PUBLISH_TIMEOUT", "AlertPublisher", "Outcome", "alert_topic", "alerts_filter",
           "escape_level", "prefix_problem", "unescape_level"]

CHANNEL_NAME = "mqtt:alerts"  # alert_outbox.webhook of MQTT rows: ":" is in no [[webhooks]] name
PUBLISH_TIMEOUT = 10.0  # seconds from PUBLISH to PUBACK before the attempt is retried
Outcome = Literal["delivered", "retry", "failed"]
# PUBACK reason codes a retry cannot change (see the module's docstring); 0x97 "quota exceeded" passes.
FINAL_PUBACK = frozenset({0x87, 0x90, 0x99})
PACKET_TOO_LARGE = 0x95
_UNSAFE = frozenset("/+#%")


def _encoded(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))


def _unsafe(c: str) -> bool:
    o = ord(c)
    return (c in _UNSAFE or o < 0x20 or 0x7F <= o <= 0x9F or 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE
            or 0xD800 <= o <= 0xDFFF)


def escape_level(name: str) -> str:
    """``name`` as one topic level (see the module's docstring); reversed by unescape_level."""
    out = "".join(_encoded(c) if _unsafe(c) else c for c in name)
    return "%24" + out[1:] if out.startswith("$") else out


def unescape_level(level: str) -> str:
    return urllib.parse.unquote(level, errors="surrogatepass")


def alert_topic(prefix: str, rule: str, device: str) -> str:
    return f"{prefix}/alerts/{escape_level(rule)}/{escape_level(device)}"


def alerts_filter(prefix: str) -> str:
    """The filter the alert topics under ``prefix`` are exactly (what no subscription may overlap)."""
    return f"{prefix}/alerts/+/+"


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
    if any(_unsafe(c) and c not in _UNSAFE for c in prefix):
        return "holds a control character or a Unicode non-character"
    return None


def _topic_of(prefix: str, body: bytes) -> str:
    """The topic of an outbox row: its body is the standard JSON body, which names rule and device."""
    data = json.loads(body)
    rule, device = data["rule"], data["device"]
    if not isinstance(rule, str) or not isinstance(device, str):
        raise ValueError("rule and device are not strings")
    return alert_topic(prefix, rule, device)


def _publish_size(topic: str, body: bytes) -> int:
    """Bytes of the MQTT v5 PUBLISH (QoS 1, no properties) of ``body`` to ``topic``."""
    remaining = 2 + len(topic.encode("utf-8")) + 2 + 1 + len(body)
    return 1 + next(n for n in (1, 2, 3, 4) if remaining < 128 ** n) + remaining


def _code(reason: ReasonCode) -> str:
    return f"{reason} (0x{reason.value:02x})"


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
        self._client: paho.Client | None = None  # the current one; callbacks of any other are ignored
        self._connected = False
        self._connecting: asyncio.Task[str | None] | None = None  # the attempt every publish() waits for
        self._connack: asyncio.Future[str | None] | None = None
        self._max_packet: int | None = None  # the broker's Maximum Packet Size (CONNACK), if it sent one
        self._waiting: dict[int, asyncio.Future[tuple[Outcome, str | None]]] = {}  # mid -> its PUBACK

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.settings.tls else 'mqtt'}://{self.settings.host}:{self.settings.port}"

    @property
    def deadline(self) -> float:
        """The longest one publish() takes: the connect (TCP and TLS, then the CONNACK, each bounded by
        mqtt.connect_timeout) and the PUBACK, plus a second. The dispatcher's bound must be larger."""
        return 2 * self.settings.connect_timeout + PUBLISH_TIMEOUT + 1.0

    # -- the client: paho's thread only hands events to the loop -----------------------------------

    def _make_client(self, loop: asyncio.AbstractEventLoop) -> paho.Client:
        s = self.settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=False)
        from ingest.mqtt import configure_client  # here: ingest.mqtt imports the settings, which import this

        configure_client(client, s)

        def hand(handler: Any, *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(handler, *args)

        client.on_connect = lambda c, u, f, reason, props: hand(self._connack_came, c, reason, props)
        client.on_disconnect = lambda c, u, f, reason, props: hand(self._lost, c, reason)
        client.on_publish = lambda c, u, mid, reason, props: hand(self._puback, c, mid, reason)
        return client

    def _connack_came(self, client: paho.Client, reason: ReasonCode, properties: Any) -> None:
        if client is not self._client or self._connack is None or self._connack.done():
            return
        self._max_packet = getattr(properties, "MaximumPacketSize", None)
        self._connected = not reason.is_failure
        self._connack.set_result(f"the broker refused the connection: {_code(reason)}" if reason.is_failure else None)

    def _lost(self, client: paho.Client, reason: ReasonCode) -> None:
        if client is not self._client:
            return
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(f"disconnected before CONNACK: {_code(reason)}")
        self._drop(f"the broker connection was lost before the PUBACK: {_code(reason)}")

    def _puback(self, client: paho.Client, mid: int, reason: ReasonCode) -> None:
        if client is not self._client:
            return  # a late PUBACK of a thrown-away client: its mid may be the current one's too
        fut = self._waiting.pop(mid, None)
        if fut is None or fut.done():
            return
        if not reason.is_failure:  # 0x00, or 0x10 "no matching subscribers": the broker has the message
            fut.set_result(("delivered", None))
        else:
            final = reason.value in FINAL_PUBACK
            fut.set_result(("failed" if final else "retry", f"the broker refused the PUBLISH: {_code(reason)}"))

    def _drop(self, why: str) -> None:
        """Throw the client away with its in-flight messages (nothing of it is ever resent); the
        messages waiting for its PUBACK are retried."""
        client, self._client, self._connected = self._client, None, False
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_result(("retry", why))
        if client is not None:
            # loop_stop() joins paho's thread: not on the event loop.
            threading.Thread(target=_stop, args=(client,), name="mqtt-alerts-stop", daemon=True).start()

    async def _connect(self) -> str | None:
        """Connected, or why not. Concurrent callers share one attempt (so none waits longer than one)."""
        if self._client is not None and self._connected:
            return None
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._attempt_connect())
        return await asyncio.shield(self._connecting)

    async def _attempt_connect(self) -> str | None:
        self._drop("the broker connection was closed")
        loop = asyncio.get_running_loop()
        client = self._client = self._make_client(loop)
        connack = self._connack = loop.create_future()
        s = self.settings
        try:
            await loop.run_in_executor(None, lambda: client.connect(s.host, s.port, s.keepalive, clean_start=True))
        except (OSError, ValueError) as exc:
            if client is self._client:
                self._drop("the broker connection was closed")
            return f"broker {self.address} unavailable: {exc}"
        if client is not self._client:
            _stop(client)
            return "the broker connection was closed"
        client.loop_start()
        why: str | None
        try:
            why = await asyncio.wait_for(asyncio.shield(connack), s.connect_timeout)
        except TimeoutError:
            why = f"no CONNACK from {self.address} within {s.connect_timeout:g}s"
        if why is not None and client is self._client:
            self._drop("the broker connection was closed")
        return why

    # -- delivery -----------------------------------------------------------------------------------

    async def publish(self, body: bytes) -> tuple[Outcome, str | None]:
        """Publish one outbox body: ("delivered", None) on a successful PUBACK, ("retry", why), or
        ("failed", why) for a refusal a retry cannot change; a body that names no rule and device
        raises ValueError (the row can never be published). Takes at most ``deadline`` seconds."""
        topic = _topic_of(self.prefix, body)
        why = await self._connect()
        if why is not None:
            return "retry", why
        client = self._client
        assert client is not None
        if self._max_packet is not None and _publish_size(topic, body) > self._max_packet:
            return "failed", (f"the PUBLISH is larger than the broker's maximum packet size of {self._max_packet} "
                              f"bytes (0x{PACKET_TOO_LARGE:02x} packet too large)")
        # No await from here to the future's registration: the PUBACK's handler runs on this loop,
        # so it finds the future.
        info = client.publish(topic, body, qos=1, retain=False)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._drop("the broker connection was closed")
            return "retry", f"the PUBLISH could not be sent: {paho.error_string(info.rc)}"
        fut: asyncio.Future[tuple[Outcome, str | None]] = asyncio.get_running_loop().create_future()
        self._waiting[info.mid] = fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), PUBLISH_TIMEOUT)
        except TimeoutError:
            # paho may still send it: drop the client, so that only the retry can (at least once).
            if client is self._client:
                self._drop(f"another PUBLISH had no PUBACK within {PUBLISH_TIMEOUT:g}s")
            return "retry", f"no PUBACK from {self.address} within {PUBLISH_TIMEOUT:g}s"
        finally:
            if self._waiting.get(info.mid) is fut:
                del self._waiting[info.mid]

    async def aclose(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        self._drop("the publisher was closed")
