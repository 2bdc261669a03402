"""The MQTT bridge: paho-mqtt (MQTT v5, manual acks) driven by the asyncio event loop.

Design (after aiomqtt): paho's socket is watched with loop.add_reader / add_writer and its
housekeeping (keepalive pings) runs from a once-a-second task, so every paho call is made by the
event loop and paho's callbacks only register and hand over messages. The one exception is the
blocking TCP/TLS connect, which runs in a worker thread while the loop makes no other paho call;
the socket is registered with the loop only after it returns.

Delivery contract:
- persistent session: clean_start False on every connect (paho would clean the first one) and a
  SessionExpiryInterval, so the broker keeps what we have not acknowledged while we are away;
- a ReceiveMaximum on every connect bounds the unacknowledged messages (and our memory), and the
  bridge enforces that bound itself: while ``receive_maximum`` messages are unacknowledged it hands
  no more messages over. It keeps reading the socket, so that PINGRESPs and the broker's other
  packets are still seen (ingest.mqttwire: they go to paho at once, the PUBLISHes wait in the read
  buffer), up to ``mqttwire.READ_AHEAD_MAX`` bytes; past that it reads nothing (TCP flow control
  holds the rest at the broker) until acknowledgements free the window. Brokers do not always keep
  to it: Mosquitto 2.0 restores a session from its persistence file with up to
  ``max_inflight_messages`` messages already in flight and sends them all when the client resumes
  the session, whatever Receive Maximum it asks for;
- a message is acknowledged only through ``ack()``, only on the connection (epoch) it arrived on,
  and in arrival order (AckTracker). A PUBACK goes out as soon as that connection can carry it:
  from its CONNACK on, while its socket is open, whether or not the SUBACK has come (a broker may
  send messages ahead of it); one committed before that waits in the tracker, still counted as
  unacknowledged, and is sent at the CONNACK. Once the socket is gone the epoch is over and the
  broker redelivers what was not acknowledged;
- reading is paused for reasons (``pause_reading(reason)``: "shutdown" by default, or an overfull
  queue), each held and released on its own: the socket is read again only when no reason holds it;
- ``suspend()`` disconnects on purpose (the database is away: nothing could be acknowledged, and a
  connection that only holds messages is better closed than dropped by the broker on missed pings),
  keeping the session; ``resume()`` connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ingest.acks import AckTracker
from ingest.alerts.catchup import CatchUp
from ingest.metrics import Metrics
from ingest.model import Clock, RawMessage, utc_now
from ingest.mqttwire import PacketReader, Publish, paho_problem, queue_pubacks
from ingest.routing import subscription_ids
from ingest.settings import MqttSettings

__all__ = ["MqttBridge", "MqttConnectError", "configure_client"]

log = logging.getLogger(__name__)

# Messages handed over, and reads of up to mqttwire.READ_SIZE bytes, per readiness callback before
# the loop gets a turn (fairness with the writer task).
_MAX_PACKETS_PER_WAKE = 2000
_MAX_READS_PER_WAKE = 8


class MqttConnectError(Exception):
    def __init__(self, message: str, reason_code: int | None = None) -> None:
        self.reason_code = reason_code
        super().__init__(message)


def configure_client(client: paho.Client, s: MqttSettings) -> None:
    """What every client of the service's broker shares: the connect timeout, the credentials (the
    password only from the settings, which read it from the environment) and TLS."""
    client.connect_timeout = s.connect_timeout
    user, password = s.credentials()
    if user is not None:
        client.username_pw_set(user, password)
    if s.tls:
        client.tls_set(ca_certs=str(s.ca_file) if s.ca_file else None,
                       certfile=str(s.cert_file) if s.cert_file else None,
                       keyfile=str(s.key_file) if s.key_file else None)


class MqttBridge:
    def __init__(
        self,
        settings: MqttSettings,
        filters: list[str],
        sink: Callable[[RawMessage], None],
        *,
        metrics: Metrics | None = None,
        clock: Clock = utc_now,
        on_session: Callable[[int, bool], None] = lambda epoch, resumed: None,
        identifiers: list[int] | None = None,
        catchup: CatchUp | None = None,
    ) -> None:
        if not filters:
            raise ValueError("no subscription filters: configure at least one source")
        self.settings = settings
        self.plain_filters = list(filters)
        self.filters = [f"$share/{settings.shared_group}/{f}" if settings.shared_group else f for f in filters]
        # Filters that one topic can match both of (a preset's +/sensor/+/state and
        # homeassistant/+/+/#) make the broker send such a topic once per filter (Mosquitto), or once
        # with the identifiers of all of them. So every filter that overlaps another is subscribed
        # with its own subscription identifier (routing.subscription_ids, stable across restarts and
        # config changes), and each message carries the identifiers it was sent for
        # (RawMessage.subscriptions), so that the copies can be told apart; see Processor.process.
        self.identifiers = identifiers if identifiers is not None else subscription_ids(filters)
        if len(self.identifiers) != len(self.filters):
            raise ValueError("one subscription identifier (or 0) per filter")
        self.identify = any(self.identifiers)
        self._identified = False  # this connection's subscriptions carry identifiers
        self._suback_mids: dict[int, list[int]] = {}  # SUBSCRIBE packet id -> its filters' indexes
        self._suback_codes: list[ReasonCode | None] = []
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        self.on_session = on_session  # (epoch, session resumed) after each CONNACK
        self.catchup = catchup  # told of connections, disconnections and full windows (ingest.alerts.catchup)
        self.tracker = AckTracker()
        self.connected = False  # connected and subscribed
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._sock: Any = None
        self._reader: PacketReader | None = None
        self._connecting = False
        self._can_ack = False  # the current epoch's CONNACK accepted us (PUBACKs may go while _sock is open)
        self._read_holds: set[str] = set()  # reasons given to pause_reading(), each until its resume_reading()
        self._window_full = False  # receive_maximum messages unacknowledged: nothing handed over until acks
        self._stopping = False
        self.suspended: str | None = None  # why, while disconnected on purpose
        self._resumed = asyncio.Event()
        self._ready: asyncio.Event | None = None
        self._disconnected: asyncio.Event | None = None
        self._connack: asyncio.Future[tuple[ReasonCode, bool, Properties | None]] | None = None
        self._suback: asyncio.Future[list[ReasonCode | None]] | None = None
        self._subscribe_error: MqttConnectError | None = None  # a late SUBACK refused a filter
        self._connect_error: str | None = None  # paho's first error while the connection awaits its CONNACK
        self._refusals = 0  # late SUBACK refusals in a row, for their backoff
        self._warned_ids = False
        self._misc_task: asyncio.Task[None] | None = None

    # ---- public -------------------------------------------------------------------------------

    async def wait_ready(self) -> None:
        assert self._ready is not None, "run() first"
        await self._ready.wait()

    async def run(self) -> None:
        """Connect, subscribe, and reconnect with capped backoff until stop()."""
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._client = self._make_client()
        delay = self.settings.reconnect_min
        failing_since: float | None = None
        while not self._stopping:
            if self.suspended is not None:
                await self._resumed.wait()
                continue
            try:
                await self._connect_once()
            except (MqttConnectError, OSError, TimeoutError, ssl.SSLError) as exc:
                if self.catchup is not None:
                    self.catchup.disconnected()
                self._teardown_socket()
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "MQTT broker %s:%d unavailable: %s; retrying with backoff",
                        self.settings.host,
                        self.settings.port,
                        exc,
                    )
                with contextlib.suppress(paho.WebsocketConnectionError, OSError):
                    self._client.disconnect()
                await self._sleep(delay * (0.8 + 0.4 * random.random()))
                delay = min(delay * 2, self.settings.reconnect_max)
                continue
            if failing_since is not None:
                log.info("MQTT broker back after %.1fs", time.monotonic() - failing_since)
                failing_since = None
            delay = self.settings.reconnect_min
            self.connected = True
            self._set_gauge(1)
            self._ready.set()
            await self._disconnected.wait()
            if self.catchup is not None:
                self.catchup.disconnected()
            self.connected = False
            self._set_gauge(0)
            self._ready.clear()
            self._teardown_socket()
            if self._subscribe_error is not None:
                refused, self._subscribe_error = self._subscribe_error, None
                log.warning("MQTT broker %s:%d: %s; retrying with backoff", self.settings.host, self.settings.port,
                            refused)
                failing_since = time.monotonic()
                self._refusals += 1
                backoff = min(self.settings.reconnect_min * 2 ** min(self._refusals, 16), self.settings.reconnect_max)
                await self._sleep(backoff * (0.8 + 0.4 * random.random()))
            elif self.suspended is not None:
                log.warning("MQTT disconnected on purpose (%s); the broker keeps the session and %d "
                            "unacknowledged message(s)", self.suspended, self.tracker.unacked)
            elif not self._stopping:
                log.warning(
                    "MQTT connection lost; %d unacknowledged message(s) will be redelivered", self.tracker.unacked
                )
                failing_since = time.monotonic()

    def ack(self, epoch: int, seqs: list[int]) -> int:
        """Messages of ``epoch`` have committed: acknowledge all that now can be, in arrival order.

        Returns how many acknowledgements were sent now. Those the connection cannot carry yet (no
        CONNACK) stay in the tracker and go out at the CONNACK; those of an epoch whose socket is gone
        are never sent (the broker redelivers them).
        """
        if epoch != self.tracker.epoch:
            return 0
        self.tracker.mark_committed(epoch, seqs)
        return self._send_acks()

    def _send_acks(self) -> int:
        """Send the acknowledgements the tracker holds, if the current connection can carry them."""
        client = self._client
        # Not ``self.connected``: that waits for the SUBACK, and messages may come (and commit) before it.
        if client is None or not self._can_ack or self._sock is None:
            return 0
        to_ack = self.tracker.take_acks()
        if to_ack:
            # One buffer of PUBACKs on paho's outgoing queue, in order with what paho sends itself.
            queue_pubacks(client, [mid for mid, qos in to_ack if qos == 1])
            # Flush now rather than at the next writable callback: the broker frees its inflight slots
            # (Receive Maximum) only when it sees the PUBACKs.
            client.loop_write()
            if self.metrics is not None:
                self.metrics.messages_acked.inc(len(to_ack))
        # Even when no PUBACK went out: committed QoS 0 messages leave the window too, and a window
        # full of them would otherwise hold reading back until the keepalive gives the connection up.
        if self._window_full and self.tracker.unacked < self.settings.receive_maximum:
            self._set_window_full(False)
            self._watch_reads()
        return len(to_ack)

    @property
    def window_full(self) -> bool:
        """receive_maximum messages are unacknowledged: no more messages are handed over until some are
        (the socket is still read, up to mqttwire.READ_AHEAD_MAX bytes ahead, for the other packets)."""
        return self._window_full

    def pause_reading(self, reason: str = "shutdown") -> None:
        """Stop taking new packets from the socket for ``reason`` until ``resume_reading(reason)``.

        Reasons are held independently (the service's shutdown, the pipeline's overfull queue): the
        end of one must not undo another. Pausing again for a reason already held changes nothing.
        """
        if not self._read_holds and self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock)
        self._read_holds.add(reason)

    def resume_reading(self, reason: str = "shutdown") -> None:
        """Release the hold of ``reason``; reading resumes only when no other reason holds it."""
        if reason in self._read_holds:
            self._read_holds.discard(reason)
            self._watch_reads()

    @property
    def reading_paused(self) -> frozenset[str]:
        """The reasons that currently hold reading back (empty: not paused by pause_reading())."""
        return frozenset(self._read_holds)

    def _watch_reads(self) -> None:
        """Watch the socket again unless something still holds reading back; read what waits. A full
        window is no reason not to: the socket is read ahead of it, and _on_readable stops at the bound."""
        if self._read_holds or self._sock is None or self._loop is None:
            return
        self._loop.add_reader(self._sock, self._on_readable)
        self._loop.call_soon(self._on_readable)

    def suspend(self, why: str) -> None:
        """Disconnect cleanly and stay away until resume(); the broker keeps the session."""
        if self.suspended is not None or self._stopping:
            return
        self.suspended = why
        self._resumed.clear()
        if self.metrics is not None:
            self.metrics.mqtt_suspended.set(1)
            self.metrics.held.hold("broker connection suspended")
        self._disconnect_now()

    def resume(self) -> None:
        if self.suspended is None:
            return
        log.info("MQTT reconnecting: %s is over", self.suspended)
        self.suspended = None
        if self.metrics is not None:
            self.metrics.mqtt_suspended.set(0)
            self.metrics.held.release("broker connection suspended")
        self._resumed.set()

    def _disconnect_now(self) -> None:
        client = self._client
        if client is not None and self._sock is not None:
            client.disconnect()
            with contextlib.suppress(Exception):
                client.loop_write()
        if self._disconnected is not None:
            self._disconnected.set()  # also cuts a reconnect backoff short
        self._teardown_socket()

    async def stop(self) -> None:
        """Disconnect cleanly. The broker keeps the session (and what was not acknowledged)."""
        self._stopping = True
        self._resumed.set()
        self._disconnect_now()

    # ---- connection ---------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        problem = paho_problem(client)
        if problem is not None:
            raise RuntimeError(problem)
        configure_client(client, s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message  # the PUBLISHes ingest.mqttwire leaves to paho
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    async def _connect_once(self) -> None:
        assert self._loop is not None
        assert self._client is not None
        assert self._disconnected is not None
        loop, client, s = self._loop, self._client, self.settings
        epoch = self.tracker.new_epoch()
        self._can_ack = False  # until this connection's CONNACK accepts us
        self._set_window_full(False)  # the new epoch starts with nothing unacknowledged
        self._disconnected.clear()
        self._connack = loop.create_future()
        self._suback = None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.session_expiry
        props.ReceiveMaximum = s.receive_maximum
        # paho reports why a socket failed (e.g. a TLS alert or EOF) only to its log. Listen to it until
        # the CONNACK only (_on_connect stops it): paho formats every line it logs for this callback.
        self._connect_error = None
        client.on_log = self._on_connect_log
        self._connecting = True
        try:
            # Blocking TCP (and TLS) connect, bounded by client.connect_timeout, off the loop.
            await loop.run_in_executor(
                None,
                lambda: client.connect(s.host, s.port, s.keepalive, clean_start=False, properties=props),
            )
        finally:
            self._connecting = False
        sock = client.socket()
        if sock is None:
            raise MqttConnectError("the connection closed during connect")
        self._sock = sock
        self._reader = PacketReader(client, v5=True)
        if not self._read_holds:
            loop.add_reader(sock, self._on_readable)
        if client.want_write():
            loop.add_writer(sock, self._on_writable)
        self._misc_task = loop.create_task(self._misc_loop(), name="mqtt-misc")
        try:
            rc, session_present, cprops = await asyncio.wait_for(self._connack, s.connect_timeout)
        except TimeoutError as exc:
            raise MqttConnectError(f"no CONNACK within {s.connect_timeout:.0f}s") from exc
        if rc.is_failure:
            hint = ""
            if rc.value in (0x86, 0x87):  # Bad user name or password / Not authorized
                hint = (
                    " (check the username in mqtt.url or SENSOR_INGEST_MQTT_USERNAME, and SENSOR_INGEST_MQTT_PASSWORD)"
                )
            elif rc.value == 0x85:  # Client Identifier not valid
                hint = " (check mqtt.client_id)"
            raise MqttConnectError(f"broker refused the connection: {rc}{hint}", rc.value)
        # From here the connection can carry PUBACKs, SUBACK or not; send any that were committed early.
        self._can_ack = True
        self._send_acks()
        granted = {}
        if cprops is not None:
            for name in (
                "ReceiveMaximum",
                "SessionExpiryInterval",
                "ServerKeepAlive",
                "MaximumQoS",
                "AssignedClientIdentifier",
            ):
                if hasattr(cprops, name):
                    granted[name] = getattr(cprops, name)
        if self.connections and self.metrics is not None:
            self.metrics.reconnects.inc()
        if session_present:
            self.on_session(epoch, True)
        if self.catchup is not None:
            self.catchup.connected(bool(session_present))
        self.connections += 1
        log.info(
            "MQTT connected to %s:%d as %r (epoch %d, session %s, receive_maximum sent %d; broker: %s)",
            s.host,
            s.port,
            s.client_id,
            epoch,
            "resumed" if session_present else "new",
            s.receive_maximum,
            granted or "no limits announced",
        )
        self._suback = loop.create_future()
        opts = SubscribeOptions(qos=s.qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        ids_available = cprops is None or getattr(cprops, "SubscriptionIdentifierAvailable", 1) != 0
        if self.identify and not ids_available and not self._warned_ids:
            self._warned_ids = True
            log.warning("MQTT broker has no subscription identifiers: a topic that matches two of the "
                        "subscription filters (%s) may arrive twice; switch off the presets or sources whose "
                        "topics overlap", ", ".join(self.filters))
        self._identified = self.identify and ids_available
        self._suback_mids = {}
        if self._identified:
            # One SUBSCRIBE for the filters without an identifier, one per filter with one (a
            # SUBSCRIBE carries at most one identifier, for all of its filters).
            self._suback_codes = [None] * len(self.filters)
            plain = [i for i, sid in enumerate(self.identifiers) if not sid]
            groups = ([(plain, None)] if plain else []) + [([i], sid) for i, sid in enumerate(self.identifiers) if sid]
            for indexes, sid in groups:
                sprops = None
                if sid:
                    sprops = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
                    sprops.SubscriptionIdentifier = sid
                result, mid = client.subscribe([(self.filters[i], opts) for i in indexes], properties=sprops)
                if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                    raise MqttConnectError(f"subscribe failed to send: {paho.error_string(result)}")
                self._suback_mids[mid] = indexes
        else:
            result, _mid = client.subscribe([(f, opts) for f in self.filters])
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise MqttConnectError(f"subscribe failed to send: {paho.error_string(result)}")
        if session_present and s.shared_group:
            # A session of a run without shared_group (one process, before --workers) still holds the
            # plain filters: the broker would send every message here once more, besides the group's
            # share. Sent after the SUBSCRIBE, on the same connection, so that the broker has the
            # shared subscription before the plain one goes (no moment without either). Unsubscribing
            # a filter the session does not hold is answered "No subscription existed" and changes
            # nothing. Messages already queued in the session still come on Mosquitto; MQTT 5 lets
            # another broker drop those not yet sent (3.10.4).
            client.unsubscribe(list(self.plain_filters))
        if session_present:
            # The session already holds the subscriptions, and the broker may send the session's
            # messages ahead of the SUBACK; reading stops at a full window until they are
            # acknowledged, so waiting here for the SUBACK could wait forever. It is checked when
            # it comes.
            self._suback.add_done_callback(self._late_suback)
            return
        try:
            codes = await asyncio.wait_for(self._suback, s.connect_timeout)
        except TimeoutError as exc:
            raise MqttConnectError(f"no SUBACK within {s.connect_timeout:.0f}s") from exc
        self._check_suback(codes)

    def _check_suback(self, codes: list[ReasonCode | None]) -> None:
        # One code per filter, in order; a SUBACK with fewer codes than its SUBSCRIBE had filters
        # leaves None, which is no grant.
        codes = [*codes, *([None] * (len(self.filters) - len(codes)))]
        refused = [(f, "no reason code" if c is None else str(c))
                   for f, c in zip(self.filters, codes, strict=False) if c is None or c.is_failure]
        if refused:
            raise MqttConnectError("broker refused subscriptions: " + ", ".join(f"{f} ({c})" for f, c in refused))
        self._refusals = 0
        log.info("MQTT subscribed to %s", ", ".join(self.filters))

    def _late_suback(self, fut: asyncio.Future[list[ReasonCode | None]]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # the connection was lost: run() is already handling that
        try:
            self._check_suback(fut.result())
        except MqttConnectError as exc:
            # Counts as a failed connect: disconnect, and run() retries with backoff.
            self._subscribe_error = exc
            self._disconnect_now()

    def _teardown_socket(self) -> None:
        self._can_ack = False
        if self._reader is not None:
            self._reader.reset()  # nothing read from this connection is handed over after it
        self._set_window_full(False)  # nothing more can be read from this socket anyway
        if self._misc_task is not None:
            self._misc_task.cancel()
            self._misc_task = None
        if self._sock is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock)
                self._loop.remove_writer(self._sock)
        self._sock = None

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when stop() is called."""
        assert self._disconnected is not None
        self._disconnected.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._disconnected.wait(), seconds)

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._client is not None:
                self._client.loop_misc()

    # ---- event-loop I/O -----------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Read what the socket holds, in large reads, and hand the messages over (ingest.mqttwire).

        At most ``receive_maximum`` messages are unacknowledged: at a full window no more messages are
        taken from the buffer until acknowledgements free it, but the socket is still read, so that
        paho sees PINGRESPs (and the rest that is not a message), until the buffer holds
        ``mqttwire.READ_AHEAD_MAX`` bytes; then nothing more is read (TCP flow control holds the rest at
        the broker) until acknowledgements free the window. Bounded per wake, for fairness with the
        writer task."""
        client, reader = self._client, self._reader
        if client is None or reader is None or self._sock is None or client.socket() is not self._sock:
            return  # a callback scheduled for a connection that is gone
        limit = self.settings.receive_maximum
        handed = 0
        for _ in range(_MAX_READS_PER_WAKE):
            if self._read_holds:
                return
            if reader.pending:
                taken, alive = reader.step(limit - self.tracker.unacked, self._on_publishes)
                handed += taken
                if not alive or self._read_holds:
                    return
            if self.tracker.unacked >= limit:
                self._set_window_full(True)
                if reader.full:
                    if self._sock is not None and self._loop is not None:
                        self._loop.remove_reader(self._sock)
                    return
            if handed >= _MAX_PACKETS_PER_WAKE:
                break
            sock = client.socket()
            if sock is None:
                return
            if not reader.fill(sock):
                if reader.eof:
                    reader.step(limit - self.tracker.unacked, self._on_publishes)
                    if client.socket() is not None:
                        reader.lost()
                return
        sock = client.socket()
        if self._loop is not None and (reader.pending or (isinstance(sock, ssl.SSLSocket) and sock.pending())):
            # What is already read may hold whole packets, and TLS may hold decrypted bytes, which no
            # readiness of the socket announces.
            self._loop.call_soon(self._on_readable)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        """A PUBLISH paho decoded (one ingest.mqttwire does not read: a topic alias, a property it does
        not know), handed over like the others, in its place in the order."""
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if self.identify else None
        subscriptions = (tuple(ids) if isinstance(ids, list) else (int(ids),)) if ids else ()
        self._on_publishes([Publish(bytes(msg._topic), bytes(msg.payload), msg.qos, msg.mid, bool(msg.dup),
                                    subscriptions)], all_of_them=True)

    def _on_publishes(self, publishes: list[Publish], *, all_of_them: bool = False) -> int:
        """The PUBLISHes of one read, in order: registered for acknowledgement and handed over, until
        reading is paused (the pipeline's inbox is full: its submit() pauses it); returns how many were
        taken (the rest stay unread in the reader's buffer). ``all_of_them``: paho read it already."""
        arrived, sink, identify, clock, holds = self.tracker.arrived, self.sink, self.identify, self.clock, \
            self._read_holds
        now, epoch = time.monotonic(), self.tracker.epoch
        took = 0
        for p in publishes:
            if holds and not all_of_them:
                break
            raw = p.topic
            try:
                topic = raw.decode()
            except UnicodeDecodeError:  # brokers validate topics, but never let one stop the loop
                topic = raw.decode("utf-8", "replace")
            # A clock reading per message, not per read: a reading without a time of its own takes
            # the receive time, and two messages of one read must not become one row.
            # Identifiers also for a message in the same read as the CONNACK, before _identified is set.
            sink(RawMessage(topic, p.payload, clock(), p.qos, p.mid, epoch, arrived(p.mid, p.qos, now), p.dup,
                            p.subscriptions if identify else ()))
            took += 1
        return took

    def _on_writable(self) -> None:
        if self._client is not None:
            self._client.loop_write()

    # ---- paho callbacks (on the loop, except during the threaded connect) ---------------------

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not self._connecting and self._loop is not None and self._sock is not None:
            self._loop.add_writer(sock, self._on_writable)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not self._connecting and self._loop is not None and self._sock is not None:
            self._loop.remove_writer(sock)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._sock is not None and sock is self._sock and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            self._sock = None

    def _on_connect_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        if level == paho.MQTT_LOG_ERR and self._connect_error is None:
            self._connect_error = buf

    def _no_connack(self, reason_code: ReasonCode) -> str:
        """Why a connection ended before its CONNACK, as far as this side can tell."""
        why = f"disconnected before CONNACK: {reason_code}"
        if self._connect_error is not None:
            why += f" ({self._connect_error})"
        s = self.settings
        if s.tls and s.cert_file is None:
            why += ("; a broker that requires a client certificate ends the TLS connection like this when none "
                    "is given: set mqtt.cert_file and mqtt.key_file")
        elif s.tls:
            why += (f"; a broker ends the TLS connection like this when it does not accept the client certificate: "
                    f"check that mqtt.cert_file ({s.cert_file}) is valid and issued by a CA the broker trusts")
        return why

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Properties | None
    ) -> None:
        client.on_log = None  # the CONNACK came: see _connect_once
        if self._connack is not None and not self._connack.done():
            self._connack.set_result((reason_code, bool(flags.session_present), properties))

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if self._suback is None or self._suback.done():
            return
        if not self._suback_mids:
            self._suback.set_result(list(reason_codes))
            return
        for index, code in zip(self._suback_mids.pop(mid, []), reason_codes, strict=False):
            self._suback_codes[index] = code
        if not self._suback_mids:  # every filter's SUBACK came
            self._suback.set_result(list(self._suback_codes))

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Properties | None
    ) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(MqttConnectError(self._no_connack(reason_code)))
        if self._suback is not None and not self._suback.done():
            self._suback.set_exception(MqttConnectError(f"disconnected before SUBACK: {reason_code}"))
        if self._disconnected is not None:
            self._disconnected.set()

    def _set_window_full(self, full: bool) -> None:
        if full and self.catchup is not None:
            self.catchup.window_full()
        if full == self._window_full:
            return
        self._window_full = full
        if self.metrics is not None:
            if full:
                self.metrics.held.hold("receive window full")
            else:
                self.metrics.held.release("receive window full")

    def _set_gauge(self, value: int) -> None:
        if self.metrics is not None:
            self.metrics.mqtt_connected.set(value)
