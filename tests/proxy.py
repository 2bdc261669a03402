"""A TCP proxy that injects network faults between the service and a real server.

``FaultProxy(target_port)`` listens on 127.0.0.1:<free port> and forwards to 127.0.0.1:target_port.
It runs its own asyncio loop in a daemon thread, so plain (sync) pytest code drives it; ``mode``
can be changed at any time and the change is in force when the assignment returns.

Modes, and what each imitates:

- ``"pass"``: forward both ways, unchanged: a healthy network.
- ``"refuse"``: a server that is down, or a firewall that REJECTs: every current connection is cut
  with a TCP reset, and each new one is accepted and reset at once (the client fails fast, with
  ECONNRESET rather than ECONNREFUSED: the port must stay ours for "pass" to work again).
- ``"blackhole"``: a network that silently drops packets (a cable pulled, a partition, a firewall
  that DROPs): nothing is forwarded and nothing is closed. New connections are accepted (the
  kernel completes the handshake) and then hear nothing; current connections freeze: the proxy
  stops reading them, so the peer's writes pile up in socket buffers and no reply ever comes.

Back to ``"pass"``, new connections work again; frozen connections stay frozen until ``cut()`` or
``close()``, like flows whose NAT or firewall state was lost during the partition.

Recording MQTT (``FaultProxy(port, record_mqtt=True)``): in every mode, each packet the proxy
forwards is also parsed from its MQTT (v5 or 3.1.1) fixed header and kept, in the order the proxy
saw it, as an ``MqttPacket``: its connection (numbered from 1 in accept order), its direction
("up": client to server, "down": server to client), its type and flags, its size, and the packet id,
topic, payload and reason code where the packet has them. The proxy forwards the bytes unchanged;
it records them before it forwards them, so a reply is always recorded after what it answers.
``packets()`` returns them; ``puback_problems()`` checks that every PUBACK a client sent answers a
PUBLISH of that same connection, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import threading
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

__all__ = ["CONNACK", "CONNECT", "PUBACK", "PUBLISH", "Direction", "FaultProxy", "Mode", "MqttPacket",
           "puback_problems"]

Mode = Literal["pass", "refuse", "blackhole"]
_MODES: tuple[Mode, ...] = ("pass", "refuse", "blackhole")
_CHUNK = 65536
T = TypeVar("T")

Direction = Literal["up", "down"]  # up: client -> server; down: server -> client
# MQTT control packet types (the high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
_ACKS = (PUBACK, 5, 6, 7)  # PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, then an optional reason code
_WITH_PACKET_ID = (*_ACKS, 8, 9, 10, 11)  # ... and SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK
_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP",
          8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP",
          14: "DISCONNECT", 15: "AUTH"}


@dataclass(frozen=True, slots=True)
class MqttPacket:
    """One MQTT control packet as the proxy forwarded it."""

    conn: int  # the TCP connection through the proxy, numbered from 1 in accept order
    direction: Direction
    type: int  # CONNECT, CONNACK, PUBLISH, PUBACK, ... (1 to 15)
    flags: int  # the low nibble of the fixed header (PUBLISH: DUP, QoS, RETAIN)
    size: int  # bytes on the wire, fixed header included
    packet_id: int | None = None  # PUBLISH at QoS > 0, PUBACK, SUBSCRIBE, SUBACK
    topic: str | None = None  # PUBLISH
    payload: bytes | None = None  # PUBLISH (MQTT v5: after the properties)
    reason: int | None = None  # CONNACK's reason code (return code in 3.1.1); PUBACK's when sent

    @property
    def name(self) -> str:
        return _NAMES.get(self.type, f"type {self.type}")

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 3 if self.type == PUBLISH else 0

    @property
    def dup(self) -> bool:
        return self.type == PUBLISH and bool(self.flags & 8)


def _varint(data: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """An MQTT Variable Byte Integer at ``at``: (value, offset after it), or None if incomplete."""
    value, shift = 0, 0
    for i in range(at, min(at + 4, len(data))):
        value |= (data[i] & 0x7F) << shift
        if not data[i] & 0x80:
            return value, i + 1
        shift += 7
    if len(data) - at >= 4:
        raise ValueError(f"malformed remaining length at byte {at}")
    return None


class _MqttStream:
    """Splits one direction of one connection into packets, whatever the TCP chunking."""

    def __init__(self, conn: int, direction: Direction, level: list[int]) -> None:
        self.conn, self.direction = conn, direction
        # The protocol level of the connection (5: MQTT v5, whose PUBLISH packets carry properties),
        # as its CONNECT says; one list shared by both directions.
        self.level = level
        self.broken = False
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[MqttPacket]:
        if self.broken:
            return
        buf = self._buf
        buf += data
        at = 0
        while len(buf) - at >= 2:
            header = _varint(buf, at + 1)
            if header is None:
                break
            length, body_at = header
            end = body_at + length
            if end > len(buf):
                break
            yield self._packet(buf[at], bytes(buf[body_at:end]), end - at)
            at = end
        del buf[:at]

    def _packet(self, first: int, body: bytes, size: int) -> MqttPacket:
        kind, flags = first >> 4, first & 0x0F
        packet_id: int | None = None
        topic: str | None = None
        payload: bytes | None = None
        reason: int | None = None
        if kind == PUBLISH:
            n = int.from_bytes(body[:2], "big")
            topic = body[2:2 + n].decode("utf-8", "replace")
            at = 2 + n
            if (flags >> 1) & 3:
                packet_id, at = int.from_bytes(body[at:at + 2], "big"), at + 2
            if self.level[0] == 5:
                props = _varint(body, at)
                if props is None:
                    raise ValueError("PUBLISH cut short in its properties")
                at = props[1] + props[0]
            payload = body[at:]
        elif kind in _WITH_PACKET_ID:
            packet_id = int.from_bytes(body[:2], "big")
            if kind in _ACKS and len(body) > 2:
                reason = body[2]
        elif kind == CONNACK:
            reason = body[1] if len(body) > 1 else None
        elif kind == CONNECT and len(body) > 6:
            self.level[0] = body[6]  # after the protocol name ("MQTT", length-prefixed)
        return MqttPacket(self.conn, self.direction, kind, flags, size, packet_id, topic, payload, reason)


def puback_problems(packets: Iterable[MqttPacket]) -> list[str]:
    """What is wrong with the PUBACKs clients sent, per connection: each must answer a QoS 1 PUBLISH
    the server sent on that same connection and that no PUBACK answered yet (a packet id is free
    for reuse once acknowledged). Empty when every PUBACK is right."""
    outstanding: dict[int, set[int]] = {}
    problems: list[str] = []
    for p in packets:
        if p.direction == "down" and p.type == PUBLISH and p.qos == 1 and p.packet_id is not None:
            outstanding.setdefault(p.conn, set()).add(p.packet_id)
        elif p.direction == "up" and p.type == PUBACK:
            waiting = outstanding.setdefault(p.conn, set())
            if p.packet_id in waiting:
                waiting.discard(p.packet_id)
            else:
                problems.append(f"connection {p.conn}: PUBACK for packet id {p.packet_id}, which the server "
                                "has not PUBLISHed on this connection (or that was acknowledged already)")
    return problems


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than a FIN."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and, unless it was frozen from the start, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, number: int = 0) -> None:
        self.client = client
        self.number = number  # in accept order, from 1
        self.upstream: asyncio.StreamWriter | None = None
        self.frozen = False
        self.done = asyncio.Event()

    def unread(self) -> int:
        """Bytes that wait in this link's sockets, received by the kernel and not read by the proxy."""
        total = 0
        for w in (self.client, self.upstream):
            sock = None if w is None or w.transport.is_closing() else w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
                    total += struct.unpack("i", buf)[0]
        return total

    def freeze(self) -> None:
        self.frozen = True
        for w in (self.client, self.upstream):
            if w is not None and isinstance(w.transport, asyncio.ReadTransport) and not w.transport.is_closing():
                w.transport.pause_reading()

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)
        self.done.set()

    def close(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None and not w.transport.is_closing():
                w.close()
        self.done.set()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, record_mqtt: bool = False) -> None:
        """``record_mqtt``: parse and keep every MQTT packet forwarded (see the module docstring)."""
        self.target = (target_host, target_port)
        self._mode: Mode = "pass"
        self._links: set[_Link] = set()
        self.record_mqtt = record_mqtt
        self._packets: list[MqttPacket] = []
        self._packets_lock = threading.Lock()
        self.parse_errors: list[str] = []  # bytes that were not MQTT (forwarded all the same)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fault-proxy-{target_port}", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.accepted = 0  # connections accepted so far, whatever the mode

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(_MODES)}")
        self._call(self._set_mode(mode))

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy (frozen ones included)."""
        return len(self._links)

    def cut(self) -> None:
        """Reset every current connection (frozen ones too); the mode stays as it is."""
        self._call(self._cut())

    def packets(
        self, type: int | None = None, *, conn: int | None = None, direction: Direction | None = None
    ) -> list[MqttPacket]:
        """The MQTT packets forwarded so far, in the order the proxy saw them (``record_mqtt``)."""
        if not self.record_mqtt:
            raise RuntimeError("this proxy does not record MQTT: make it with record_mqtt=True")
        with self._packets_lock:
            found = list(self._packets)
        return [p for p in found if (type is None or p.type == type) and (conn is None or p.conn == conn)
                and (direction is None or p.direction == direction)]

    def unread_bytes(self, conn: int | None = None) -> int:
        """Bytes received by the kernel on the proxy's sockets that the proxy has not read: what
        frozen (blackholed) connections sent into the void, as far as the buffers hold it. ``conn``:
        of that connection only (numbered from 1 in accept order)."""
        async def unread() -> int:
            return sum(link.unread() for link in self._links if conn is None or link.number == conn)

        return self._call(unread())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- on the proxy's loop ------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def _refusing(self) -> bool:
        return self._mode == "refuse"

    async def _set_mode(self, mode: Mode) -> None:
        self._mode = mode
        if mode == "refuse":
            await self._cut()
        elif mode == "blackhole":
            for link in self._links:
                link.freeze()

    async def _cut(self) -> None:
        for link in list(self._links):
            link.reset()

    async def _shutdown(self) -> None:
        self._server.close()
        await self._cut()
        for _ in range(200):  # let the handlers see their resets and end
            if not self._links:
                break
            await asyncio.sleep(0.01)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == "refuse":
            _reset(writer)
            return
        link = _Link(writer, self.accepted)
        self._links.add(link)
        try:
            if self._mode == "blackhole":
                link.freeze()
            else:
                try:
                    up_reader, link.upstream = await asyncio.open_connection(*self.target)
                except OSError:
                    link.reset()  # the server itself refuses: pass that on
                    return
                if self._refusing():  # the mode changed while connecting
                    link.reset()
                    return
                if link.frozen:
                    link.freeze()  # frozen while connecting: freeze the new upstream side too
                else:
                    up = down = None
                    if self.record_mqtt:
                        level = [5]
                        up, down = _MqttStream(link.number, "up", level), _MqttStream(link.number, "down", level)
                    await asyncio.gather(self._pump(link, reader, link.upstream, up),
                                         self._pump(link, up_reader, writer, down))
            await link.done.wait()
        finally:
            self._links.discard(link)

    async def _pump(self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    stream: _MqttStream | None = None) -> None:
        try:
            while not link.frozen and not link.done.is_set():
                data = await src.read(_CHUNK)
                if link.frozen:
                    return  # dropped on the floor; the proxy reads this connection no more
                if not data:
                    break
                if stream is not None:
                    self._record(stream, data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            link.reset()
            return
        if not link.frozen:
            link.close()

    def _record(self, stream: _MqttStream, data: bytes) -> None:
        try:
            packets = list(stream.feed(data))
        except (ValueError, IndexError) as exc:
            self.parse_errors.append(f"connection {stream.conn} {stream.direction}: {exc}")
            stream.broken = True  # the rest of this direction is not read as MQTT either
            return
        with self._packets_lock:
            self._packets.extend(packets)
