"""Counts of a simulation run: what was published, what the broker acknowledged, by family, kind and fault.

Pure bookkeeping, safe to share between the publishing thread and paho's network thread.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ingest.simulate.fleet import Device, SimMessage
from ingest.simulate.gaps import Window

__all__ = ["Meta", "Tally"]


@dataclass(frozen=True, slots=True)
class Meta:
    """What the tally needs of a published message, kept until the broker answers it."""

    family: str
    kind: str
    fault: str | None
    variant: str | None
    qos: int
    device: str = ""

    @classmethod
    def of(cls, msg: SimMessage, qos: int) -> Meta:
        return cls(msg.family, msg.kind, msg.fault, msg.variant, qos, msg.device)

    def keys(self) -> list[tuple[str, str]]:
        keys = [("families", self.family), ("kinds", self.kind)]
        if self.device:
            keys.append(("devices", self.device))
        if self.fault:
            keys.append(("faults", self.fault))
            keys.append(("variants", f"{self.fault}/{self.variant}"))
        return keys


class Tally:
    """published: handed to the client; acked: PUBACK/PUBCOMP with a success code (QoS 1 and 2);
    refused: the broker answered with an error code; sent_qos0: written to the socket at QoS 0,
    which the broker never confirms; no_subscribers: acked, but nobody subscribes to the topic.
    skipped: per device, messages generated but not published: by a ``gap``, ``dropped`` (--drop), or
    ``silent`` (a backfill's slots after a device went silent).
    """

    def __init__(self, devices: list[Device]) -> None:
        self._lock = threading.Lock()
        self.devices = devices
        self.published = 0
        self.acked = 0
        self.refused = 0
        self.sent_qos0 = 0
        self.no_subscribers = 0
        self.refused_reasons: Counter[str] = Counter()
        self._published: Counter[tuple[str, str]] = Counter()
        self._acked: Counter[tuple[str, str]] = Counter()
        self.skipped: Counter[tuple[str, str]] = Counter()  # (device, why)

    def on_published(self, meta: Meta) -> None:
        with self._lock:
            self.published += 1
            self._published.update(meta.keys())

    def on_answer(self, meta: Meta, *, failure: bool, reason: str = "", no_subscribers: bool = False) -> None:
        with self._lock:
            if meta.qos == 0:
                self.sent_qos0 += 1
            elif failure:
                self.refused += 1
                self.refused_reasons[reason] += 1
            else:
                self.acked += 1
                self.no_subscribers += no_subscribers
                self._acked.update(meta.keys())

    def on_skipped(self, device: str, why: str) -> None:
        with self._lock:
            self.skipped[device, why] += 1

    def skipped_total(self, why: str) -> int:
        with self._lock:
            return sum(n for (_, w), n in self.skipped.items() if w == why)

    @property
    def answered(self) -> int:
        return self.acked + self.refused + self.sent_qos0

    @property
    def in_flight(self) -> int:
        """Published and not yet answered by the broker (or, at QoS 0, not yet written)."""
        return self.published - self.answered

    def group(self, name: str) -> dict[str, dict[str, int]]:
        """{key: {"published": n, "acked": n}} of one group: families, kinds, faults, variants or devices."""
        with self._lock:
            keys = sorted({k for g, k in self._published if g == name})
            return {k: {"published": self._published[name, k], "acked": self._acked[name, k]} for k in keys}

    def summary(self, *, seed: int, prefix: str, elapsed: float, silenced: list[str], scripted: bool = False,
                backfill: Window | None = None) -> dict[str, Any]:
        """The run as one JSON-ready object (``--json``).

        ``scripted`` (gaps or drops) or a backfill add the per-device counts a completeness check needs:
        with a backfill, each device's expected count is ``backfill.intervals``, and what it published is
        expected - gap - dropped - silent.
        """
        by_family: dict[str, list[str]] = {}
        by_kind: Counter[str] = Counter()
        for d in self.devices:
            by_family.setdefault(d.family, []).append(d.uid)
            by_kind[d.kind] += 1
        families = self.group("families")
        kinds = self.group("kinds")
        for name, uids in by_family.items():
            families.setdefault(name, {"published": 0, "acked": 0})["devices"] = len(uids)
        for name, n in by_kind.items():
            kinds.setdefault(name, {"published": 0, "acked": 0})["devices"] = n
        faults: dict[str, Any] = self.group("faults")
        variants = self.group("variants")
        if silenced:
            faults["silent"] = {"devices": len(silenced)}
        extra: dict[str, Any] = {}
        if scripted or backfill is not None:
            extra = self._per_device(backfill)
        with self._lock:
            return {
                "seed": seed,
                "prefix": prefix,
                "elapsed_s": round(elapsed, 3),
                "devices": len(self.devices),
                "published": self.published,
                "acked": self.acked,
                "refused": self.refused,
                "refused_reasons": dict(self.refused_reasons),
                "sent_qos0": self.sent_qos0,
                "unanswered": self.published - self.acked - self.refused - self.sent_qos0,
                "no_subscribers": self.no_subscribers,
                "families": families,
                "kinds": kinds,
                "faults": faults,
                "variants": variants,
                "silenced": list(silenced),
                "devices_per_family": by_family,
                **extra,
            }

    def _per_device(self, backfill: Window | None) -> dict[str, Any]:
        window: dict[str, Any] = {}
        if backfill is not None:
            window = {"start": backfill.start.isoformat(), "end": backfill.end.isoformat(),
                      "interval": backfill.interval_ms / 1000, "expected": backfill.intervals}
        sent = self.group("devices")
        per_device: dict[str, dict[str, Any]] = {}
        with self._lock:
            for d in self.devices:
                counts = sent.get(d.uid, {})
                per_device[d.uid] = {
                    "published": counts.get("published", 0), "acked": counts.get("acked", 0),
                    "gap": self.skipped[d.uid, "gap"], "dropped": self.skipped[d.uid, "dropped"],
                    "silent": self.skipped[d.uid, "silent"], **window,
                }
        extra: dict[str, Any] = {
            "gap": sum(r["gap"] for r in per_device.values()),
            "dropped": sum(r["dropped"] for r in per_device.values()),
            "per_device": per_device,
        }
        if backfill is not None:
            extra["backfill"] = window
        return extra
