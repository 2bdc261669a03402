"""The MQTT read path without paho's per-message objects: packets split from large socket reads,
PUBLISH decoded here, every other packet handed to paho.

Why: profiled on the drain (BENCHMARKS.md, issue #17), paho spent 42 % of the service's time on
receiving: one ``recv()`` per header byte and one per body, an MQTT v5 ``Properties`` object built
and parsed for every PUBLISH, an ``MQTTMessage``, a debug-log format and a topic-matcher walk.
None of that is needed to hand a message to the pipeline. So the bridge reads the socket itself,
up to ``READ_SIZE`` bytes at a time, and splits the bytes into packets:
- a QoS 0 or 1 PUBLISH whose properties are all of the kinds a broker may send to a subscriber is
  decoded here (topic, packet id, DUP, the Subscription Identifiers, payload);
- anything else (CONNACK, SUBACK, PINGRESP, DISCONNECT, a QoS 2 PUBLISH, a packet this module cannot
  read) goes to paho's own handler, as paho would have read it, so that connection state, keepalive
  and errors stay paho's.

PUBACKs likewise: the acknowledgements of one commit become one buffer queued on paho's outgoing
queue (in order with whatever paho sends), written with one ``send()``.

While the receive window is full (``step()`` given no room), the reader keeps reading: PUBLISHes
stay in the buffer, unprocessed and in their order, until room returns, and every other packet
behind them is handed to paho at once, in its own order. Without that no PINGRESP is read during a
slow write, and paho gives a healthy connection up about two keepalives into it. What is read ahead
is bounded by ``READ_AHEAD_MAX`` (plus the one read that crosses it): at the bound the bridge stops
reading, and TCP holds the rest at the broker. A broker keeps QoS 1 within Receive Maximum, but
nothing bounds QoS 0 (nor a broker that overshoots the window, as Mosquitto 2.0 does on a restored
session), hence the cap. It is a fixed 4 MiB rather than ``receive_maximum`` x the broker's
message size limit: the service does not know that limit, and at the defaults the product would be
512 MiB more, doubling the memory the window already allows, for QoS 0 floods only.

Handing a packet to paho ahead of the PUBLISHes before it reorders them. Taken case by case, for
what a server sends a client (MQTT 5.0, 2.1.2):
- PINGRESP: keepalive only, no relation to any message: the reason to read ahead;
- SUBACK, UNSUBACK: answers to the bridge's requests; the broker may send a subscription's messages
  before its SUBACK (3.8.4), and the bridge ties no message to the SUBACK. Read ahead, a refusal
  ends the connection sooner, and a new session's SUBACK behind a full window no longer waits past
  ``connect_timeout``;
- PUBACK, PUBREC, PUBCOMP: answers to the client's own PUBLISHes (the bridge sends none); PUBREL
  follows a PUBREC the bridge never sends (it ends the connection on a QoS 2 PUBLISH): paho has
  nothing of either to tie to a message; CONNACK comes first on a connection, before any PUBLISH;
- DISCONNECT, AUTH (the bridge asks for no enhanced authentication: paho refuses it), and a
  malformed packet end the connection. They are handed over at once too, and the PUBLISHes read
  before them are dropped with the connection: a QoS 1 one could not be acknowledged on it anyway
  (acknowledgements belong to the connection they arrived on), and the broker sends it again with
  the session; a QoS 0 one is lost, as QoS 0 messages in flight on a lost connection are. Holding
  the end of the connection back until the window reopens would not save them: the broker has
  closed the socket, and paho's next PINGREQ would end it as well, only later and without the
  broker's reason code. The loss is logged with its count. The end of the socket (EOF) is taken
  the same way.
PUBLISHes are never reordered among themselves: a QoS 2 PUBLISH, or one paho decodes, waits in its
place like the others.

This uses paho internals (``_in_packet``, ``_packet_handle``, ``_loop_rc_handle``, ``_packet_queue``,
``_last_bytes_received``, ``_msgtime_mutex``). They are pinned: ``PAHO_VERSION`` is the release they
were read from, and tests/unit/test_mqttwire.py fails when the installed paho is another one or
they change shape, so an upgrade is a deliberate step.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt as paho_mqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket

__all__ = ["PAHO_VERSION", "READ_AHEAD_MAX", "READ_SIZE", "PacketReader", "Publish", "decode_publish", "paho_problem",
           "puback_bytes", "queue_pubacks"]

log = logging.getLogger("ingest.mqtt")

PAHO_VERSION = "2.2.0"
READ_SIZE = 256 * 1024  # bytes per recv(): a few hundred small messages, or four maximal ones
READ_AHEAD_MAX = 16 * READ_SIZE  # bytes held in the buffer while the window is full (4 MiB; module docstring)

_PUBLISH = 0x30
_PUBACK = 0x40

# MQTT v5 properties a server may put on a PUBLISH (MQTT 5.0, 3.3.2.3), by identifier: how to skip
# each. "varint" ones are read (0x0B, Subscription Identifier: the one the bridge needs).
_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PUBLISH_PROPERTIES = {
    0x01: _BYTE,  # Payload Format Indicator
    0x02: _FOUR,  # Message Expiry Interval
    0x03: _UTF8,  # Content Type
    0x08: _UTF8,  # Response Topic
    0x09: _BINARY,  # Correlation Data
    0x0B: _VARINT,  # Subscription Identifier (may repeat)
    0x23: _TWO,  # Topic Alias (only when the client allowed aliases; the bridge never does)
    0x26: _PAIR,  # User Property (may repeat)
}


class Publish:
    """One decoded PUBLISH: what the bridge needs of it, nothing more."""

    __slots__ = ("dup", "mid", "payload", "qos", "subscriptions", "topic")

    def __init__(self, topic: bytes, payload: bytes, qos: int, mid: int, dup: bool,
                 subscriptions: tuple[int, ...]) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.mid = mid
        self.dup = dup
        self.subscriptions = subscriptions


def _varint(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """A Variable Byte Integer at ``pos`` (value, position after it), or None if it does not fit."""
    value = shift = 0
    for _ in range(4):
        if pos >= end:
            return None
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    return None


def decode_publish(header: int, body: bytes | bytearray | memoryview, v5: bool) -> Publish | None:
    """The PUBLISH of fixed-header byte ``header`` and ``body`` (everything after the remaining
    length), or None when it is not one this module reads (QoS 2, an empty topic, a property it
    does not know, a length that does not fit): paho reads those, and refuses the malformed."""
    qos = (header >> 1) & 0x03
    if qos > 1:
        return None
    end = len(body)
    if end < 2:
        return None
    tlen = (body[0] << 8) | body[1]
    pos = 2 + tlen
    if tlen == 0 or pos > end:
        return None
    topic = bytes(body[2:pos])
    mid = 0
    if qos:
        if pos + 2 > end:
            return None
        mid = (body[pos] << 8) | body[pos + 1]
        pos += 2
        if mid == 0:
            return None
    subscriptions: tuple[int, ...] = ()
    if v5:
        got = _varint(body, pos, end)
        if got is None:
            return None
        plen, pos = got
        pend = pos + plen
        if pend > end:
            return None
        if plen:
            ids: list[int] = []
            while pos < pend:
                kind = _PUBLISH_PROPERTIES.get(body[pos])
                ident = body[pos]
                pos += 1
                if kind is None:
                    return None
                if kind == _VARINT:
                    got = _varint(body, pos, pend)
                    if got is None:
                        return None
                    value, pos = got
                    if ident == 0x0B:
                        if value == 0:
                            return None
                        ids.append(value)
                elif kind == _BYTE:
                    pos += 1
                elif kind == _TWO:
                    if ident == 0x23:
                        return None  # a topic alias: never allowed by the bridge, paho decides
                    pos += 2
                elif kind == _FOUR:
                    pos += 4
                else:
                    for _ in range(2 if kind == _PAIR else 1):
                        if pos + 2 > pend:
                            return None
                        pos += 2 + ((body[pos] << 8) | body[pos + 1])
                if pos > pend:
                    return None
            subscriptions = tuple(ids)
    return Publish(topic, bytes(body[pos:]), qos, mid, bool(header & 0x08), subscriptions)


def puback_bytes(mids: list[int]) -> bytes:
    """PUBACKs of ``mids`` (success, no properties: MQTT 3.1.1 and, with Remaining Length 2, MQTT 5)."""
    out = bytearray(4 * len(mids))
    i = 0
    for mid in mids:
        out[i] = _PUBACK
        out[i + 1] = 2
        out[i + 2] = mid >> 8
        out[i + 3] = mid & 0xFF
        i += 4
    return bytes(out)


def paho_problem(client: paho.Client) -> str | None:
    """Why this paho client does not have the internals the read path uses (another paho release than
    the one they were read from), or None."""
    missing = [name for name in ("_in_packet", "_packet_handle", "_loop_rc_handle", "_packet_queue",
                                 "_last_bytes_received", "_msgtime_mutex") if not hasattr(client, name)]
    version = getattr(paho_mqtt, "__version__", "?")
    if missing or not str(version).startswith(PAHO_VERSION.rsplit(".", 1)[0] + "."):
        return (f"paho-mqtt {version} is not the release ingest.mqttwire was written against ({PAHO_VERSION}"
                f"{'; it lacks ' + ', '.join(missing) if missing else ''}): install paho-mqtt "
                f"{PAHO_VERSION.rsplit('.', 1)[0]}.x (pyproject.toml pins it)")
    return None


def _fresh_in_packet() -> dict[str, Any]:
    return {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
            "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}


class PacketReader:
    """Reads one paho client's socket in large chunks and splits the bytes into packets.

    ``on_publish(publishes)`` receives the PUBLISHes of one step, in order; the other packets go to
    paho between them, in their order. A step stops at ``room`` PUBLISHes (the receive window); the
    PUBLISHes after that wait in the buffer for the next ``step()``, and the other packets behind
    them go to paho at once (module docstring). The buffer holds a partial packet, and while the
    window is full what was read ahead: ``full`` says when that reaches ``READ_AHEAD_MAX``.
    """

    def __init__(self, client: paho.Client, v5: bool) -> None:
        self.client = client
        self.v5 = v5
        self.buf = bytearray()
        self.eof = False  # the socket said EOF or failed: paho is to see it (step() hands it over)
        # buf[:held] is whole PUBLISHes only, read ahead while the window was full and already
        # searched for packets to hand to paho: the next search starts after them.
        self.held = 0

    def reset(self) -> None:
        """A new connection: nothing read from the old one is kept."""
        self._discard(0)
        self.eof = False

    @property
    def pending(self) -> bool:
        """Bytes read from the socket and not yet taken (maybe a whole packet)."""
        return bool(self.buf)

    @property
    def full(self) -> bool:
        """The buffer holds ``READ_AHEAD_MAX`` bytes or more: read no more until a step takes some."""
        return len(self.buf) >= READ_AHEAD_MAX

    def fill(self, sock: Any) -> bool:
        """One ``recv()``. False when nothing came (would block); EOF and errors are left to paho."""
        try:
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
            return False
        except ssl.SSLWantWriteError:
            return False
        except OSError:
            self.eof = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        client = self.client
        with client._msgtime_mutex:
            client._last_bytes_received = time.monotonic()
        return True

    def step(self, room: int, on_publish: Callable[[list[Publish]], int]) -> tuple[int, bool]:
        """Take complete packets from the buffer: at most ``room`` PUBLISHes (of QoS 0 or 1: both are
        counted unacknowledged until their commit).

        ``on_publish(publishes)`` takes them in order and returns how many it took: fewer when reading
        was paused meanwhile (an overfull inbox); the rest stay in the buffer, unread, and so does
        everything after them. Returns (PUBLISHes taken, whether the connection is still open). A
        packet for paho is handled at its place in the order, after the PUBLISHes before it, unless
        the window is full before it: then it is handled at once (``_read_ahead``).
        """
        buf = self.buf
        end = len(buf)
        pos = 0
        taken = 0
        out: list[Publish] = []
        ends: list[int] = []  # where each publish of ``out`` ends in the buffer
        alive = True
        stopped = False  # on_publish took fewer than it was given: nothing more this step
        window_full = False  # stopped at a PUBLISH for want of room

        def flush() -> None:
            nonlocal out, ends, pos, taken, stopped
            if not out:
                return
            took = on_publish(out)
            if took < len(out):
                stopped = True
                taken -= len(out) - took
                pos = ends[took - 1] if took else out_start
            out, ends = [], []

        out_start = 0
        view = memoryview(buf)
        try:
            while pos + 2 <= end:
                header = buf[pos]
                # Remaining length: 1 to 4 bytes.
                got = _varint(buf, pos + 1, end)
                if got is None:
                    if end - pos >= 5:  # five length bytes: a protocol error, paho says so
                        flush()
                        if stopped:
                            break
                        alive = self._to_paho(header, bytes(buf[pos + 1:pos + 5]), malformed=True)
                        pos = end
                    break
                length, start = got
                stop = start + length
                if stop > end:
                    break
                if header & 0xF0 == _PUBLISH:
                    if taken >= room:
                        window_full = True
                        break
                    if (header >> 1) & 0x03 > 1:
                        # Above the QoS the subscriptions were granted (at most 1): a broker's protocol
                        # error. paho would PUBREC it at once, before any commit: the connection ends.
                        flush()
                        if stopped:
                            break
                        log.error("MQTT broker sent a QoS 2 PUBLISH on a QoS 1 subscription: disconnecting "
                                  "(the broker keeps the message in the session)")
                        alive = self._to_paho(header, b"", malformed=True)
                        break
                    publish = decode_publish(header, view[start:stop], self.v5)
                    if publish is not None:
                        if not out:
                            out_start = pos
                        out.append(publish)
                        ends.append(stop)
                        taken += 1
                        pos = stop
                        continue
                    # Not one this module reads (a topic alias, a property unknown here): paho's
                    # handler decodes it and hands it to the bridge's on_message, in its place.
                flush()
                if stopped:
                    break
                pos = stop
                if header & 0xF0 == _PUBLISH:
                    taken += 1
                alive = self._to_paho(header, bytes(buf[start:stop]))
                if not alive:
                    break
            if not stopped:
                flush()
        finally:
            view.release()
        if alive and window_full and not stopped:
            alive = self._read_ahead(pos)
        if alive:
            del buf[:pos]
            self.held = max(0, self.held - pos)
        else:
            self._discard(pos)
        return taken, alive

    def _read_ahead(self, pos: int) -> bool:
        """The window is full at the PUBLISH at ``pos``: hand every other packet after it to paho now,
        in order, cutting it out of the buffer, and leave the PUBLISHes where they are. False if the
        connection ended."""
        buf = self.buf
        end = len(buf)
        pos = max(pos, self.held)
        while pos + 2 <= end:
            header = buf[pos]
            got = _varint(buf, pos + 1, end)
            if got is None:
                if end - pos >= 5:
                    return self._to_paho(header, bytes(buf[pos + 1:pos + 5]), malformed=True)
                break
            length, start = got
            stop = start + length
            if stop > end:
                break
            if header & 0xF0 != _PUBLISH:
                body = bytes(buf[start:stop])
                del buf[pos:stop]
                end -= stop - pos
                if not self._to_paho(header, body):
                    return False
                continue
            pos = stop
        self.held = pos
        return True

    def _discard(self, pos: int) -> None:
        """Empty the buffer, the connection being over; say how many messages it held from ``pos`` on
        (read ahead behind a full window, or held by a pause): the module docstring says why they go."""
        buf = self.buf
        end = len(buf)
        qos0 = qos1 = 0
        while pos + 2 <= end:
            got = _varint(buf, pos + 1, end)
            if got is None or got[1] + got[0] > end:
                break
            if buf[pos] & 0xF0 == _PUBLISH:
                if buf[pos] & 0x06:
                    qos1 += 1
                else:
                    qos0 += 1
            pos = got[1] + got[0]
        buf.clear()
        self.held = 0
        if qos0:
            log.warning("MQTT connection ended with %d message(s) read and not yet handed over: %d at QoS 0 are "
                        "lost, %d at QoS 1 come again with the session", qos0 + qos1, qos0, qos1)
        elif qos1:
            log.info("MQTT connection ended with %d QoS 1 message(s) read and not yet handed over: they come "
                     "again with the session", qos1)

    def _to_paho(self, header: int, body: bytes, malformed: bool = False) -> bool:
        """Hand one packet to paho's handler, as its own reader would; False if the connection ended."""
        client = self.client
        if malformed:
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        else:
            packet = _fresh_in_packet()
            packet.update(command=header, have_remaining=1, remaining_length=len(body), packet=bytearray(body))
            client._in_packet = packet  # type: ignore[assignment]
            try:
                rc = client._packet_handle()
            except MalformedPacket:
                rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
            finally:
                client._in_packet = _fresh_in_packet()  # type: ignore[assignment]
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            client._loop_rc_handle(rc)
        return client.socket() is not None

    def lost(self) -> None:
        """The socket said EOF or failed: let paho read it and end the connection its way."""
        self._discard(0)
        self.eof = False
        self.client.loop_read()


def queue_pubacks(client: paho.Client, mids: list[int]) -> None:
    """Queue the PUBACKs of ``mids`` as one packet on paho's outgoing queue (after what is there)."""
    if mids:
        client._packet_queue(_PUBACK, puback_bytes(mids), 0, 0)
