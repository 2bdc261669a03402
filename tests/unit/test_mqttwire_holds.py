"""The read path behind a full receive window (ingest.mqttwire): PUBLISHes wait in the buffer, in
order, while every other packet behind them goes to paho at once, in its order; a packet that ends
the connection drops what waits, and says so; the buffer says when it is at its bound."""

from __future__ import annotations

import itertools
import logging
import socket
import struct
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from ingest.mqttwire import READ_AHEAD_MAX, PacketReader, Publish
from tests.unit.test_mqttwire import _publish, _Sock

PINGRESP = b"\xd0\x00"
DISCONNECT = b"\xe0\x01\x8b"  # reason 0x8B: Server shutting down


def _suback(mid: int) -> bytes:
    return b"\x90\x04" + struct.pack("!H", mid) + b"\x00\x01"  # no properties, granted QoS 1


def _unsuback(mid: int) -> bytes:
    return b"\xb0\x04" + struct.pack("!H", mid) + b"\x00\x00"


_PAIRS: list[tuple[socket.socket, socket.socket]] = []


def _client(seen: list[str]) -> paho.Client:
    """A paho client with a socket (one end of a pair), noting in ``seen`` the packets its handlers see."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="t", protocol=MQTTProtocolVersion.MQTTv5,
                         manual_ack=True)
    ours, theirs = socket.socketpair()
    _PAIRS.append((ours, theirs))
    client._sock = ours
    client.on_subscribe = lambda c, u, mid, codes, props: seen.append(f"suback {mid}")
    client.on_unsubscribe = lambda c, u, mid, codes, props: seen.append(f"unsuback {mid}")
    client.on_disconnect = lambda c, u, flags, rc, props: seen.append(f"disconnect {rc.value}")
    return client


def _take(into: list[Publish]) -> Callable[[list[Publish]], int]:
    def take(batch: list[Publish]) -> int:
        into.extend(batch)
        return len(batch)
    return take


def test_a_pingresp_behind_a_full_window_reaches_paho_and_the_messages_wait_in_order() -> None:
    """The bug of issue #10: paho waits for the PINGRESP of its PINGREQ (``_ping_t``) and gives the
    connection up one keepalive later. Behind a full window it must still be handled."""
    seen: list[str] = []
    client = _client(seen)
    client._ping_t = 1.0  # a PINGREQ went out
    reader = PacketReader(client, v5=True)
    held = [_publish(f"t/{i}".encode(), b"x", i % 2, i + 1, False, b"\x00") for i in range(3)]
    reader.buf += b"".join(held) + PINGRESP
    got: list[Publish] = []
    assert reader.step(0, _take(got)) == (0, True)
    assert client._ping_t == 0  # paho saw the PINGRESP
    assert got == []
    assert bytes(reader.buf) == b"".join(held)  # the messages, untouched, nothing else
    assert reader.step(10, _take(got)) == (3, True)
    assert [p.topic for p in got] == [b"t/0", b"t/1", b"t/2"]
    assert not reader.buf


def test_the_window_filling_within_a_step_hands_the_packets_behind_it_over() -> None:
    """Room for two: the third message waits, the SUBACK and PINGRESP after it do not."""
    seen: list[str] = []
    client = _client(seen)
    client._ping_t = 1.0
    reader = PacketReader(client, v5=True)
    msgs = [_publish(f"t/{i}".encode(), b"x", 1, i + 1, False, b"\x00") for i in range(4)]
    reader.buf += msgs[0] + msgs[1] + msgs[2] + _suback(7) + msgs[3] + PINGRESP
    got: list[Publish] = []
    assert reader.step(2, _take(got)) == (2, True)
    assert [p.topic for p in got] == [b"t/0", b"t/1"]
    assert seen == ["suback 7"]
    assert client._ping_t == 0
    assert bytes(reader.buf) == msgs[2] + msgs[3]
    assert reader.held == len(msgs[2] + msgs[3])
    assert reader.step(10, _take(got)) == (2, True)
    assert [p.topic for p in got] == [b"t/0", b"t/1", b"t/2", b"t/3"]
    assert reader.held == 0
    assert not reader.buf


@settings(max_examples=150, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["pub0", "pub1", "ping", "suback", "unsuback"]), min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
    rooms=st.lists(st.integers(0, 3), min_size=1, max_size=8),
)
def test_behind_a_full_window_other_packets_keep_their_order_and_messages_theirs(
        kinds: list[str], cuts: list[int], rooms: list[int]) -> None:
    """However the bytes are split into reads and whatever room each step has (often none): every
    packet that is not a PUBLISH reaches paho exactly once, in its order, at the first step after its
    last byte is read; every PUBLISH is handed over exactly once, in its order."""
    packets: list[tuple[bytes, str | None]] = []  # (bytes, what paho is to see of it, if anything)
    topics: list[bytes] = []
    for i, kind in enumerate(kinds):
        if kind.startswith("pub"):
            topics.append(f"t/{i}".encode())
            packets.append((_publish(topics[-1], str(i).encode(), int(kind[-1]), i + 1, False, b"\x00"), None))
        elif kind == "ping":
            packets.append((PINGRESP, "ping"))
        else:
            packets.append(((_suback if kind == "suback" else _unsuback)(i + 1), f"{kind} {i + 1}"))
    stream = b"".join(b for b, _ in packets)
    ends = list(itertools.accumulate(len(b) for b, _ in packets))
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    sock = _Sock([stream[a:b] for a, b in itertools.pairwise(points) if b > a])
    seen: list[str] = []
    client = _client(seen)

    def pingresp() -> MQTTErrorCode:
        seen.append("ping")
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client._handle_pingresp = pingresp  # type: ignore[method-assign]
    reader = PacketReader(client, v5=True)
    got: list[Publish] = []
    for room in itertools.cycle(rooms):
        if not reader.fill(sock):
            break
        assert reader.step(room, _take(got))[1]
        read = len(stream) - sum(len(c) for c in sock.chunks)
        assert seen == [what for (_, what), end in zip(packets, ends, strict=True) if what and end <= read]
    assert reader.step(10**6, _take(got))[1]
    assert seen == [what for _, what in packets if what]
    assert [p.topic for p in got] == topics
    assert not reader.buf
    assert reader.held == 0


def test_a_disconnect_behind_a_full_window_ends_the_connection_at_once_and_says_what_is_lost(
        caplog: pytest.LogCaptureFixture) -> None:
    """Holding the DISCONNECT back would not save the messages before it (module docstring): the
    connection ends now, with the broker's reason, and the log counts what is dropped."""
    seen: list[str] = []
    reader = PacketReader(_client(seen), v5=True)
    reader.buf += (_publish(b"a", b"1", 0, 0, False, b"\x00") + _publish(b"b", b"2", 1, 2, False, b"\x00")
                   + _publish(b"c", b"3", 1, 3, False, b"\x00") + DISCONNECT)
    got: list[Publish] = []
    with caplog.at_level(logging.INFO, logger="ingest.mqtt"):
        assert reader.step(0, _take(got)) == (0, False)
    assert got == []
    assert seen == ["disconnect 139"]
    assert not reader.buf
    assert reader.held == 0
    assert "3 message(s) read and not yet handed over: 1 at QoS 0 are lost, 2 at QoS 1 come again" in caplog.text


