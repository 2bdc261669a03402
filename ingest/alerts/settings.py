"""[[webhooks]], [[rules]] and [alerts]: the alerting part of the config file (the key names are
the issue's contract). Validated completely, with the rule's name, the key and the fix in each error;
``compile_alerts`` turns them into the frozen model the service runs.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import string
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ingest.alerts.body import LABEL_NAME, RESERVED_LABELS
from ingest.alerts.model import Rule, Webhook, decode_secret, parse_duration
from ingest.alerts.mqtt_channel import prefix_problem

__all__ = ["AlertSettings", "RateSettings", "RuleSettings", "WebhookSettings", "WindowSettings", "compile_alerts",
           "template_fields"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
BODIES = ("standard", "alertmanager")
# What a summary may name: {device}, {metric}, {value}, {threshold}, {rule}, {severity}, {unit}.
TEMPLATE_FIELDS = frozenset({"device", "metric", "value", "threshold", "rule", "severity", "unit"})


def _fix(message: str, fix: str) -> PydanticCustomError:
    return PydanticCustomError("config_fix", message, {"fix": fix})


def _duration(v: Any, key: str) -> float:
    try:
        return parse_duration(v)
    except ValueError as exc:
        raise _fix(f"{key}: {exc}", 'write a duration such as "30s", "2m", "1h" or "24h"') from exc


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class WebhookSettings(_Section):
    name: str = Field(description="what rules name in their `webhooks`")
    url: str = Field(description="http(s) URL the events are POSTed to")
    secret_env: str = Field(description="environment variable holding the Standard Webhooks secret whsec_<base64>")
    body: Literal["standard", "alertmanager"] = Field(
        "standard", description='"standard": the project\'s JSON body; "alertmanager": Prometheus Alertmanager\'s '
        'webhook payload (version 4), for receivers written for Alertmanager')
    timeout: float = Field(5.0, gt=0, le=300, description="seconds per request")
    max_age: float = Field(86400.0, description='give up (delivery marked failed) after this, e.g. "24h"')
    external_url: str | None = Field(None, description='body = "alertmanager": the payload\'s externalURL, the '
                                     'link receivers show back to the sender (default: http://<hostname>/)')

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise _fix(f"webhook name {v!r} is not a plain name",
                       'use letters, digits, "-", "_" or ".", e.g. "city-ops"')
        return v

    @field_validator("body", mode="before")
    @classmethod
    def _body(cls, v: Any) -> Any:
        if v not in BODIES:
            raise _fix(f"body {v!r} is not a body this service sends",
                       'use body = "standard" (the project\'s JSON) or body = "alertmanager" (Prometheus '
                       "Alertmanager's webhook payload)")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise _fix(f"url {v!r} is not an http(s) URL", 'write e.g. "https://ops.example.org/hooks/sensor"')
        if re.match(r"^https?://[^/@\s]*:[^/@\s]*@", v):
            raise _fix("url holds a password", "put credentials in the receiver's own auth, not in a committed file")
        return v

    @field_validator("external_url")
    @classmethod
    def _external_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+\S*$", v):
            raise _fix(f"external_url {v!r} is not an http(s) URL",
                       'write the address people reach this service at, e.g. "https://ingest.example.org/"')
        return v

    @model_validator(mode="after")
    def _external_url_needs_alertmanager(self) -> WebhookSettings:
        if self.external_url is not None and self.body != "alertmanager":
            raise _fix(f"webhook {self.name!r}: external_url is only sent in the Alertmanager body",
                       'set body = "alertmanager", or remove external_url')
        return self

    @field_validator("secret_env")
    @classmethod
    def _env(cls, v: str) -> str:
        if not _ENV.match(v):
            raise _fix(f"secret_env {v!r} is not an environment variable name",
                       'name a variable, e.g. "SENSOR_INGEST_WEBHOOK_CITY_OPS_SECRET"')
        return v

    @field_validator("max_age", mode="before")
    @classmethod
    def _max_age(cls, v: Any) -> float:
        seconds = _duration(v, "max_age")
        if seconds < 60:
            raise _fix(f"max_age of {seconds:g}s gives a receiver no time to come back", 'use at least "1m"')
        return seconds


AGGREGATES = ("avg", "min", "max", "count")
ALIGNS = ("clock", "rolling")
_DAY = 86400.0
# Spans a fix suggests for a clock-aligned window (each divides a day).
_ROUND_SPANS = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 14400, 21600,
                28800, 43200, 86400)


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f'"{seconds / size:g}{unit}"'
    return f'"{seconds:g}s"'


def _clock_spans_near(over: float) -> str | None:
    """None when clock-aligned windows of ``over`` seconds tile the UTC days (``over`` divides a day,
    or is whole days); otherwise the nearest spans that do, for the fix."""
    if _DAY % over == 0 or over % _DAY == 0:
        return None
    spans = [float(s) for s in _ROUND_SPANS] + [_DAY * (over // _DAY), _DAY * (over // _DAY + 1)]
    below = max((s for s in spans if 0 < s < over), default=None)
    above = min(s for s in spans if s > over)
    return f"{_span(below)} or {_span(above)}" if below is not None else _span(above)


class _Table(BaseModel):
    """An inline table of a rule (rate = { ... }, window = { ... }): its keys are checked here, so that
    a misspelt one is named with the keys the table takes."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    key: ClassVar[str] = ""
    example: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        key, example = cls.key, cls.example
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise _fix(f"{key} is a table", f"write e.g. {example}")
        known = list(cls.model_fields)
        for name in data:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise _fix(f"{key} has an unknown key {name!r}",
                           f"{hint}{key} takes {', '.join(known)}, e.g. {example}")
        return data

    @field_validator("over", mode="before", check_fields=False)
    @classmethod
    def _over(cls, v: Any) -> float:
        return _duration(v, f"{cls.key}.over")


