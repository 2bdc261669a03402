"""The webhook bodies, a trust boundary for the receivers: pydantic models.

``body = "standard"``: StandardBody, the project's own; its JSON Schema is
schemas/json/webhook.schema.json (``python -m ingest.wire`` writes it; a test fails on drift).

``body = "alertmanager"``: AlertmanagerBody, Prometheus Alertmanager's webhook payload, version "4"
(prometheus/alertmanager notify/webhook/webhook.go ``Message`` and template/template.go ``Data`` and
``Alert``), so that receivers written for Alertmanager (bridges to chat and paging) take it unchanged.
It is built from the StandardBody of the same event (``alertmanager_body``): one event, one alert.
Its JSON Schema is kept in the tests (tests/schemas/alertmanager-webhook.schema.json).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "LABEL_NAME", "RESERVED_LABELS", "AlertmanagerAlert", "AlertmanagerBody", "Annotations", "StandardBody",
    "alertmanager_body", "fingerprint", "rfc3339",
]


class Annotations(BaseModel):
    model_config = ConfigDict(extra="forbid")

    summary: str = Field(description="the rule's summary template, filled in")


class StandardBody(BaseModel):
    """One alert event: a series (rule, device, metric) started or stopped firing."""

    model_config = ConfigDict(extra="forbid", title="sensor-ingest alert event")

    id: str = Field(description="the event's id, the same in every delivery of it (webhooks and retries)")
    status: Literal["firing", "resolved"]
    rule: str
    severity: str
    device: str = Field(description="the device id as stored (devices.uid)")
    metric: str = Field(description='the stored metric name ("*": a per-device no_data rule, any metric)')
    value: float = Field(description="what was judged, in `unit`: the reading (threshold rules), the change per "
                         "minute (rate), the window's aggregate (window), the seconds of silence (no_data)")
    unit: str | None = Field(None, description="the unit of value: the metric's (metrics.unit); rate: it per "
                             "minute, e.g. cm/min; no_data: s")
    threshold: float = Field(description="the level the value was judged against")
    starts_at: datetime = Field(description="event time the episode's condition first held")
    ends_at: datetime | None = Field(None, description="resolved: the event time that ended it")
    event_time: datetime = Field(description="the event time that caused this event: the reading's; a clock "
                                 "window's end; no_data firing: the last reading + the duration")
    labels: dict[str, str] = Field(default_factory=dict, description="the rule's labels")
    annotations: Annotations
    device_attributes: dict[str, Any] = Field(default_factory=dict, description="devices.attributes")


# --- body = "alertmanager" ------------------------------------------------------------------------

# Label names as Prometheus defines them (prometheus/common model/labels.go LabelNameRE). Alertmanager
# since v0.27 also takes other UTF-8 names, but older receivers and PromQL tooling do not.
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# The labels every alert carries, from the event itself; a rule's own labels may not reuse them.
RESERVED_LABELS = ("alertname", "device", "metric", "severity")
# Go's zero time.Time, which Alertmanager sends as endsAt of every firing alert (dispatch.go flush()).
ZERO_TIME = "0001-01-01T00:00:00Z"
_FNV_OFFSET = 14695981039346656037  # FNV-1a 64 (prometheus/common model/fnv.go)
_FNV_PRIME = 1099511628211
_MASK = (1 << 64) - 1
_SEPARATOR = 0xFF  # model.SeparatorByte: cannot occur in UTF-8, so "ab"+"c" and "a"+"bc" differ
_REGEX_META = re.compile(r"([\\.+*?()|\[\]{}^$])")  # what Go's regexp.QuoteMeta escapes


def fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager's alert fingerprint: FNV-1a 64 over the label names in sorted order, each name and
    value followed by a 0xFF byte, as 16 lowercase hex digits (prometheus/common model/signature.go
    labelSetToFingerprint, model/fingerprinting.go). Labels only: the same series has the same
    fingerprint firing and resolved, which is how receivers pair the two."""
    h = _FNV_OFFSET
    for name in sorted(labels):  # code-point order is UTF-8 byte order, the order Go sorts in
        for part in (name, labels[name]):
            for byte in part.encode("utf-8"):
                h = ((h ^ byte) * _FNV_PRIME) & _MASK
            h = ((h ^ _SEPARATOR) * _FNV_PRIME) & _MASK
    return f"{h:016x}"