def test_a_paused_step_reads_nothing_ahead() -> None:
    """A pause (the inbox is full) is not a full window: nothing after the message not taken is
    handled, the PINGRESP included; the pause holds the whole connection back, as before."""
    seen: list[str] = []
    client = _client(seen)
    client._ping_t = 1.0
    reader = PacketReader(client, v5=True)
    packets = _publish(b"a", b"1", 1, 1, False, b"\x00") + _publish(b"b", b"2", 1, 2, False, b"\x00") + PINGRESP
    reader.buf += packets
    assert reader.step(10, lambda batch: 0) == (0, True)
    assert client._ping_t == 1.0
    assert bytes(reader.buf) == packets


def test_the_buffer_is_full_at_its_bound() -> None:
    reader = PacketReader(_client([]), v5=True)
    one = _publish(b"t", b"x" * 1000, 1, 1, False, b"\x00")
    while len(reader.buf) + len(one) < READ_AHEAD_MAX:
        reader.buf += one
    assert not reader.full
    reader.buf += one
    assert reader.full
    assert reader.step(0, _take([])) == (0, True)
    assert reader.full  # a full window takes nothing: the bridge stops reading
    got: list[Publish] = []
    reader.step(10, _take(got))
    assert len(got) == 10
    assert not reader.full
