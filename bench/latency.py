"""Where the live latency goes (issue #17, item 3): publish-to-commit broken into its parts.

Per message, exact (wall-clock epoch seconds on one machine: the publisher's clock and PostgreSQL's
commit timestamps are the same clock):

- ``behind_schedule``: how late the publisher's rate schedule was when its loop came to the message
  (the publisher process short of CPU). Not part of any latency below.
- ``window_wait``: from the loop coming to the message (``want``) to ``publish()`` being called
  (``call``): the wait for a free place among the process's ``_INFLIGHT`` unacknowledged publishes,
  i.e. for the broker's PUBACKs of earlier messages. Not part of the message's latency: its payload's
  time is ``call``.
- ``publish_to_puback``: ``call`` to its PUBACK arriving at the publisher (paho's on_publish): the
  publisher's client, the broker accepting the message, the network both ways.
- ``publish_to_commit``: ``call`` (the payload's time) to the PostgreSQL commit that stored it: the
  headline latency of ingest-live and ingest-alerts.
- ``puback_to_commit``: from the broker's PUBACK reaching the publisher to the commit (the issue's
  "timestamp after the broker accepted the message"; can be negative when the PUBACK comes late).
- ``want_to_commit``: from before the window wait to the commit: what this harness reported as
  publish-to-commit before issue #17 (kept to compare with the figures of earlier runs).

The service's own part comes from its Prometheus histograms (ingest.metrics), read from /metrics
at the end of the warm-up and after the last message was stored (with several workers, each one's,
added up); the difference of the two is the measured window. Their percentiles are bucket bounds,
not values: ``p99`` is the upper bound of the bucket that holds the 99th percentile (``inf`` past
the last finite bucket), ``p99_lo`` its lower bound; ``mean`` is exact (_sum / _count).

- ``receive_to_commit``: from the service receiving a message (its RawMessage.received_at) to the
  commit that holds it, per message: service queueing, batch age, the write and the commit.
- ``flush``: one batch's write-and-commit, per batch.
- ``batch_messages``: messages per written batch.

The two ends differ: the per-message latencies end at PostgreSQL's commit timestamp
(``pg_xact_commit_timestamp``), which PostgreSQL takes when it writes the commit record, before it
flushes the WAL (the fsync); the service's histograms end when the COMMIT returned to it, after that
flush and the reply. So receive-to-commit holds a few milliseconds (at most one flush) that
publish-to-commit does not.

The rest, ``broker_and_network``, is publish-to-commit minus receive-to-commit: the publisher's
client, the broker's routing to the service, the socket, and the service's reading up to stamping
received_at. The service's receive time is not known per message (it is not exported), so it is
given as the difference of the means (means add up, percentiles do not), which is low by the
commit's WAL flush and reply (``mean_high`` adds the mean flush: the part lies between the two), and,
for a sense of the middle, the difference of the medians, as a range (the service's median is known
only to its bucket).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import Sent

__all__ = ["HISTOGRAMS", "Histogram", "broker_and_network", "bucket_stats", "histograms", "publish_breakdown",
           "service_breakdown", "stats", "summed"]

# The service's histograms the breakdown reads (ingest.metrics), by the name used here.
HISTOGRAMS = {
    "receive_to_commit": "sensor_ingest_receive_to_commit_seconds",
    "flush": "sensor_ingest_flush_seconds",
    "batch_messages": "sensor_ingest_batch_messages",
}


def stats(values: Iterable[float]) -> dict[str, float]:
    """n, mean, p50, p95, p99, max of ``values`` (already in the unit reported), rounded to 0.1."""
    v = sorted(values)
    if not v:
        return {}

    def pct(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))], 1)

    return {"n": len(v), "mean": round(sum(v) / len(v), 1), "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99),
            "max": round(v[-1], 1)}


def publish_breakdown(timing: Sequence[Sequence[Sent]], commits: Mapping[tuple[int, int], float],
                      after: float) -> dict[str, dict[str, float]]:
    """The per-message parts in ms, over the messages published at or after ``after`` (epoch s) that were
    stored: ``timing`` per publisher process, ``commits``: (process, seq) -> commit epoch seconds."""
    parts: dict[str, list[float]] = {k: [] for k in ("behind_schedule", "window_wait", "publish_to_puback",
                                                      "publish_to_commit", "puback_to_commit", "want_to_commit")}
    for proc, sent in enumerate(timing):
        for s in sent:
            commit = commits.get((proc, s.seq))
            if s.call < after or commit is None:
                continue
            parts["behind_schedule"].append(s.behind * 1000)
            parts["window_wait"].append((s.call - s.want) * 1000)
            parts["publish_to_puback"].append((s.ack - s.call) * 1000)
            parts["publish_to_commit"].append((commit - s.call) * 1000)
            parts["puback_to_commit"].append((commit - s.ack) * 1000)
            parts["want_to_commit"].append((commit - s.want) * 1000)
    return {k: stats(v) for k, v in parts.items()}


@dataclass(frozen=True)
class Histogram:
    """One Prometheus histogram: cumulative counts per upper bound, ascending (+Inf last)."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    sum: float

    def __add__(self, other: Histogram) -> Histogram:
        if [le for le, _ in other.buckets] != [le for le, _ in self.buckets]:
            raise ValueError("the two histograms have different buckets")
        return Histogram(tuple((le, n + m) for (le, n), (_, m) in zip(self.buckets, other.buckets, strict=True)),
                         self.count + other.count, self.sum + other.sum)

    def __sub__(self, before: Histogram) -> Histogram:
        if [le for le, _ in before.buckets] != [le for le, _ in self.buckets]:
            raise ValueError("the two histograms have different buckets")
        return Histogram(tuple((le, n - m) for (le, n), (_, m) in zip(self.buckets, before.buckets, strict=True)),
                         self.count - before.count, self.sum - before.sum)