def rfc3339(t: datetime) -> str:
    """A time as Go's encoding/json writes a time.Time in UTC (RFC 3339, "Z", fractional seconds only
    as far as needed): Go receivers parse it strictly and refuse a time without an offset."""
    if t.tzinfo is None:
        raise ValueError(f"{t.isoformat()} has no time zone: an Alertmanager time needs one")
    u = t.astimezone(UTC)
    fraction = f".{u.microsecond:06d}".rstrip("0") if u.microsecond else ""
    return f"{u:%Y-%m-%dT%H:%M:%S}{fraction}Z"


class AlertmanagerAlert(BaseModel):
    """template.Alert: every key always present, every map string to string."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str]
    startsAt: str  # RFC 3339
    endsAt: str  # RFC 3339; ZERO_TIME while firing
    generatorURL: str = ""
    fingerprint: str


class AlertmanagerBody(BaseModel):
    """notify/webhook Message, version "4". The optional keys of later Alertmanager releases
    (notification_reason, v0.32; routeLabels, v0.34) are left out: the payload is the classic one
    every receiver reads."""

    model_config = ConfigDict(extra="forbid", title="Prometheus Alertmanager webhook payload, version 4")

    version: Literal["4"] = "4"
    groupKey: str
    truncatedAlerts: int = 0
    status: Literal["firing", "resolved"]
    receiver: str
    groupLabels: dict[str, str]
    commonLabels: dict[str, str]
    commonAnnotations: dict[str, str]
    externalURL: str
    alerts: list[AlertmanagerAlert]


def _description(event: StandardBody) -> str:
    unit = f" {event.unit}" if event.unit else ""
    now = "is" if event.status == "firing" else "is back to"
    return (f"{event.metric} at {event.device} {now} {event.value}{unit} (threshold {event.threshold}{unit}; "
            f"rule {event.rule}, severity {event.severity})")


def alertmanager_body(event: StandardBody, receiver: str, external_url: str,
                      description: str | None = None) -> AlertmanagerBody:
    """The Alertmanager payload of one event, as Alertmanager would send it for a group of one alert.
    ``receiver``: the webhook's name; ``external_url``: the backlink.

    The rule's labels must be valid label names and must not reuse RESERVED_LABELS:
    compile_alerts refuses such a rule for an alertmanager webhook, so nothing is renamed or dropped
    here. Times: startsAt is the episode's start; endsAt is Go's zero time while firing and the
    resolving reading's event time once resolved."""
    labels = {**event.labels, "alertname": event.rule, "device": event.device, "metric": event.metric,
              "severity": event.severity}
    annotations = {"summary": event.annotations.summary, "description": description or _description(event),
                   "value": str(event.value), "threshold": str(event.threshold),
                   "event_time": rfc3339(event.event_time), "event_id": event.id}
    if event.unit:
        annotations["unit"] = event.unit
    ends = ZERO_TIME if event.status == "firing" else rfc3339(event.ends_at or event.event_time)
    alert = AlertmanagerAlert(status=event.status, labels=labels, annotations=annotations,
                              startsAt=rfc3339(event.starts_at), endsAt=ends, fingerprint=fingerprint(labels))
    # The group is the series (rule, device, metric), as Alertmanager forms it for a route with
    # group_by: [alertname, device, metric]: each group then holds this one alert, so the message's
    # status is the alert's. Grouping by alertname alone would give every device of a rule one
    # groupKey, and a receiver that keys incidents on it would close the rule's incident when one
    # device resolves while another still fires.
    group = {"alertname": event.rule, "device": event.device, "metric": event.metric}
    return AlertmanagerBody(
        # dispatch.go GroupKey(): "<route key>:<group labels>"; the root route's key is "{}" and a label
        # set prints as {a="x", b="y"} (model.LabelSet.String(): sorted, Go-quoted values; JSON's quoting
        # is Go's for every character a stored device id may hold, but for non-printable Unicode, which
        # Go escapes: the key is then not Alertmanager's bytes, still stable and one per series).
        groupKey="{}:{" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(group.items()))
        + "}",
        status=event.status,
        receiver=_REGEX_META.sub(r"\\\1", receiver),  # template.go Data(): regexp.QuoteMeta(receiver)
        groupLabels=group, commonLabels=dict(labels), commonAnnotations=dict(annotations),
        externalURL=external_url, alerts=[alert])