class RateSettings(_Table):
    """rate = { over = "10m", above = 0.5 }: the rate of change, in units of the metric per minute."""

    key = "rate"
    example = 'rate = { over = "10m", above = 0.5 }'
    over: float = Field(description='the span the change is measured over, e.g. "10m"')
    above: float | None = Field(None, allow_inf_nan=False, description="fires when the rate per minute is above this")
    below: float | None = Field(None, allow_inf_nan=False, description="fires when the rate per minute is below "
                                "this (a fall: negative)")


class WindowSettings(_Table):
    """window = { agg = "avg", over = "1h", align = "clock", coverage = 0.75 }: an aggregate over a window."""

    key = "window"
    example = 'window = { agg = "avg", over = "1h", align = "clock", coverage = 0.75 }'
    agg: Literal["avg", "min", "max", "count"] = Field("avg", description="avg, min, max or count")
    over: float = Field(description='the window\'s span, e.g. "1h"')
    align: Literal["clock", "rolling"] = Field(
        "clock", description='"clock": windows aligned to the UTC epoch (an hour from :00), judged once each has '
        'passed; "rolling": at each reading, the span up to it')
    coverage: float = Field(0.0, allow_inf_nan=False, description="the share (0 to 1) of the readings the device's "
                            "expected interval promises that a window needs to be judged; 0: any reading")

    @field_validator("agg", mode="before")
    @classmethod
    def _agg(cls, v: Any) -> Any:
        if v not in AGGREGATES:
            raise _fix(f"window.agg {v!r} is not an aggregate", 'use "avg", "min", "max" or "count"')
        return v

    @field_validator("align", mode="before")
    @classmethod
    def _align(cls, v: Any) -> Any:
        if v not in ALIGNS:
            raise _fix(f"window.align {v!r} is not an alignment",
                       'use "clock" (windows on the hour, the day, ...) or "rolling" (the span up to each reading)')
        return v


