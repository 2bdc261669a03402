"""AckTracker: acknowledge in arrival order, only up to the committed watermark, per broker epoch."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ingest.acks import AckTracker


def test_commit_out_of_order_waits_for_the_earlier_message() -> None:
    t = AckTracker()
    s1 = t.arrived(mid=11, qos=1)
    s2 = t.arrived(mid=12, qos=1)

    assert t.committed(t.epoch, [s2]) == []
    assert t.unacked == 2
    assert t.committed(t.epoch, [s1]) == [(11, 1), (12, 1)]
    assert t.unacked == 0


def test_commit_in_order_acks_each_at_once() -> None:
    t = AckTracker()
    s1 = t.arrived(mid=1, qos=1)
    s2 = t.arrived(mid=2, qos=2)
    s3 = t.arrived(mid=3, qos=1)

    assert t.committed(t.epoch, [s1]) == [(1, 1)]
    assert t.committed(t.epoch, [s2]) == [(2, 2)]
    assert t.unacked == 1
    assert t.committed(t.epoch, [s3]) == [(3, 1)]


def test_acks_come_out_in_arrival_order_not_commit_order() -> None:
    t = AckTracker()
    seqs = [t.arrived(mid=100 + i, qos=1) for i in range(4)]

    assert t.committed(t.epoch, [seqs[3], seqs[1], seqs[2]]) == []
    assert t.committed(t.epoch, [seqs[0]]) == [(100, 1), (101, 1), (102, 1), (103, 1)]


def test_qos0_keeps_its_place_but_yields_no_ack() -> None:
    t = AckTracker()
    s1 = t.arrived(mid=0, qos=0)
    s2 = t.arrived(mid=7, qos=1)

    # The QoS 0 message is still in the way until it is committed ...
    assert t.committed(t.epoch, [s2]) == []
    assert t.unacked == 2
    # ... and once it is, only the QoS 1 message is acknowledged.
    assert t.committed(t.epoch, [s1]) == [(7, 1)]
    assert t.unacked == 0


def test_committed_for_an_old_epoch_acks_nothing() -> None:
    t = AckTracker()
    old = t.epoch
    s1 = t.arrived(mid=1, qos=1)
    new = t.new_epoch()

    assert new == old + 1
    assert t.epoch == new
    assert t.committed(old, [s1]) == []
    # The old message is not resurrected by naming the new epoch either.
    assert t.committed(new, [s1]) == []


def test_new_epoch_discards_pending_messages() -> None:
    t = AckTracker()
    t.arrived(mid=1, qos=1, at=5.0)
    t.arrived(mid=2, qos=1, at=6.0)
    t.new_epoch()

    assert t.unacked == 0
    assert t.oldest_arrival is None

    s3 = t.arrived(mid=1, qos=1, at=9.0)  # the broker redelivers on the new connection
    assert t.committed(t.epoch, [s3]) == [(1, 1)]


def test_commit_of_the_old_epoch_does_not_touch_the_new_one() -> None:
    t = AckTracker()
    old = t.epoch
    t.new_epoch()
    s = t.arrived(mid=4, qos=1)

    assert t.committed(old, [s]) == []
    assert t.unacked == 1
    assert t.committed(t.epoch, [s]) == [(4, 1)]


def test_sequence_numbers_are_unique_across_epochs() -> None:
    t = AckTracker()
    a = t.arrived(mid=1, qos=1)
    t.new_epoch()
    b = t.arrived(mid=1, qos=1)

    assert a != b


def test_unacked_and_oldest_arrival() -> None:
    t = AckTracker()
    assert t.unacked == 0
    assert t.oldest_arrival is None

    s1 = t.arrived(mid=1, qos=1, at=10.0)
    s2 = t.arrived(mid=2, qos=1, at=11.5)
    t.arrived(mid=3, qos=1, at=12.0)
    assert t.unacked == 3
    assert t.oldest_arrival == 10.0

    t.committed(t.epoch, [s2])  # not at the front: nothing leaves
    assert t.unacked == 3
    assert t.oldest_arrival == 10.0

    t.committed(t.epoch, [s1])
    assert t.unacked == 1
    assert t.oldest_arrival == 12.0


def test_unknown_and_repeated_seqs_are_ignored() -> None:
    t = AckTracker()
    s1 = t.arrived(mid=1, qos=1)

    assert t.committed(t.epoch, [999]) == []
    assert t.committed(t.epoch, [s1, s1]) == [(1, 1)]
    assert t.committed(t.epoch, [s1]) == []


@given(st.data())
def test_acks_are_always_a_prefix_of_arrival_order(data: st.DataObject) -> None:
    qoses = data.draw(st.lists(st.integers(0, 2), max_size=40), label="qos of each arrival")
    mids = data.draw(
        st.lists(st.integers(1, 65535), min_size=len(qoses), max_size=len(qoses), unique=True), label="mids"
    )
    t = AckTracker()
    seqs = [t.arrived(mid, qos, at=float(i)) for i, (mid, qos) in enumerate(zip(mids, qoses, strict=True))]
    expected_all = [(mid, qos) for mid, qos in zip(mids, qoses, strict=True) if qos > 0]

    # Commit every message, in a random order, in random chunks (some chunks repeat earlier seqs).
    order = data.draw(st.permutations(seqs), label="commit order")
    acked: list[tuple[int, int]] = []
    done: set[int] = set()
    i = 0
    while i < len(order):
        size = data.draw(st.integers(1, len(order) - i), label="chunk size")
        chunk = list(order[i : i + size])
        if done:
            chunk += data.draw(st.lists(st.sampled_from(sorted(done)), max_size=3), label="repeats")
        i += size
        done.update(chunk)
        acked += t.committed(t.epoch, chunk)

        # Exactly the QoS>0 messages of the longest fully committed prefix have been acked.
        prefix = 0
        while prefix < len(seqs) and seqs[prefix] in done:
            prefix += 1
        assert acked == [(m, q) for m, q in zip(mids[:prefix], qoses[:prefix], strict=True) if q > 0]
        assert acked == expected_all[: len(acked)]
        assert len({m for m, _ in acked}) == len(acked)
        assert t.unacked == len(seqs) - prefix

    assert acked == expected_all
    assert t.unacked == 0
    assert t.oldest_arrival is None


def test_marked_but_not_taken_stays_unacknowledged() -> None:
    # The bridge marks at commit and takes only when its connection can carry PUBACKs (after CONNACK).
    t = AckTracker()
    s1 = t.arrived(mid=21, qos=1, at=1.0)
    s2 = t.arrived(mid=22, qos=0, at=2.0)
    s3 = t.arrived(mid=23, qos=1, at=3.0)

    t.mark_committed(t.epoch, [s1, s2])
    assert t.unacked == 3
    assert t.oldest_arrival == 1.0
    t.mark_committed(t.epoch, [s3])
    assert t.take_acks() == [(21, 1), (23, 1)]
    assert t.unacked == 0
    assert t.take_acks() == []


def test_take_acks_stops_at_the_first_message_not_committed() -> None:
    t = AckTracker()
    s1 = t.arrived(mid=1, qos=1)
    t.arrived(mid=2, qos=1)
    s3 = t.arrived(mid=3, qos=1)

    t.mark_committed(t.epoch, [s1, s3])
    assert t.take_acks() == [(1, 1)]
    assert t.unacked == 2


def test_marks_for_another_epoch_are_ignored_and_a_new_epoch_drops_marked_messages() -> None:
    t = AckTracker()
    old = t.epoch
    s1 = t.arrived(mid=1, qos=1)
    t.mark_committed(old + 1, [s1])  # not the current epoch
    assert t.take_acks() == []

    t.mark_committed(old, [s1])
    t.new_epoch()  # the connection went away before the PUBACK could be sent: the broker redelivers
    assert t.take_acks() == []
    assert t.unacked == 0


@given(st.data())
def test_deferred_takes_yield_the_same_acks_as_committed(data: st.DataObject) -> None:
    qoses = data.draw(st.lists(st.integers(0, 2), max_size=30), label="qos of each arrival")
    a, b = AckTracker(), AckTracker()
    seqs = [a.arrived(i + 1, q) for i, q in enumerate(qoses)]
    assert seqs == [b.arrived(i + 1, q) for i, q in enumerate(qoses)]

    order = data.draw(st.permutations(seqs), label="commit order")
    from_committed: list[tuple[int, int]] = []
    from_takes: list[tuple[int, int]] = []
    for seq in order:
        from_committed += a.committed(a.epoch, [seq])
        b.mark_committed(b.epoch, [seq])
        if data.draw(st.booleans(), label="connection can carry PUBACKs now"):
            from_takes += b.take_acks()
            assert b.unacked == a.unacked
        else:
            assert b.unacked >= a.unacked  # what was not taken yet is still unacknowledged
        assert from_takes == from_committed[: len(from_takes)]
    from_takes += b.take_acks()

    assert from_takes == from_committed
    assert a.unacked == b.unacked == 0
