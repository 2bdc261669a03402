"""[[webhooks]], [[rules]] and [alerts]: the alerting part of the config file (the key names are
the issue's contract). Validated completely, with the rule's name, the key and the fix in each error;
``compile_alerts`` turns them into the frozen model the service runs.
"""

from __future__ import annotations

import os
import re
import socket
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ingest.alerts.body import LABEL_NAME, RESERVED_LABELS
from ingest.alerts.model import Rule, Webhook, decode_secret, parse_duration
from ingest.alerts.mqtt_channel import prefix_problem

__all__ = ["AlertSettings", "RuleSettings", "WebhookSettings", "compile_alerts", "template_fields"]

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


class RuleSettings(_Section):
    name: str
    metric: str = Field(description="the stored metric name")
    devices: list[str] = Field(default_factory=list, description="globs on device ids (default: every device)")
    where: dict[str, str | int | float | bool] = Field(default_factory=dict,
                                                       description="device attributes that must equal these")
    above: float | None = None
    below: float | None = None
    outside: tuple[float, float] | None = None
    clear: float | tuple[float, float] | None = Field(
        None, description="the level that ends the episode (outside: [low, high]); default: the threshold")
    for_: float = Field(0.0, alias="for", description='the condition must hold this long in event time, e.g. "2m"')
    severity: str = Field("warning", min_length=1, max_length=32)
    webhooks: list[str] = Field(default_factory=list, description="names of [[webhooks]] entries")
    summary: str = Field("", max_length=1000, description="template: {device} {metric} {value} {threshold} ...")
    labels: dict[str, str] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise _fix(f"rule name {v!r} is not a plain name", 'use letters, digits, "-", "_" or ".", e.g. "pm25-high"')
        return v

    @field_validator("for_", mode="before")
    @classmethod
    def _for(cls, v: Any) -> float:
        return _duration(v, "for")

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
        given = [k for k in ("above", "below", "outside") if getattr(self, k) is not None]
        if len(given) != 1:
            raise _fix(f"rule {self.name!r} sets {' and '.join(given) if given else 'none'} of above, below, outside",
                       "set exactly one: above = 55.5, below = 0.5 or outside = [low, high]")
        if self.outside is not None:
            low, high = self.outside
            if low >= high:
                raise _fix(f"rule {self.name!r}: outside = [{low:g}, {high:g}] is not a range", "write [low, high]")
            if self.clear is not None:
                if not isinstance(self.clear, tuple):
                    raise _fix(f"rule {self.name!r}: with outside, clear is a range", "write clear = [low, high]")
                cl, ch = self.clear
                if not (low <= cl <= ch <= high):
                    raise _fix(f"rule {self.name!r}: clear = [{cl:g}, {ch:g}] must lie inside outside = "
                               f"[{low:g}, {high:g}]", "narrow clear, or leave it out")
        elif self.clear is not None:
            if isinstance(self.clear, tuple):
                raise _fix(f"rule {self.name!r}: clear is a range only with outside",
                           "write one number, e.g. clear = 50")
            if self.above is not None and self.clear > self.above:
                raise _fix(f"rule {self.name!r}: clear = {self.clear:g} is above the threshold {self.above:g}, "
                           "so the episode would end while the condition still holds", "set clear at or below above")
            if self.below is not None and self.clear < self.below:
                raise _fix(f"rule {self.name!r}: clear = {self.clear:g} is below the threshold {self.below:g}",
                           "set clear at or above below")
        return self


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
        if r.outside is not None:
            low, high = r.outside
            clear = r.clear if isinstance(r.clear, tuple) else (None, None)
            rule = Rule(r.name, r.metric, "outside", low, high, clear[0], clear[1], r.for_, r.severity,
                        tuple(r.webhooks), r.summary, tuple(sorted(r.labels.items())), tuple(r.devices),
                        tuple(sorted((k, _number(v)) for k, v in r.where.items())))
        else:
            kind: Literal["above", "below"] = "above" if r.above is not None else "below"
            level = r.above if r.above is not None else r.below
            assert level is not None
            clear_level = r.clear if isinstance(r.clear, float | int) else None
            rule = Rule(r.name, r.metric, kind, level, None, clear_level, None, r.for_, r.severity,
                        tuple(r.webhooks), r.summary, tuple(sorted(r.labels.items())), tuple(r.devices),
                        tuple(sorted((k, _number(v)) for k, v in r.where.items())))
        compiled.append(rule)
    return tuple(compiled), hooks, problems
