"""The bridge's own MQTT read path (ingest.mqttwire): the same messages as paho's decoder, whatever
the split of the bytes into reads; and the paho internals it uses, pinned to the paho release."""

from __future__ import annotations

import inspect
import itertools
import socket
import struct
from collections.abc import Callable

import paho.mqtt as paho_mqtt
import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.mqttwire import PAHO_VERSION, PacketReader, Publish, decode_publish, puback_bytes

_UTF8 = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish(topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, props: bytes) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + props + payload
    return bytes([0x30 | (0x08 if dup else 0) | (qos << 1)]) + _varint(len(body)) + body


def _props(sub_ids: list[int], user: list[tuple[str, str]], content_type: str | None, expiry: int | None,
           fmt: int | None) -> bytes:
    """Properties packed by paho's own encoder (the other side's bytes)."""
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if sub_ids:
        # paho packs a list of identifiers as repeated properties.
        p.SubscriptionIdentifier = sub_ids
    if user:
        p.UserProperty = user
    if content_type is not None:
        p.ContentType = content_type
    if expiry is not None:
        p.MessageExpiryInterval = expiry
    if fmt is not None:
        p.PayloadFormatIndicator = fmt
    packed: bytes = p.pack()  # type: ignore[no-untyped-call]
    return packed


def test_paho_is_the_release_whose_internals_the_read_path_uses() -> None:
    """Fails on a paho upgrade: read ingest/mqttwire.py against the new paho, then move PAHO_VERSION."""
    assert paho_mqtt.__version__ == PAHO_VERSION
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="pin", protocol=MQTTProtocolVersion.MQTTv5)
    assert set(client._in_packet) == {"command", "have_remaining", "remaining_count", "remaining_mult",
                                      "remaining_length", "packet", "to_process", "pos"}
    assert hasattr(client, "_last_bytes_received")
    assert hasattr(client._msgtime_mutex, "__enter__")
    assert list(inspect.signature(client._packet_handle).parameters) == []
    assert list(inspect.signature(client._loop_rc_handle).parameters) == ["rc"]
    assert list(inspect.signature(client._packet_queue).parameters) == ["command", "packet", "mid", "qos", "info"]
    # paho's reader hands a whole packet to _packet_handle through _in_packet['command'] and ['packet'].
    source = inspect.getsource(paho.Client._packet_read)
    assert "self._packet_handle()" in source
    assert "self._in_packet['packet'] += data" in source
    assert "self._in_packet['command'] & 0xF0" in inspect.getsource(paho.Client._packet_handle)
    assert 'self._in_packet["packet"]' in inspect.getsource(paho.Client._handle_suback)


@settings(max_examples=300, deadline=None)
@given(
    topic=st.text(min_size=1, max_size=40).map(str.encode),
    payload=st.binary(max_size=300),
    qos=st.sampled_from([0, 1]),
    mid=st.integers(1, 65535),
    dup=st.booleans(),
    sub_ids=st.lists(st.integers(1, 268_435_455), max_size=3),
    # Strings as the specification allows them (no U+0000; paho refuses a packet that holds one).
    user=st.lists(st.tuples(st.text(_UTF8, max_size=8), st.text(_UTF8, max_size=8)), max_size=2),
    content_type=st.none() | st.text(_UTF8, max_size=10),
    expiry=st.none() | st.integers(0, 2**32 - 1),
    fmt=st.none() | st.sampled_from([0, 1]),
)
def test_a_publish_decodes_as_paho_decodes_it(topic: bytes, payload: bytes, qos: int, mid: int, dup: bool,
                                              sub_ids: list[int], user: list[tuple[str, str]],
                                              content_type: str | None, expiry: int | None,
                                              fmt: int | None) -> None:
    packet = _publish(topic, payload, qos, mid, dup, _props(sub_ids, user, content_type, expiry, fmt))
    header, rest = packet[0], packet[1:]
    length, n = 0, 0
    while True:
        length |= (rest[n] & 0x7F) << (7 * n)
        n += 1
        if not rest[n - 1] & 0x80:
            break
    body = rest[n:]
    theirs = _packet.decode_publish(header, body, MQTTProtocolVersion.MQTTv5)
    ours = decode_publish(header, body, v5=True)
    assert ours is not None
    assert (ours.topic, ours.payload, ours.qos, ours.dup) == (theirs.topic, theirs.payload, theirs.qos, theirs.dup)
    assert ours.mid == (theirs.mid if qos else 0)
    their_ids = getattr(theirs.properties, "SubscriptionIdentifier", [])
    assert list(ours.subscriptions) == (their_ids if isinstance(their_ids, list) else [their_ids])