class RuleSettings(_Section):
    """One [[rules]] entry, of one kind: a threshold (above, below or outside), no_data, rate or window."""

    name: str
    metric: str | None = Field(None, description="the stored metric name (not with no_data and per = \"device\")")
    devices: list[str] = Field(default_factory=list, description="globs on device ids (default: every device)")
    where: dict[str, str | int | float | bool] = Field(default_factory=dict,
                                                       description="device attributes that must equal these")
    above: float | None = None
    below: float | None = None
    outside: tuple[float, float] | None = None
    clear: float | tuple[float, float] | None = Field(
        None, description="the level that ends the episode (outside: [low, high]); default: the threshold")
    for_: float = Field(0.0, alias="for", description='the condition must hold this long in event time, e.g. "2m"')
    no_data: float | None = Field(None, description='fires when the series (or the device) is silent longer than '
                                  'this, e.g. "15m"; a reading resolves it')
    per: Literal["series", "device"] | None = Field(
        None, description='no_data: "series" (default: the metric of each device) or "device" (readings of any metric)')
    rate: RateSettings | None = Field(None, description='the rate of change per minute, e.g. { over = "10m", '
                                      "above = 0.5 }")
    window: WindowSettings | None = Field(None, description='an aggregate over a window, e.g. { agg = "avg", '
                                          'over = "1h" }, judged against above, below or outside')
    severity: str = Field("warning", min_length=1, max_length=32)
    webhooks: list[str] = Field(default_factory=list, description="names of [[webhooks]] entries")
    summary: str = Field("", max_length=1000, description="template: {device} {metric} {value} {threshold} ...")
    labels: dict[str, str] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True, populate_by_name=True)

    @property
    def signal(self) -> Literal["value", "rate", "window", "no_data"]:
        """The rule's kind as the model (Rule.signal) names it."""
        if self.no_data is not None:
            return "no_data"
        if self.rate is not None:
            return "rate"
        return "window" if self.window is not None else "value"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise _fix(f"rule name {v!r} is not a plain name", 'use letters, digits, "-", "_" or ".", e.g. "pm25-high"')
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise _fix("metric is empty", 'name the stored metric, e.g. metric = "pm2_5"')
        return v

    @field_validator("for_", mode="before")
    @classmethod
    def _for(cls, v: Any) -> float:
        return _duration(v, "for")

    @field_validator("no_data", mode="before")
    @classmethod
    def _no_data(cls, v: Any) -> float | None:
        return None if v is None else _duration(v, "no_data")

    @field_validator("per", mode="before")
    @classmethod
    def _per(cls, v: Any) -> Any:
        if v not in ("series", "device"):
            raise _fix(f"per {v!r} is not what a no_data rule watches",
                       'use per = "series" (each metric of each device) or per = "device" (any metric)')
        return v

    @field_validator("summary")
    @classmethod
    def _summary(cls, v: str) -> str:
        try:
            names = template_fields(v)
        except ValueError as exc:
            raise _fix(f"summary is not a template: {exc}", "write fields in braces, e.g. {device}; double a brace "
                       "to print it: {{") from exc
        unknown = sorted(names - TEMPLATE_FIELDS)
        if unknown:
            raise _fix(f"summary names {{{unknown[0]}}}, which is not a field",
                       f"use {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS))}")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> RuleSettings:
        name = self.name
        kinds = [k for k in ("no_data", "rate", "window") if getattr(self, k) is not None]
        levels = [k for k in ("above", "below", "outside") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise _fix(f"rule {name!r} sets {' and '.join(kinds)}: a rule is of one kind",
                       "split it into one [[rules]] entry per kind, each with its own name")
        if self.per is not None and self.no_data is None:
            raise _fix(f"rule {name!r} sets per without no_data: per says what a no_data rule watches",
                       'remove per, or add no_data = "15m"')
        if self.no_data is not None:
            self._check_no_data(levels)
        elif self.rate is not None:
            self._check_rate(levels)
        else:
            self._check_levels(levels)
            if self.window is not None:
                self._check_window()
        if self.metric is None and not (self.no_data is not None and self.per == "device"):
            also = ' or set per = "device" to watch a device\'s readings of any metric' if self.no_data else ""
            raise _fix(f"rule {name!r} names no metric",
                       f'set metric to the stored metric it watches, e.g. metric = "pm2_5"{also}')
        return self

    def _check_no_data(self, levels: list[str]) -> None:
        name = self.name
        assert self.no_data is not None
        if levels:
            raise _fix(f"rule {name!r} sets no_data and {' and '.join(levels)}: a no_data rule fires on silence "
                       "alone, with no level", f"remove {' and '.join(levels)}, or put the level in its own rule")
        if "for_" in self.model_fields_set:
            raise _fix(f"rule {name!r} sets no_data and for: the no_data duration is the hold",
                       f'remove for, and lengthen no_data instead, e.g. no_data = {_span(self.no_data + self.for_)}')
        if self.clear is not None:
            raise _fix(f"rule {name!r} sets no_data and clear: a reading resolves a no_data rule", "remove clear")
        if self.no_data < 1:
            raise _fix(f"rule {name!r}: no_data = {self.no_data:g}s is shorter than a second",
                       'use at least "1s", and longer than the devices\' reporting interval, e.g. no_data = "15m"')
        if self.per == "device" and self.metric is not None:
            raise _fix(f"rule {name!r} sets metric {self.metric!r} with per = \"device\": the device is silent "
                       "when no reading of any metric arrives",
                       'remove metric, or use per = "series" to watch that metric alone')

    def _check_rate(self, levels: list[str]) -> None:
        name = self.name
        rate = self.rate
        assert rate is not None
        if levels:
            raise _fix(f"rule {name!r} sets rate and {' and '.join(levels)}: a rate rule puts its level inside rate, "
                       'e.g. rate = { over = "10m", above = 0.5 }',
                       f"move the level into rate (above or below, per minute) and remove {' and '.join(levels)}")
        given = [k for k in ("above", "below") if getattr(rate, k) is not None]
        if len(given) != 1:
            raise _fix(f"rule {name!r}: rate sets {' and '.join(given) if given else 'neither'} of above, below",
                       'set exactly one: rate = { over = "10m", above = 0.5 } for rises, or below = -0.5 for falls')
        if rate.over < 1:
            raise _fix(f"rule {name!r}: rate.over = {rate.over:g}s is shorter than a second",
                       'measure the change over at least "1s", e.g. over = "10m"')
        # A level on the wrong side of zero holds for a steady series: every device of the rule would page.
        if rate.above is not None and rate.above < 0:
            raise _fix(f"rule {name!r}: rate.above = {rate.above:g} is a fall, so a steady series (rate 0) would "
                       "fire", "for falls write below = a negative rate per minute; for rises above = a positive one")
        if rate.below is not None and rate.below > 0:
            raise _fix(f"rule {name!r}: rate.below = {rate.below:g} is a rise, so a steady series (rate 0) would "
                       "fire", "for falls write below = a negative rate per minute, e.g. below = -0.5")
        self._check_clear(rate.above, rate.below, "rate's ")

    def _check_levels(self, levels: list[str]) -> None:
        name = self.name
        if len(levels) != 1:
            if self.window is not None:
                raise _fix(f"rule {name!r} sets window and {' and '.join(levels) if levels else 'none'} of above, "
                           "below, outside", f"set exactly one beside window: the level its {self.window.agg} is "
                           "judged against, e.g. above = 55.5, below = 0.5 or outside = [low, high]")
            raise _fix(f"rule {name!r} sets {' and '.join(levels) if levels else 'none'} of above, below, outside",
                       "set exactly one: above = 55.5, below = 0.5 or outside = [low, high] (or make it a no_data, "
                       "rate or window rule)")
        if self.outside is not None:
            low, high = self.outside
            if low >= high:
                raise _fix(f"rule {name!r}: outside = [{low:g}, {high:g}] is not a range", "write [low, high]")
            if self.clear is not None:
                if not isinstance(self.clear, tuple):
                    raise _fix(f"rule {name!r}: with outside, clear is a range", "write clear = [low, high]")
                cl, ch = self.clear
                if not (low <= cl <= ch <= high):
                    raise _fix(f"rule {name!r}: clear = [{cl:g}, {ch:g}] must lie inside outside = "
                               f"[{low:g}, {high:g}]", "narrow clear, or leave it out")
        else:
            self._check_clear(self.above, self.below, "")

    def _check_clear(self, above: float | None, below: float | None, of: str) -> None:
        """clear of an above or below level: at or below above, at or above below (hysteresis)."""
        name = self.name
        if self.clear is None:
            return
        if isinstance(self.clear, tuple):
            raise _fix(f"rule {name!r}: clear is a range only with outside", "write one number, e.g. clear = 50")
        if above is not None and self.clear > above:
            raise _fix(f"rule {name!r}: clear = {self.clear:g} is above the {of}threshold {above:g}, "
                       "so the episode would end while the condition still holds", f"set clear at or below {of}above")
        if below is not None and self.clear < below:
            raise _fix(f"rule {name!r}: clear = {self.clear:g} is below the {of}threshold {below:g}",
                       f"set clear at or above {of}below")

    def _check_window(self) -> None:
        name = self.name
        window = self.window
        assert window is not None
        if window.over < 1:
            raise _fix(f"rule {name!r}: window.over = {window.over:g}s is shorter than a second",
                       'use a window of at least "1s", e.g. over = "1h"')
        if not 0 <= window.coverage <= 1:
            raise _fix(f"rule {name!r}: window.coverage = {window.coverage:g} is not a share",
                       "write a share from 0 to 1, e.g. coverage = 0.75 (three quarters of the expected readings)")
        if window.align == "clock":
            near = _clock_spans_near(window.over)
            if near is not None:
                raise _fix(f"rule {name!r}: window.over = {_span(window.over)} neither divides a day nor is whole "
                           "days, so clock-aligned windows (from the UTC epoch) would not start at the same time each "
                           "day",
                           f'use a span that divides a day or whole days, e.g. over = {near}, or align = "rolling"')


class AlertSettings(_Section):
    """[alerts]"""

    max_notify_age: float = Field(3600.0, description='an episode whose event is older than this when recorded is '
                                  'kept but not notified (late data), e.g. "1h"')
    retry_max: float = Field(300.0, description='the cap of the exponential backoff between delivery attempts, "5m"')
    dispatcher: bool = Field(True, description="false: this process records events but does not deliver them")
    mqtt: bool = Field(False, description="true: every event that is notified is also published over MQTT, QoS 1, "
                       "on <mqtt_prefix>/alerts/<rule>/<device>")
    mqtt_prefix: str = Field("sensor-ingest", max_length=1024, description="the topic levels the alert topics "
                             "start with; no subscription of the service may match <mqtt_prefix>/alerts/+/+")
    lateness: float = Field(0.5, description='how late a reading may reach the service (behind the other readings '
                            'of its series, e.g. through another worker) and still be judged in event-time order: a '
                            'series is judged up to now minus this, e.g. "0.5s" (a reading waits up to '
                            'ingest.batch_max_age in its batch, then for the commit); a reading later than that is '
                            'stored but not judged (counted as late)')
    no_data_grace: float | None = Field(None, description='after a start no silence is judged for this long (after '
                                        'the broker or the database was away: as long as it was away, at most this), '
                                        'so that an outage does not page for every device; default: the longest '
                                        'no_data duration of the rules')
    catch_up_wait: float = Field(600.0, description='while a worker drains a backlog (after an outage its broker '
                                 'session holds part of every device\'s queue) no worker judges, so that its '
                                 'readings are judged in order once stored; a worker behind, or not seen, for longer '
                                 'than this is no longer waited for, e.g. "10m"')

    @field_validator("mqtt_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        why = prefix_problem(v)
        if why is not None:
            raise _fix(f"mqtt_prefix {v!r} {why}", 'write plain topic levels, e.g. "sensor-ingest" or "city/ops"')
        return v

    @field_validator("max_notify_age", "retry_max", mode="before")
    @classmethod
    def _durations(cls, v: Any, info: Any) -> float:
        return _duration(v, info.field_name)

    @field_validator("lateness", mode="before")
    @classmethod
    def _lateness(cls, v: Any) -> float:
        seconds = _duration(v, "lateness")
        if seconds > 3600:
            raise _fix(f"lateness of {seconds:g}s holds every alert back that long", 'use at most "1h" (a few seconds '
                       "covers workers that share a subscription)")
        return seconds

    @field_validator("catch_up_wait", mode="before")
    @classmethod
    def _catch_up_wait(cls, v: Any) -> float:
        seconds = _duration(v, "catch_up_wait")
        if seconds > 86400:
            raise _fix(f"catch_up_wait of {seconds:g}s could hold every alert back that long",
                       'use at most "1d"; the default, "10m", covers draining an hour of a city\'s backlog')
        return seconds

    @field_validator("no_data_grace", mode="before")
    @classmethod
    def _grace(cls, v: Any) -> float | None:
        return None if v is None else _duration(v, "no_data_grace")


def _number(v: str | int | float | bool) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _backlink() -> str:
    """The default externalURL. Alertmanager's own is http://<hostname>:<port>/ (app/url.go); this
    service's HTTP address may be a wildcard, so the host name alone."""
    host = socket.gethostname()
    return f"http://{host}/" if _HOST.match(host) else "http://localhost/"


def _label_problems(where: str, rule: RuleSettings, hook: str) -> list[str]:
    """A rule whose events go to an Alertmanager-format webhook: its labels become Prometheus labels.
    Refused rather than renamed: a renamed label could collide with another, and the receiver's
    routes would match names the config does not show."""
    out = []
    for name in rule.labels:
        if name in RESERVED_LABELS:
            out.append(f"{where}.labels: {name!r} is a label the Alertmanager body of webhook {hook!r} sets itself: "
                       f"{', '.join(RESERVED_LABELS)} come from the rule and the reading (fix: rename the label"
                       + (", and set the rule's severity key instead)" if name == "severity" else ")"))
        elif not LABEL_NAME.match(name):
            fixed = re.sub(r"[^a-zA-Z0-9_]", "_", name)
            fixed = fixed if LABEL_NAME.match(fixed) else "_" + fixed
            out.append(f"{where}.labels: {name!r} is not a Prometheus label name, and webhook {hook!r} sends the "
                       f"Alertmanager body (fix: use letters, digits and \"_\", not starting with a digit, e.g. "
                       f"{fixed!r})")
    return out


def _rule_of(r: RuleSettings) -> Rule:
    """The frozen rule of a valid entry (RuleSettings checked the kind and its keys)."""
    common: dict[str, Any] = {
        "for_seconds": r.for_, "severity": r.severity, "webhooks": tuple(r.webhooks), "summary": r.summary,
        "labels": tuple(sorted(r.labels.items())), "devices": tuple(r.devices),
        "where": tuple(sorted((k, _number(v)) for k, v in r.where.items())),
    }
    if r.no_data is not None:
        # Kind "above" with the silence in seconds as the value; the duration is the hold, so no for.
        per: Literal["series", "device"] = r.per or "series"
        return Rule(r.name, "" if per == "device" else _metric_of(r), "above", r.no_data,
                    signal="no_data", per=per, **{**common, "for_seconds": 0.0})
    metric = _metric_of(r)
    clear_level = r.clear if isinstance(r.clear, float | int) else None
    if r.rate is not None:
        rate_kind: Literal["above", "below"] = "above" if r.rate.above is not None else "below"
        level = r.rate.above if r.rate.above is not None else r.rate.below
        assert level is not None
        return Rule(r.name, metric, rate_kind, level, clear=clear_level, signal="rate", over=r.rate.over, **common)
    window: dict[str, Any] = {}
    if r.window is not None:
        w = r.window
        window = {"signal": "window", "over": w.over, "agg": w.agg, "align": w.align, "coverage": w.coverage}
    if r.outside is not None:
        low, high = r.outside
        clear = r.clear if isinstance(r.clear, tuple) else (None, None)
        return Rule(r.name, metric, "outside", low, high, clear[0], clear[1], **common, **window)
    kind: Literal["above", "below"] = "above" if r.above is not None else "below"
    level = r.above if r.above is not None else r.below
    assert level is not None
    return Rule(r.name, metric, kind, level, None, clear_level, **common, **window)


def _metric_of(r: RuleSettings) -> str:
    assert r.metric is not None, "RuleSettings requires a metric for every kind but per-device no_data"
    return r.metric


def compile_alerts(rules: list[RuleSettings], webhooks: list[WebhookSettings],
                   env: dict[str, str] | None = None) -> tuple[tuple[Rule, ...], dict[str, Webhook], list[str]]:
    """The frozen rules and webhooks, and every problem found (each naming the rule or webhook, the
    key and the fix); secrets are read from the environment here and never printed."""
    env = dict(os.environ) if env is None else env
    problems: list[str] = []
    hooks: dict[str, Webhook] = {}
    for i, w in enumerate(webhooks):
        where = f"webhooks[{i}] ({w.name})"
        if w.name in hooks:
            problems.append(f"{where}: a second webhook named {w.name!r} (fix: give each webhook its own name)")
            continue
        secret = env.get(w.secret_env)
        if not secret:
            problems.append(f"{where}.secret_env: {w.secret_env} is not set in the environment (fix: set "
                            f"{w.secret_env} in the service's environment to whsec_ followed by the base64 of 24 to "
                            "64 random bytes, the secret the receiver verifies with)")
            continue
        try:
            key = decode_secret(secret)
        except ValueError as exc:
            problems.append(f"{where}.secret_env: the value of {w.secret_env} is {exc} (fix: whsec_ and the base64 "
                            "of 24 to 64 random bytes)")
            continue
        backlink = (w.external_url or _backlink()) if w.body == "alertmanager" else ""
        hooks[w.name] = Webhook(w.name, w.url, key, w.body, w.timeout, w.max_age, backlink)
    compiled: list[Rule] = []
    names: set[str] = set()
    for i, r in enumerate(rules):
        where = f"rules[{i}] ({r.name})"
        if r.name in names:
            problems.append(f"{where}: a second rule named {r.name!r} (fix: give each rule its own name)")
            continue
        names.add(r.name)
        unknown = [h for h in r.webhooks if h not in {w.name for w in webhooks}]
        if unknown:
            problems.append(f"{where}.webhooks: no [[webhooks]] entry is named {unknown[0]!r} (fix: add it, or "
                            f"use one of {sorted(w.name for w in webhooks) or 'none defined'})")
            continue
        alertmanager = next((h for h in r.webhooks if any(w.name == h and w.body == "alertmanager"
                                                           for w in webhooks)), None)
        bad_labels = _label_problems(where, r, alertmanager) if alertmanager else []
        if bad_labels:
            problems += bad_labels
            continue
        compiled.append(_rule_of(r))
    return tuple(compiled), hooks, problems
