"""A scripted MQTT v5 broker peer, for packet orders a real broker will not produce on demand.

``ScriptedBroker`` is a real TCP server on 127.0.0.1:<free port>, run on the test's own asyncio loop
(``async with ScriptedBroker(...) as broker``). It plays one fixed part for each client connection:

1. reads CONNECT (MQTT 5 only) and answers CONNACK: success, session present 0 (or 1, with
   ``session_present``), followed in the same write by the ``with_connack`` PUBLISH packets;
2. reads SUBSCRIBE, then sends the ``before_suback`` PUBLISH packets *ahead of* the SUBACK (MQTT does
   not forbid it: a message routed to a subscription the broker has already installed), then the
   SUBACK at once, or, with ``hold_suback``, only after ``release_suback()``, reading on meanwhile.
   Each filter is granted QoS 1 unless ``suback_codes`` gives it a reason code (e.g. 0x87, Not
   authorized); the mapping may be changed at any time, and each SUBACK uses it as it is then;
3. answers PINGREQ, records the packet id of every PUBACK in ``pubacks`` (in order, across
   connections), sends more PUBLISH packets on demand (``publish()``, optionally hanging up right
   after, in the same turn) and ends the connection on DISCONNECT or EOF.

Any other packet, or a malformed one, is recorded in ``problems`` and ends the connection; tests
assert it stays empty. Packets are encoded by hand per MQTT 5.0: fixed header (§2.1), Variable Byte
Integer lengths (§1.5.5), two-byte string lengths (§1.5.4), and a property length of 0 (§2.2.2) on
every packet sent, as no properties are needed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

__all__ = ["Publish", "ScriptedBroker"]

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    1, 2, 3, 4, 8, 9, 12, 13, 14,
)


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    packet_id: int = 1  # ignored for QoS 0


class ProtocolError(Exception):
    pass


def encode_varint(n: int) -> bytes:
    """A Variable Byte Integer: 7 bits a byte, least significant first, high bit = more follow."""
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"{n} does not fit a Variable Byte Integer")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the Variable Byte Integer at ``pos``."""
    value = 0
    for i in range(4):
        if pos + i >= len(data):
            raise ProtocolError("truncated Variable Byte Integer")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise ProtocolError("Variable Byte Integer longer than 4 bytes")


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_varint(len(body)) + body


def utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def connack(session_present: bool = False) -> bytes:
    # Acknowledge flags (bit 0: session present), reason code 0 (Success), property length 0.
    return packet(CONNACK << 4, bytes([int(session_present), 0, 0]))


def suback(packet_id: int, filters: int, granted_qos: int = 1) -> bytes:
    return suback_reasons(packet_id, [granted_qos] * filters)


def suback_reasons(packet_id: int, codes: Sequence[int]) -> bytes:
    """A SUBACK with one reason code per filter (§3.9.3): 0-2 grant that QoS, 0x80 and up refuse."""
    return packet(SUBACK << 4, struct.pack("!H", packet_id) + b"\x00" + bytes(codes))


def publish(msg: Publish) -> bytes:
    if msg.qos not in (0, 1, 2):
        raise ValueError(f"bad QoS {msg.qos}")
    body = utf8(msg.topic)
    if msg.qos:
        body += struct.pack("!H", msg.packet_id)
    body += b"\x00" + msg.payload  # property length 0
    return packet(PUBLISH << 4 | msg.qos << 1, body)


def pingresp() -> bytes:
    return packet(PINGRESP << 4, b"")


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(first byte of the fixed header, the rest of the packet) of the next packet."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        raise ProtocolError("remaining length longer than 4 bytes")
    return first, await reader.readexactly(length)


def parse_connect(body: bytes) -> None:
    if body[:6] != utf8("MQTT"):
        raise ProtocolError(f"CONNECT with protocol name {body[:6]!r}")
    if len(body) < 7 or body[6] != 5:
        raise ProtocolError("CONNECT is not MQTT 5")


def parse_subscribe(body: bytes) -> tuple[int, list[str]]:
    """(packet id, topic filters) of a SUBSCRIBE."""
    if len(body) < 3:
        raise ProtocolError("truncated SUBSCRIBE")
    (packet_id,) = struct.unpack_from("!H", body)
    props, pos = decode_varint(body, 2)
    pos += props
    filters = []
    while pos < len(body):
        if pos + 2 > len(body):
            raise ProtocolError("truncated SUBSCRIBE filter")
        (size,) = struct.unpack_from("!H", body, pos)
        end = pos + 2 + size
        if end + 1 > len(body):
            raise ProtocolError("truncated SUBSCRIBE filter")
        filters.append(body[pos + 2 : end].decode())
        pos = end + 1  # the subscription options byte
    if not filters:
        raise ProtocolError("SUBSCRIBE without filters")
    return packet_id, filters