def test_what_the_read_path_does_not_read_goes_to_paho() -> None:
    """QoS 2, a topic alias, a property a server may not send on a PUBLISH, a truncated body: None."""
    assert decode_publish(0x34, struct.pack("!H", 1) + b"t" + struct.pack("!H", 7) + b"\x00", v5=True) is None
    alias = b"\x03\x23\x00\x01"
    assert decode_publish(0x32, struct.pack("!H", 1) + b"t" + struct.pack("!H", 7) + alias, v5=True) is None
    will_delay = b"\x05\x18\x00\x00\x00\x01"
    assert decode_publish(0x32, struct.pack("!H", 1) + b"t" + struct.pack("!H", 7) + will_delay, v5=True) is None
    assert decode_publish(0x32, struct.pack("!H", 9) + b"t", v5=True) is None
    assert decode_publish(0x32, struct.pack("!H", 1) + b"t" + struct.pack("!H", 0) + b"\x00", v5=True) is None


def test_pubacks_are_the_bytes_paho_would_send() -> None:
    mids = [1, 255, 256, 65535]
    assert puback_bytes(mids) == b"".join(struct.pack("!BBH", 0x40, 2, m) for m in mids)


class _Sock:
    """A socket that returns the given chunks, then would block."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    def recv(self, n: int) -> bytes:
        if not self.chunks:
            raise BlockingIOError
        chunk = self.chunks.pop(0)
        assert len(chunk) <= n
        return chunk


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 40),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
    room=st.integers(1, 50),
    big=st.integers(0, 3),
)
def test_packets_come_whole_and_in_order_however_the_bytes_are_split(n: int, cuts: list[int], room: int,
                                                                    big: int) -> None:
    """A read may end anywhere (inside the length bytes, the topic, the payload); each step takes at
    most ``room`` QoS 1 messages and leaves the rest, unread, for the next."""
    stream = b"".join(
        _publish(f"t/{i}".encode(), (b"x" * (200 * big)) + str(i).encode(), i % 2, i + 1, False,
                 _props([i + 1] if i % 3 == 0 else [], [], None, None, None))
        for i in range(n))
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points) if b > a]
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="t", protocol=MQTTProtocolVersion.MQTTv5)
    reader = PacketReader(client, v5=True)
    sock = _Sock(chunks)
    got: list[Publish] = []
    unacked = 0

    def take(batch: list[Publish]) -> int:
        nonlocal unacked
        got.extend(batch)
        unacked += len(batch)  # QoS 0 too: unacknowledged until the commit
        return len(batch)

    for _ in range(10 * (n + len(chunks) + 1)):
        before = unacked
        taken, alive = reader.step(room, take)
        assert alive
        assert taken == unacked - before <= room
        unacked = 0  # acknowledged: the window is free again
        if not reader.fill(sock) and not sock.chunks:
            reader.step(10**6, take)
            break
    assert not reader.eof
    assert [p.topic for p in got] == [f"t/{i}".encode() for i in range(n)]
    assert [p.payload for p in got] == [b"x" * (200 * big) + str(i).encode() for i in range(n)]
    assert [p.subscriptions for p in got] == [((i + 1,) if i % 3 == 0 else ()) for i in range(n)]
    assert [p.mid for p in got] == [(i + 1) if i % 2 else 0 for i in range(n)]
    assert not reader.buf


def test_eof_is_noted_for_paho() -> None:
    class _Closed:
        def recv(self, n: int) -> bytes:
            return b""

    reader = PacketReader(paho.Client(CallbackAPIVersion.VERSION2, client_id="t",
                                      protocol=MQTTProtocolVersion.MQTTv5), v5=True)
    assert not reader.fill(_Closed())
    assert reader.eof


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])


def _client(connected: bool = False) -> paho.Client:
    """A paho client; ``connected``: with a socket (one end of a pair), as the bridge's has."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="t", protocol=MQTTProtocolVersion.MQTTv5,
                         manual_ack=True)
    if connected:
        ours, theirs = socket.socketpair()
        _PAIRS.append((ours, theirs))
        client._sock = ours
    return client


_PAIRS: list[tuple[socket.socket, socket.socket]] = []