def histograms(text: str) -> dict[str, Histogram]:
    """The histograms (without labels) of a Prometheus text exposition, by family name."""
    out: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        buckets: list[tuple[float, float]] = []
        count = total = 0.0
        for s in family.samples:
            if s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                count = s.value
            elif s.name.endswith("_sum"):
                total = s.value
        out[family.name] = Histogram(tuple(sorted(buckets)), count, total)
    return out


def summed(texts: Iterable[str]) -> dict[str, Histogram]:
    """The histograms of several workers' /metrics, added up (the same buckets in each)."""
    out: dict[str, Histogram] = {}
    for text in texts:
        for name, h in histograms(text).items():
            out[name] = out[name] + h if name in out else h
    return out


def _bounds(h: Histogram, q: float) -> tuple[float, float]:
    """(lower, upper) bound of the bucket holding the q-quantile."""
    rank, lower = q * h.count, 0.0
    for le, cumulative in h.buckets:
        if cumulative >= rank:
            return lower, le
        lower = le
    return lower, math.inf


def bucket_stats(h: Histogram, scale: float = 1.0) -> dict[str, float]:
    """n, mean (exact), and p50/p95/p99 as the upper bounds of the buckets holding them (p50_lo, ...: their
    lower bounds), times ``scale`` (1000: seconds to ms)."""
    if h.count <= 0:
        return {}
    out = {"n": h.count, "mean": round(h.sum / h.count * scale, 1)}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        lo, hi = _bounds(h, q)
        out[name] = hi * scale if math.isinf(hi) else round(hi * scale, 3)
        out[f"{name}_lo"] = round(lo * scale, 3)
    return out


def service_breakdown(before: Mapping[str, Histogram], after: Mapping[str, Histogram]) -> dict[str, dict[str, float]]:
    """The service's histograms over the window between two reads of /metrics (ms; batch sizes as counts)."""
    out: dict[str, dict[str, float]] = {}
    for key, family in HISTOGRAMS.items():
        if family in after and family in before:
            out[key] = bucket_stats(after[family] - before[family], 1.0 if key == "batch_messages" else 1000.0)
    return out


def broker_and_network(publish: Mapping[str, float], service: Mapping[str, Mapping[str, float]]
                       ) -> dict[str, float]:
    """publish-to-commit minus receive-to-commit (see the module's docstring): ``mean`` and ``mean_high``
    bound it; ``p50_lo`` and ``p50_hi`` bound the difference of the medians (the service's median is
    known only to its bucket)."""
    received = service.get("receive_to_commit", {})
    if not publish or not received:
        return {}
    flush = service.get("flush", {}).get("mean", 0.0)
    mean = publish["mean"] - received["mean"]
    return {"mean": round(mean, 1), "mean_high": round(mean + flush, 1),
            "p50_lo": round(publish["p50"] - received["p50"], 1),
            "p50_hi": round(publish["p50"] - received["p50_lo"], 1)}
