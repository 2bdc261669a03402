"""Pure acknowledgement bookkeeping: ack in arrival order, up to a committed watermark, per epoch.

Every message is registered when it arrives on broker connection ``epoch``. When the transaction
holding some messages commits, they are marked done; the messages that may now be acknowledged are
those at the front of the arrival order that are all done. A message from an older epoch (the
connection it came on is gone) is never acknowledged: the broker will deliver it again.

Marking (``mark_committed``) and taking the acknowledgements to send (``take_acks``) are separate
steps, so a caller whose connection cannot carry a PUBACK yet leaves them here: they stay counted
in ``unacked`` (the broker has not seen them either) and are taken once it can. ``committed`` does
both at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["AckTracker"]


class AckTracker:
    def __init__(self) -> None:
        self.epoch = 0
        self._next_seq = 0
        # Arrival order of the current epoch: [seq, mid, qos, done, arrived_at]
        self._order: deque[list[float]] = deque()
        self._by_seq: dict[int, list[float]] = {}

    def new_epoch(self) -> int:
        """A new broker connection: everything pending from the old one will be redelivered."""
        self.epoch += 1
        self._order.clear()
        self._by_seq.clear()
        return self.epoch

    def arrived(self, mid: int, qos: int, at: float = 0.0) -> int:
        """Register a message of the current epoch (``at``: monotonic arrival); return its sequence number."""
        seq = self._next_seq
        self._next_seq += 1
        entry: list[float] = [seq, mid, qos, 0, at]
        self._order.append(entry)
        self._by_seq[seq] = entry
        return seq

    @property
    def unacked(self) -> int:
        return len(self._order)

    @property
    def oldest_arrival(self) -> float | None:
        """Monotonic arrival time of the oldest message not yet acknowledged."""
        return self._order[0][4] if self._order else None

    def mark_committed(self, epoch: int, seqs: Iterable[int]) -> None:
        """Mark messages of ``epoch`` done (their transaction committed); other epochs are ignored."""
        if epoch != self.epoch:
            return
        for seq in seqs:
            entry = self._by_seq.get(seq)
            if entry is not None:
                entry[3] = 1

    def take_acks(self) -> list[tuple[int, int]]:
        """Remove the done front of the arrival order; return (mid, qos) of its QoS>0 messages, in order."""
        out: list[tuple[int, int]] = []
        order = self._order
        while order and order[0][3]:
            entry = order.popleft()
            del self._by_seq[int(entry[0])]
            if entry[2] > 0:
                out.append((int(entry[1]), int(entry[2])))
        return out

    def committed(self, epoch: int, seqs: Iterable[int]) -> list[tuple[int, int]]:
        """Mark messages done; return (mid, qos) of those to acknowledge now, in arrival order."""
        if epoch != self.epoch:
            return []
        self.mark_committed(epoch, seqs)
        return self.take_acks()