def _taker(into: list[Publish], limit: int = 10**9) -> Callable[[list[Publish]], int]:
    """An on_publish that takes at most ``limit`` messages in all (then reading is "paused")."""
    def take(batch: list[Publish]) -> int:
        n = max(0, min(len(batch), limit - len(into)))
        into.extend(batch[:n])
        return n
    return take


def test_qos_0_messages_count_against_the_window_too() -> None:
    """QoS 0 messages are unacknowledged until their commit like QoS 1 ones: a step takes at most
    ``room`` of either (review of #17: a read of tiny QoS 0 messages went past receive_maximum)."""
    reader = PacketReader(_client(), v5=True)
    reader.buf += b"".join(_publish(f"t/{i}".encode(), b"x", i % 2, i + 1, False, b"\x00") for i in range(10))
    got: list[Publish] = []
    assert reader.step(3, _taker(got)) == (3, True)
    assert [p.topic for p in got] == [b"t/0", b"t/1", b"t/2"]
    assert reader.step(100, _taker(got)) == (7, True)
    assert len(got) == 10
    assert not reader.buf


@pytest.mark.parametrize("limit", [0, 1, 2, 3])
def test_what_the_sink_does_not_take_stays_unread_in_the_buffer(limit: int) -> None:
    """Reading paused in the middle of a read (the inbox is full): the messages not taken, and the
    packets after them (a PINGRESP for paho here), wait in the buffer, in order, for the next step."""
    reader = PacketReader(_client(connected=True), v5=True)
    packets = [_publish(b"a", b"1", 0, 0, False, b"\x00"), _publish(b"b", b"2", 1, 2, False, b"\x00"),
               _publish(b"c", b"3", 0, 0, False, b"\x00"), b"\xd0\x00", _publish(b"d", b"4", 1, 3, False, b"\x00")]
    reader.buf += b"".join(packets)
    got: list[Publish] = []
    taken, alive = reader.step(10, _taker(got, limit))
    assert alive
    assert taken == limit == len(got)
    # With the three before it taken, the PINGRESP is paho's at once (not a message: no hold applies).
    kept = limit if limit < 3 else 4
    assert bytes(reader.buf) == b"".join(packets[kept:])
    assert reader.step(10, _taker(got)) == (4 - limit, True)
    assert [p.topic for p in got] == [b"a", b"b", b"c", b"d"]
    assert not reader.buf


def test_a_publish_this_module_does_not_read_reaches_paho_s_on_message_in_order() -> None:
    """A topic alias (never allowed by the bridge) or another PUBLISH decode_publish declines is not
    dropped: paho decodes it and calls on_message, between the messages around it."""
    client = _client(connected=True)
    order: list[bytes] = []
    client.on_message = lambda c, u, m: order.append(bytes(m._topic))
    reader = PacketReader(client, v5=True)
    alias = b"\x03\x23\x00\x05"
    reader.buf += (_publish(b"a", b"1", 1, 1, False, b"\x00") + _publish(b"odd", b"2", 1, 2, False, alias)
                   + _publish(b"c", b"3", 1, 3, False, b"\x00"))

    def take(batch: list[Publish]) -> int:
        order.extend(p.topic for p in batch)
        return len(batch)

    taken, alive = reader.step(10, take)
    assert alive
    assert taken == 3
    assert order == [b"a", b"odd", b"c"]


def test_a_qos_2_publish_ends_the_connection_instead_of_a_pubrec_before_the_commit() -> None:
    client = _client()
    disconnects: list[object] = []
    client.on_disconnect = lambda *a: disconnects.append(a)
    reader = PacketReader(client, v5=True)
    reader.buf += _publish(b"a", b"1", 1, 1, False, b"\x00") + _publish(b"q2", b"2", 2, 2, False, b"\x00")
    got: list[Publish] = []
    assert reader.step(10, _taker(got)) == (1, False)
    assert [p.topic for p in got] == [b"a"]
    assert disconnects
    assert not client._out_packet  # no PUBREC
    assert not reader.buf


def test_the_installed_paho_has_what_the_read_path_uses_and_another_is_refused_by_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest import mqttwire

    assert mqttwire.paho_problem(_client()) is None
    monkeypatch.setattr(paho_mqtt, "__version__", "2.3.0")
    problem = mqttwire.paho_problem(_client())
    assert problem is not None
    assert "paho-mqtt 2.3.0" in problem
    assert "install paho-mqtt 2.2.x" in problem
