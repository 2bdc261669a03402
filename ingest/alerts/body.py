"""The webhook body (``body = "standard"``), a trust boundary for the receivers: a pydantic model.

Its JSON Schema is schemas/json/webhook.schema.json (``python -m ingest.wire`` writes it; a test
fails on drift).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Annotations", "StandardBody"]


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
    metric: str = Field(description="the stored metric name")
    value: float = Field(description="the reading that fired or resolved the episode, in the metric's unit")
    unit: str | None = Field(None, description="the metric's unit (metrics.unit)")
    threshold: float = Field(description="the level the value was judged against")
    starts_at: datetime = Field(description="event time the episode's condition first held")
    ends_at: datetime | None = Field(None, description="resolved: event time of the reading that ended it")
    event_time: datetime = Field(description="event time of the reading that caused this event")
    labels: dict[str, str] = Field(default_factory=dict, description="the rule's labels")
    annotations: Annotations
    device_attributes: dict[str, Any] = Field(default_factory=dict, description="devices.attributes")