def parse_puback(body: bytes) -> int:
    """The packet id of a PUBACK (a reason code and properties may follow; not needed here)."""
    if len(body) < 2:
        raise ProtocolError("truncated PUBACK")
    (packet_id,) = struct.unpack_from("!H", body)
    return int(packet_id)


class ScriptedBroker:
    def __init__(
        self,
        *,
        session_present: bool = False,
        with_connack: Sequence[Publish] = (),
        before_suback: Sequence[Publish] = (),
        hold_suback: bool = False,
        suback_codes: Mapping[str, int] | None = None,
    ) -> None:
        self.session_present = session_present
        self.with_connack = list(with_connack)
        self.before_suback = list(before_suback)
        self.pubacks: list[int] = []
        self.subscriptions: list[list[str]] = []  # the filters of each SUBSCRIBE, in order
        self.problems: list[str] = []
        self.subacks_sent = 0
        self.suback_codes: dict[str, int] = dict(suback_codes or {})  # filter -> reason code; others QoS 1
        self.subacks: list[list[int]] = []  # the reason codes of each SUBACK sent, in order
        self.pubacks_before_suback = 0  # of those in pubacks, received before the first SUBACK was sent
        self.connections = 0
        self.port = 0
        self._suback_released = asyncio.Event()
        if not hold_suback:
            self._suback_released.set()
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None  # the current connection's
        self._writers: set[asyncio.StreamWriter] = set()  # every open connection's
        self._handlers: set[asyncio.Task[None]] = set()  # one per connection, run by asyncio.Server
        self._subacks: set[asyncio.Task[None]] = set()  # SUBACKs waiting for release_suback()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedBroker:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening and close every connection; each handler then ends on its own.

        Handlers are not cancelled: asyncio.Server's done-callback (3.11) calls exception() on them,
        which raises for a cancelled task and is logged as an error.
        """
        if self._server is not None:
            self._server.close()
        for task in list(self._subacks):
            task.cancel()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def release_suback(self) -> None:
        self._suback_released.set()

    async def publish(self, msg: Publish, *, then_hang_up: bool = False) -> None:
        """Send a PUBLISH on the current connection, now; ``then_hang_up``: and a FIN right behind it."""
        writer = self._writer
        if writer is None:
            raise RuntimeError("no client connected")
        writer.write(publish(msg))
        if then_hang_up:
            writer.write_eof()  # shutdown(SHUT_WR) at once, unlike close(), which waits a loop turn
        await writer.drain()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        self._writer = writer
        self._writers.add(writer)
        try:
            await self._play(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except (ProtocolError, UnicodeDecodeError, struct.error) as exc:
            self.problems.append(f"connection {self.connections}: {exc}")
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            if self._writer is writer:
                self._writer = None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _send_suback(self, writer: asyncio.StreamWriter, packet_id: int, filters: list[str]) -> None:
        await self._suback_released.wait()
        if writer.is_closing():
            return
        codes = [self.suback_codes.get(f, 1) for f in filters]
        writer.write(suback_reasons(packet_id, codes))
        self.subacks.append(codes)
        self.subacks_sent += 1
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _play(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, body = await read_packet(reader)
        if first >> 4 != CONNECT:
            raise ProtocolError(f"expected CONNECT, got packet type {first >> 4}")
        parse_connect(body)
        writer.write(connack(self.session_present) + b"".join(publish(m) for m in self.with_connack))
        await writer.drain()
        while True:
            first, body = await read_packet(reader)
            kind = first >> 4
            if kind == SUBSCRIBE:
                packet_id, filters = parse_subscribe(body)
                self.subscriptions.append(filters)
                for msg in self.before_suback:
                    writer.write(publish(msg))
                await writer.drain()
                # Keep reading (PUBACKs may come) while the SUBACK waits for release_suback().
                later = asyncio.create_task(self._send_suback(writer, packet_id, filters))
                self._subacks.add(later)
                later.add_done_callback(self._subacks.discard)
            elif kind == PUBACK:
                self.pubacks.append(parse_puback(body))
                self.pubacks_before_suback += self.subacks_sent == 0
            elif kind == PINGREQ:
                writer.write(pingresp())
                await writer.drain()
            elif kind == DISCONNECT:
                return
            else:
                raise ProtocolError(f"unexpected packet type {kind}")
