"""Prometheus metrics of one service instance, in its own registry (no module-level singletons)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["AlertCounts", "HoldTimer", "Metrics"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "sensor_ingest_"
        self.messages_received = Counter(p + "messages_received", "MQTT messages received", ["source"], registry=r)
        self.messages_acked = Counter(p + "messages_acked", "MQTT messages acknowledged after commit", registry=r)
        self.readings_written = Counter(p + "readings_written", "readings committed (incl. states)", registry=r)
        self.duplicates = Counter(p + "duplicates", "readings identical to a stored one (a redelivery or a repeat): "
                                  "stored once", registry=r)
        self.unbound_readings = Counter(p + "unbound_readings", "readings of metrics the catalog binds to no "
                                        "quantity (stored as they came, without unit or range checks)", registry=r)
        self.rejections = Counter(p + "rejections", "messages stored as rejections, by reason", ["reason"], registry=r)
        self.messages_skipped = Counter(p + "messages_skipped",
                                        "messages acknowledged without readings or a rejection row because they "
                                        "carry none by design (a LoRaWAN join, only leaves that are not readings)",
                                        ["source", "reason"], registry=r)
        self.ignored_leaves = Counter(p + "ignored_leaves", "payload leaves that are not readings", registry=r)
        self.batch_messages = Histogram(p + "batch_messages", "messages per written batch",
                                        buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000), registry=r)
        self.flush_seconds = Histogram(p + "flush_seconds", "time to write and commit one batch",
                                       buckets=_LATENCY, registry=r)
        self.commit_latency = Histogram(p + "receive_to_commit_seconds",
                                        "from receiving a message to the commit holding it", buckets=_LATENCY,
                                        registry=r)
        self.unacked = Gauge(p + "messages_unacked", "messages received and not yet acknowledged", registry=r)
        self.oldest_unacked_age = Gauge(p + "oldest_unacked_age_seconds",
                                        "age of the oldest message not yet acknowledged", registry=r)
        self.db_errors = Counter(p + "db_errors", "database failures by class (retry, data, fatal)",
                                 ["kind"], registry=r)
        self.reconnects = Counter(p + "mqtt_reconnects", "MQTT connections made after the first", registry=r)
        self.conflict_batches = Counter(p + "conflict_batches",
                                        "batches written through INSERT ON CONFLICT (duplicates/redelivery)",
                                        registry=r)
        self.alert_events = Counter(p + "alert_events", "alert events recorded (firing, resolved), notified or not",
                                    ["rule", "status"], registry=r)
        self.alert_events_silenced = Counter(p + "alert_events_silenced", "alert events a silence held back "
                                             "(recorded, not notified; counted in alert_events too)", registry=r)
        self.alert_readings_late = Counter(p + "alert_readings_late", "readings of a series a rule selects that "
                                           "came after the series was judged past their time (stored, not judged; "
                                           "raise alerts.lateness if it grows)", registry=r)
        self.alert_series_deferred = Counter(p + "alert_series_deferred", "judgements of a series left to a worker "
                                             "that holds another version of its rule (after a reload)", registry=r)
        self.alert_not_judged = Counter(p + "alert_not_judged", "windows of a window rule with fewer readings than "
                                        "its coverage asks, and readings of a rate rule with no reference reading "
                                        "over/2 to over older: not judged", registry=r)
        self.mqtt_connected = Gauge(p + "mqtt_connected", "1 while connected and subscribed", registry=r)
        self.db_ok = Gauge(p + "database_ok", "1 while the last database operation succeeded", registry=r)
        self.backpressure = Counter(p + "backpressure_seconds",
                                    "time the service took no new messages because the database was behind or away "
                                    "(write queue full, receive window full, or broker connection suspended)",
                                    registry=r)
        self.held = HoldTimer(self.backpressure.inc)
        self.mqtt_suspended = Gauge(p + "mqtt_suspended",
                                    "1 while disconnected from the broker on purpose (database away)", registry=r)
        self.inbox = Gauge(p + "inbox_messages",
                           "messages received and not yet processed; reading pauses at twice mqtt.receive_maximum",
                           registry=r)
        self.stale_dropped = Counter(p + "stale_messages_released",
                                     "unwritten messages of a lost connection left to the broker's redelivery",
                                     registry=r)
        self.webhook_deliveries = Counter(p + "webhook_deliveries",
                                          "webhook delivery attempts by outcome: delivered (2xx), retry (408, 429, "
                                          "5xx, network, timeout), failed (other 4xx, 3xx, max_age), gone (410: the "
                                          "webhook is disabled until a reload)", ["webhook", "outcome"], registry=r)
        self.webhook_delivery_seconds = Histogram(p + "webhook_delivery_seconds",
                                                  "from an alert event's outbox row to its delivery (retries "
                                                  "included)",
                                                  buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                                           300, 900, 3600, 21600, 86400), registry=r)
        # Data quality of the fleet ([quality]; no per-device label: the cardinality of a city's fleet).
        self.devices_reporting = Gauge(p + "devices_reporting", "devices with a reading in the last quality.window "
                                       "(as of the last computation)", registry=r)
        self.devices_stale = Gauge(p + "devices_stale", "devices with a series silent for quality.stale_after "
                                   "expected intervals, or in the register and never seen, or silent for the whole "
                                   "lookback", registry=r)
        self.devices_incomplete = Gauge(p + "devices_incomplete", "devices with a series less complete than "
                                        "quality.below percent over quality.window", registry=r)
        self.quality_computed = Gauge(p + "quality_computed_timestamp_seconds", "when the fleet quality gauges were "
                                      "last computed (Unix time; 0: never)", registry=r)
        self.alert_held = Gauge(p + "alert_judging_held_seconds", "for how long alert judging has been held back "
                                "while a worker catches up a backlog (alerts.catch_up_wait); 0: not held", registry=r)
        self.retention_dropped_chunks = Counter(p + "retention_dropped_chunks", "chunks of rejected_messages "
                                                "dropped as older than retention.rejected_messages", registry=r)

    def count_alerts(self, result: AlertCounts) -> None:
        """What an alert stage or evaluator round recorded (ingest.alerts.stage.StageResult)."""
        for (rule, status), n in result.events.items():
            self.alert_events.labels(rule, status).inc(n)
        if result.silenced:
            self.alert_events_silenced.inc(result.silenced)
        if result.late:
            self.alert_readings_late.inc(result.late)
        if result.deferred:
            self.alert_series_deferred.inc(result.deferred)
        if result.uncovered:
            self.alert_not_judged.inc(result.uncovered)


class AlertCounts(Protocol):
    events: collections.Counter[tuple[str, str]]
    silenced: int
    late: int
    deferred: int
    uncovered: int


class HoldTimer:
    """Adds up the seconds during which at least one reason holds the data path back.

    Several reasons can hold at once (a full write queue while the broker connection is suspended);
    the time counts once. ``flush()`` brings the total up to now, so a long outage shows in
    /metrics while it lasts rather than only when it ends.
    """

    def __init__(self, add: Callable[[float], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._add = add
        self._clock = clock
        self._reasons: set[str] = set()
        self._since: float | None = None

    @property
    def reasons(self) -> frozenset[str]:
        return frozenset(self._reasons)

    def hold(self, reason: str) -> None:
        if not self._reasons:
            self._since = self._clock()
        self._reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons:
            self.flush()
            self._since = None

    def flush(self) -> None:
        if self._since is not None:
            now = self._clock()
            self._add(now - self._since)
            self._since = now
