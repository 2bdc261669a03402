"""The one typed configuration object, built once in main() and passed down.

Sources, highest priority first:
  1. SENSOR_INGEST_DATABASE_URL, SENSOR_INGEST_MQTT_URL, SENSOR_INGEST_HTTP_ADDR (and the other
     short names in ENV_SHORT_NAMES): enough on their own to run the service;
  2. SENSOR_INGEST_<SECTION>__<KEY> for any other key (e.g. SENSOR_INGEST_MQTT__CLIENT_ID);
  3. the TOML file given with --config;
  4. the defaults below (deploy/sensor-ingest.example.toml documents each one).
Secrets (passwords) come only from the environment: a password written in the file is refused,
whether after the user name (user:password@) or in the query string (?password=). No error message
echoes a password: inputs are shown through mask_url, and pydantic's own messages hide them.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin
from urllib.parse import parse_qsl, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from ingest.alerts.settings import AlertSettings, RuleSettings, WebhookSettings, compile_alerts
from ingest.errors import ConfigError, ConfigProblem
from ingest.logs import is_secret_name, mask_secrets

if TYPE_CHECKING:
    from ingest.alerts.model import Rule, Webhook
    from ingest.catalog import Catalog, Quantity
    from ingest.decoders.mapping import SourceMapping

__all__ = [
    "ENV_SHORT_NAMES",
    "DatabaseSettings",
    "HttpSettings",
    "IngestSettings",
    "LogSettings",
    "MetricSettings",
    "MqttSettings",
    "QualitySettings",
    "RetentionSettings",
    "Settings",
    "SourceSettings",
    "load_settings",
    "mask_url",
]

ENV_PREFIX = "SENSOR_INGEST_"

# Short environment names -> (section, key). The three URLs are the documented minimum.
ENV_SHORT_NAMES: dict[str, tuple[str, str]] = {
    "SENSOR_INGEST_DATABASE_URL": ("database", "url"),
    "SENSOR_INGEST_DATABASE_PASSWORD": ("database", "password"),
    "SENSOR_INGEST_MQTT_URL": ("mqtt", "url"),
    "SENSOR_INGEST_MQTT_USERNAME": ("mqtt", "username"),
    "SENSOR_INGEST_MQTT_PASSWORD": ("mqtt", "password"),
    "SENSOR_INGEST_HTTP_ADDR": ("http", "addr"),
    "SENSOR_INGEST_LOG_LEVEL": ("log", "level"),
    "SENSOR_INGEST_LOG_FORMAT": ("log", "format"),
}

# Keys that are secrets: refused in the file, accepted from the environment.
SECRET_KEYS = {("database", "password"), ("mqtt", "password")}


def mask_url(url: str) -> str:
    """The URL with its passwords replaced by ***, for logs and error messages.

    It does not parse the URL, so a malformed one (a bad port, a stray '[', no scheme) is masked too:
    the user info runs to the last '@' (a password written without percent-encoding may hold ':',
    '/', '?', '#' or '@'), and secret query parameters (password=, sslpassword=) are masked as well.
    When in doubt it masks more (an '@' in the query string), never less. The user name is kept as
    written.
    """
    head, sep, rest = url.partition("://")
    if sep:
        head += sep
    else:
        head, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = userinfo.partition(":")[0] + ":***@" + hostpart
    return mask_secrets(head + rest)


def _has_password(url: str) -> bool:
    return mask_url(url) != url


_FIX = "config_fix"


def _fix_error(message: str, fix: str) -> PydanticCustomError:
    """A validation error whose ConfigProblem gets ``fix`` (instead of "got <the input>")."""
    return PydanticCustomError(_FIX, message, {"fix": fix})


class _Section(BaseModel):
    # hide_input_in_errors: a ValidationError's text (printed with a traceback) never shows a value.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class DatabaseSettings(_Section):
    url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/sensor_ingest",
        description="PostgreSQL URL (postgresql://user@host:port/db). Env: SENSOR_INGEST_DATABASE_URL",
    )
    password: SecretStr | None = Field(
        None, description="Env only: SENSOR_INGEST_DATABASE_PASSWORD (or PGPASSWORD, or in the env URL)"
    )
    pool_size: int = Field(4, ge=1, le=100, description="connections of the ingest pool")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to wait for a new connection")
    command_timeout: float = Field(30.0, gt=0, description="seconds a statement may take before it is abandoned")

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(f"must start with postgresql:// (got {scheme or 'no'} scheme)")
        return v


class MqttSettings(_Section):
    url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="broker URL: mqtt://host:port, or mqtts://host:port for TLS. Env: SENSOR_INGEST_MQTT_URL",
    )
    username: str | None = Field(None, description="or in the URL; env SENSOR_INGEST_MQTT_USERNAME")
    password: SecretStr | None = Field(None, description="Env only: SENSOR_INGEST_MQTT_PASSWORD (or in the env URL)")
    client_id: str = Field(
        "sensor-ingest-1",
        min_length=1,
        max_length=128,
        description="stable client id: the broker keeps this id's session (and unacknowledged messages)",
    )
    session_expiry: int = Field(86400, ge=1, description="seconds the broker keeps the session while we are away")
    receive_maximum: int = Field(
        4096, ge=1, le=65535, description="messages the broker may send before we acknowledge (bounds memory)"
    )
    keepalive: int = Field(30, ge=5, le=65535, description="seconds between pings")
    qos: Literal[0, 1] = Field(
        1,
        description="subscription QoS: 1 = at-least-once (the product's promise), 0 = at-most-once; 2 is refused",
    )
    shared_group: str | None = Field(
        None, description="subscribe as $share/<group>/<filter> so several workers share the load"
    )
    ca_file: Path | None = Field(None, description="CA bundle for mqtts:// (default: the system's)")
    cert_file: Path | None = Field(None, description="client certificate for mutual TLS")
    key_file: Path | None = Field(None, description="client key for mutual TLS")
    reconnect_min: float = Field(0.5, gt=0, description="first reconnect delay, seconds")
    reconnect_max: float = Field(30.0, gt=0, description="reconnect delay cap, seconds")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to wait for CONNACK")

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"must start with mqtt:// or mqtts:// (got {parts.scheme or 'no'} scheme)")
        if not parts.hostname:
            raise ValueError("has no host")
        try:
            _ = parts.port
        except ValueError:
            # Not urllib's message: for mqtt://u:pa/ss@h it quotes "pa", a piece of the password.
            raise _fix_error(
                "has a bad port",
                "a port is a number up to 65535; percent-encode a password that holds '/', '?', '#' or '@'",
            ) from None
        if any(is_secret_name(k) for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
            raise _fix_error(
                "holds a password in its query string, which the MQTT client does not read",
                "set SENSOR_INGEST_MQTT_PASSWORD (and SENSOR_INGEST_MQTT_USERNAME), "
                "or put the user and password before the host",
            )
        return v

    @field_validator("qos", mode="before")
    @classmethod
    def _no_qos_2(cls, v: object) -> object:
        if v in (2, "2"):
            raise _fix_error(
                "QoS 2 cannot keep the ack-after-commit promise: paho acknowledges a QoS 2 PUBLISH (PUBREC) "
                "as soon as it arrives, before its readings are committed",
                "use qos = 1 (at-least-once: redelivered until committed) or qos = 0 (at-most-once, no redelivery)",
            )
        return v

    @field_validator("shared_group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/+#")):
            raise ValueError("must be a non-empty name without '/', '+' or '#'")
        return v

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme in ("mqtts", "ssl")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    def credentials(self) -> tuple[str | None, str | None]:
        """(username, password): explicit settings win over the URL's user info."""
        parts = urlsplit(self.url)
        user = self.username or (unquote(parts.username) if parts.username else None)
        if self.password is not None:
            return user, self.password.get_secret_value()
        return user, unquote(parts.password) if parts.password else None


class HttpSettings(_Section):
    addr: str = Field(
        "127.0.0.1:8080",
        description="host:port of /healthz, /readyz, /metrics and the API. Env: SENSOR_INGEST_HTTP_ADDR",
    )

    @field_validator("addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:8080 or 0.0.0.0:8080")
        return v

    @property
    def host(self) -> str:
        return self.addr.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.addr.rpartition(":")[2])


class IngestSettings(_Section):
    batch_max_messages: int = Field(4000, ge=1, description="flush a batch when it holds this many messages")
    batch_max_readings: int = Field(40000, ge=1, description="... or this many readings")
    batch_max_age: float = Field(0.2, gt=0, description="... or when its oldest message is this many seconds old")
    max_message_bytes: int = Field(
        65536, ge=64, description="larger payloads are rejected (reason too_large); keep it below the broker's "
        "message_size_limit, so that they reach the service and leave a row"
    )
    max_future: float = Field(
        600.0, ge=0, description="seconds a reading's time may be ahead of the receive time (device clock drift)"
    )
    earliest_time: str = Field(
        "2000-01-01T00:00:00Z", description="readings timed before this are rejected (bad_time), e.g. clocks at 1970"
    )
    max_readings_per_message: int = Field(
        2000, ge=1, description="a message holding more readings is rejected whole (too_many_readings)"
    )
    max_lines_per_message: int = Field(
        2000, ge=1, description="a line protocol message of more lines is rejected whole (too_many_lines)"
    )
    max_metric_name_length: int = Field(
        200, ge=16, le=256, description="a reading whose metric name is longer is rejected (bad_metric); at "
        "most 256, the database's limit"
    )
    max_json_depth: int = Field(
        32, ge=2, le=1000, description="JSON nested deeper is rejected (too_deep) before it is parsed"
    )
    max_new_devices_per_minute: int = Field(
        1000,
        ge=1,
        description="per source: readings of new device ids beyond this many in a minute are rejected "
        "(too_many_new_series), so one publisher cannot fill the devices table",
    )
    max_new_metrics_per_minute: int = Field(
        100, ge=1, description="per source: likewise for new metric names (too_many_new_series)"
    )
    workers: int = Field(
        1, ge=1, le=64,
        description="worker processes `sensor-ingest run` starts on this machine (--workers overrides it). 1: "
        "the service runs in the process itself. Above 1: a supervisor runs that many, sharing the load on "
        "the mqtt.shared_group subscription (required); worker k has client id <mqtt.client_id>-k (worker 1 "
        "the id itself) and listens on the port of http.addr + k - 1",
    )


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    format: Literal["text", "json"] = Field("text", description="text for people, json for log collectors")


# Strict: TOML's "yes" must not become True, nor true become 1.0.
_VALUE = StrictBool | StrictInt | StrictFloat


def _storable_name(what: str, name: str, *, unit: bool = False) -> str:
    """A stored metric name or unit that validation would refuse on every reading is a config error."""
    from ingest.validate import MAX_UNIT, _bad_name

    # Names: the database's limit here; ingest.max_metric_name_length (200 by default) is checked
    # against the whole configuration (Settings._renames_fit).
    limit = MAX_UNIT if unit else _DB_NAME
    why = _bad_name(name, limit)
    if why or not name.strip():
        raise _fix_error(f"{what} {json.dumps(name)} {why or 'is blank'}",
                         "write a printable name" + (f" of at most {MAX_UNIT} characters, e.g. \"degC\"" if unit else
                                                     f" of at most {_DB_NAME} characters, e.g. \"temperature\""))
    return name


_DB_NAME = 256  # metrics.name's CHECK in schemas/migrations


def _finite_values(table: dict[str, bool | int | float]) -> dict[str, bool | int | float]:
    for key, value in table.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise _fix_error(f"value_map[{key!r}] is {value}: every reading mapped to it would be refused",
                             "map it to a finite number or a boolean")
    return table


class MetricSettings(_Section):
    """What to do with one decoded metric name (or every name a glob matches) of a source."""

    # Strict: scale = true or scale = "2" is a mistake to report, not a number to guess.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True, strict=True)

    rename: str | None = Field(None, min_length=1, max_length=_DB_NAME, description="the stored metric name")
    ignore: bool = Field(False, description="not a reading: counted as ignored, not stored")
    state: bool = Field(False, description="its strings are text states (stored in `states`)")
    scale: float = Field(1.0, allow_inf_nan=False, description="stored value = value * scale + offset")
    offset: float = Field(0.0, allow_inf_nan=False, description="see scale")
    unit: str | None = Field(None, min_length=1, max_length=32,
                             description="unit of the stored value (after scale and offset), replacing the payload's")
    value_map: dict[str, _VALUE] | None = Field(None, description='strings to numbers, e.g. {"ON" = 1, "OFF" = 0}')

    @field_validator("rename")
    @classmethod
    def _rename(cls, v: str | None) -> str | None:
        return v if v is None else _storable_name("rename", v)

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str | None) -> str | None:
        return v if v is None else _storable_name("unit", v, unit=True)

    @field_validator("value_map")
    @classmethod
    def _finite_map(cls, v: dict[str, bool | int | float] | None) -> dict[str, bool | int | float] | None:
        return v if v is None else _finite_values(v)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        if v == 0:
            raise _fix_error("a scale of 0 stores 0 for every reading", "use ignore = true to drop the metric")
        return v


def _zone(v: str | None) -> str | None:
    if v is not None:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {v!r} (use an IANA name like Asia/Ho_Chi_Minh)") from exc
    return v


def _format_names() -> tuple[str, ...]:
    from ingest.decoders import FORMATS  # deferred: keeps `ingest.settings` importable on its own

    return FORMATS


class SourceSettings(_Section):
    """A topic template bound to a payload format and a mapping."""

    name: str = Field(min_length=1, max_length=64, description="name used in logs, metrics and rejections")
    topic: str = Field(min_length=1, description="topic template, e.g. city/{device}/up; {x} captures one level")
    format: str = Field(description="payload format: native, senml, json, lorawan, line, value, or auto (told "
                        "from each payload)")
    exclude: list[str] = Field(
        default_factory=list, description="globs on the whole topic (* spans levels) of topics that are not this "
        "source's though its template matches them; they go to the next source, else are counted as skipped")
    timezone: str | None = Field(None, description="IANA zone for timestamps without an offset")
    time_policy: Literal["device", "receive", "device_or_receive"] = Field(
        "device", description="device: the payload's time (outside [ingest.earliest_time, receive time + "
        "ingest.max_future] it is bad_time); receive: the receive time for every reading; device_or_receive: the "
        "payload's time when it lies in that window, else the receive time (flagged), for devices that report "
        "1970 after a power loss")
    device_policy: Literal["register", "known"] = Field(
        "register", description="register: a new device id is added to the devices table; known: only devices "
        "already there are stored, others are unknown_device rejections")
    device_prefix: str = Field("", description="prepended to every device id of this source")
    expected_interval: float | None = Field(
        None, gt=0, description="seconds (or \"5m\") between a device's readings of each metric, for data "
        "quality (completeness, staleness); a device's own, from the register, comes first. Default: learned "
        "from the median gap of its last readings")
    allow_devices: list[str] | None = Field(
        None,
        description="globs (fnmatch, case-sensitive) of the device ids this source may write, matched against "
        "the id as the topic or payload gives it (before device_prefix); readings of other devices are "
        "rejected (bad_device). Default: any device",
    )
    time_field: str | None = Field(
        None, min_length=1, description="json: dotted payload path of the time (epoch s/ms/us/ns, RFC 3339, or "
        "a local time without offset read in `timezone`). Default: the receive time")
    device_field: str | None = Field(
        None, min_length=1, description="json: dotted payload path of the device id (checked against the "
        "topic's {device} when there is one)")
    rename: dict[str, str] = Field(default_factory=dict, description="decoded metric name -> stored name")
    ignore: list[str] = Field(default_factory=list, description="globs of decoded metric names that are not readings")
    states: list[str] = Field(default_factory=list,
                              description="globs of decoded metric names whose strings are text states")
    value_map: dict[str, _VALUE] = Field(
        default_factory=dict, description='strings to numbers for every metric without its own, e.g. {"ON" = 1}')
    metrics: dict[str, MetricSettings] = Field(
        default_factory=dict, description="per decoded metric name or glob: rename, ignore, state, scale, offset, "
        "unit, value_map")
    options: dict[str, Any] = Field(default_factory=dict, description="format options (see the README per format)")

    @field_validator("expected_interval", mode="before")
    @classmethod
    def _interval(cls, v: object) -> object:
        return _duration_of(v, "expected_interval") if v is not None else v

    @field_validator("allow_devices")
    @classmethod
    def _globs(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise _fix_error(
                "must list at least one device id glob",
                'e.g. allow_devices = ["hn-aq-*"], or leave the key out to allow any device',
            )
        for i, pattern in enumerate(v):
            if not pattern.strip():
                raise _fix_error(f"allow_devices[{i}] is empty", 'write a glob such as "hn-aq-*"')
        return v

    @field_validator("ignore", "states", "exclude")
    @classmethod
    def _name_globs(cls, v: list[str], info: ValidationInfo) -> list[str]:
        example = ('a topic glob such as "zigbee2mqtt/bridge/*"' if info.field_name == "exclude"
                   else 'a metric name or a glob such as "ENERGY.*"')
        for i, pattern in enumerate(v):
            if not pattern.strip():
                raise _fix_error(f"entry [{i}] is empty", f"write {example}")
        return v

    @field_validator("rename")
    @classmethod
    def _renames(cls, v: dict[str, str]) -> dict[str, str]:
        for key, name in v.items():
            _storable_name(f"rename of {key!r}", name)
        return v

    @field_validator("value_map")
    @classmethod
    def _finite_map(cls, v: dict[str, bool | int | float]) -> dict[str, bool | int | float]:
        return _finite_values(v)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        known = _format_names()
        if v not in known:
            raise ValueError(f"unknown format {v!r}; known: {', '.join(known)}")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        return _zone(v)

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        # Deferred import: routing is pure and imports nothing from here.
        from ingest.routing import compile_template

        compile_template(v)
        return v

    @model_validator(mode="after")
    def _fits_format(self) -> SourceSettings:
        from ingest.decoders import OPTIONS, PATH_FIELDS

        for key in ("time_field", "device_field"):
            if getattr(self, key) is not None and self.format not in PATH_FIELDS:
                raise _fix_error(
                    f"{key} is read by the {', '.join(sorted(PATH_FIELDS))} format, not by {self.format}",
                    f"remove {key}, or use format = \"json\"")
        dropped = sorted((set(self.rename) | {k for k, m in self.metrics.items() if m.rename is not None})
                         & ({k for k, m in self.metrics.items() if m.ignore} | set(self.ignore)))
        if dropped:
            raise _fix_error(f"{dropped[0]!r} is both renamed and ignored", "keep the rename or the ignore")
        both = sorted(set(self.rename) & {k for k, m in self.metrics.items() if m.rename is not None})
        if both:
            raise _fix_error(f"{both[0]!r} is renamed both in rename and in metrics.{both[0]}.rename",
                             "keep one of the two")
        try:
            OPTIONS[self.format].model_validate(self.options)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            known = ", ".join(OPTIONS[self.format].model_fields) or "none"
            msg = "unknown option" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            raise _fix_error(f"options.{where}: {msg} for format {self.format}",
                             f"options of {self.format}: {known}") from None
        return self

    def mapping(self) -> SourceMapping:
        """The compiled mapping (ingest.decoders.mapping) of this source."""
        from ingest.decoders.mapping import MetricRule, SourceMapping

        def table(values: dict[str, bool | int | float] | None) -> dict[str, float | bool] | None:
            return None if values is None else {k: v if isinstance(v, bool) else float(v) for k, v in values.items()}

        rules: list[tuple[str, MetricRule]] = []
        for name, m in self.metrics.items():
            # Only what the table sets: an unset key lets a glob's setting through.
            given = m.model_fields_set
            rules.append((name, MetricRule(
                rename=m.rename, unit=m.unit, value_map=table(m.value_map),
                ignore=m.ignore if "ignore" in given else None, state=m.state if "state" in given else None,
                scale=m.scale if "scale" in given else None, offset=m.offset if "offset" in given else None)))
        rules += [(name, MetricRule(rename=to)) for name, to in self.rename.items()]
        rules += [(pattern, MetricRule(ignore=True)) for pattern in self.ignore]
        rules += [(pattern, MetricRule(state=True)) for pattern in self.states]
        return SourceMapping(rules=tuple(rules), value_map=table(self.value_map or None), time_field=self.time_field,
                             device_field=self.device_field)

    def format_options(self) -> dict[str, Any]:
        """The validated format options, with their defaults."""
        from ingest.decoders import OPTIONS

        return OPTIONS[self.format].model_validate(self.options).model_dump()


def _device_ids_bounded(source: SourceSettings) -> SourceSettings:
    """A source without a {device} capture takes its device ids from the payload: bound them.

    Applied to the configured [[sources]] only, not in SourceSettings itself, so that the ad-hoc
    source of `sensor-ingest decode --format` (topic "#") can still be built.
    """
    # Deferred import: routing is pure and imports nothing from here.
    from ingest.routing import compile_template

    route = compile_template(source.topic)
    if route.rest and all(level is None for level in route.levels):
        raise _fix_error(
            f"subscribes to every topic ({route.filter}): the service would read the whole broker, its own "
            "alert topics and every other system's traffic included",
            'start the template with a literal level, e.g. topic = "tele/{device}/#"')
    has_device = "device" in route.names or route.rest_name == "device"
    if source.format == "value" and not has_device:
        raise _fix_error("the value format takes the device from the topic, and this topic has no {device}",
                         'capture the device level, e.g. topic = "shellies/{device}/#"')
    if has_device or source.device_prefix or source.allow_devices:
        return source
    prefix = json.dumps(f"{source.name}:", ensure_ascii=False)
    raise _fix_error(
        "takes device ids from the payload (its topic template has no {device} capture), so any publisher "
        "on it could write as any device",
        f'set device_prefix = {prefix} or allow_devices = ["pattern-*"]',
    )


class CatalogSettings(_Section):
    """[catalog]: the metric catalog (ingest.catalog): units, ranges, bindings."""

    enabled: bool = Field(True, description="false: no binding, conversion or range check; readings are stored "
                          "as decoded")
    reference_temperature: float = Field(
        25.0, ge=-50, le=60, allow_inf_nan=False,
        description="degC of the ppm/ppb to ug/m3 (mg/m3) conversion of gases (25: the US EPA's; 20: the EU's)")
    reference_pressure: float = Field(1013.25, gt=500, le=1100, allow_inf_nan=False,
                                      description="hPa of that conversion")


def _duration_of(v: object, key: str) -> float:
    from ingest.alerts.model import parse_duration

    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise _fix_error(f"{key}: {v!r} is not a duration", 'write seconds or a duration such as "30s", "5m", "24h"')
    try:
        return parse_duration(v)
    except ValueError as exc:
        raise _fix_error(f"{key}: {exc}", 'write seconds or a duration such as "30s", "5m", "24h"') from exc


class RetentionSettings(_Section):
    """[retention]: how long rejected_messages keeps its rows (ingest.store.retention)."""

    rejected_messages: float = Field(
        30 * 86400.0, gt=0, description="seconds (or \"30d\") a rejection row is kept for inspection and replay; "
        "older chunks (one per day) are dropped")
    every: float = Field(3600.0, gt=0, description="seconds (or \"1h\") between two runs of the retention job; "
                         "one worker runs it at a time (a PostgreSQL advisory lock)")
    enabled: bool = Field(True, description="false: this process never drops rejection rows (another may)")

    @field_validator("rejected_messages", "every", mode="before")
    @classmethod
    def _durations(cls, v: object, info: ValidationInfo) -> object:
        return _duration_of(v, str(info.field_name))


class QualitySettings(_Section):
    """[quality]: data quality per device (ingest.quality; `sensor-ingest quality`) and its fleet gauges."""

    window: float = Field(86400.0, gt=0, description="seconds (or \"24h\") over which completeness is computed")
    stale_after: float = Field(3.0, gt=0, description="a series is stale after this many expected intervals "
                               "without a reading")
    below: float = Field(90.0, gt=0, le=100, description="percent: a device with a series less complete than this "
                         "counts in the sensor_ingest_devices_incomplete gauge")
    learn_from: int = Field(20, ge=3, le=1000, description="readings whose median gap is the expected interval "
                            "of a series that none is declared for")
    every: float = Field(300.0, ge=0, description="seconds (or \"5m\") between two computations of the fleet "
                         "gauges; 0: not computed by this process")

    @field_validator("window", "every", mode="before")
    @classmethod
    def _durations(cls, v: object, info: ValidationInfo) -> object:
        return _duration_of(v, str(info.field_name))


_RANGE = tuple[float | None, float | None]


class QuantitySettings(_Section):
    """One [[metrics]] entry: a quantity of the catalog to override (by name) or to add."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True, strict=True)

    name: str = Field(min_length=1, max_length=64, description="the quantity's name (a built-in one to override "
                      "it); a metric of this name binds to it")
    unit: str | None = Field(None, min_length=1, max_length=32,
                             description="the stored unit (default: the built-in quantity's; required for a new "
                             "number quantity)")
    kind: Literal["number", "bool", "state"] | None = Field(None, description="number, bool or state (default: the "
                                                             "built-in's, else number)")
    possible: _RANGE | None = Field(None, description="[low, high]: outside, a reading is rejected (out_of_range)")
    plausible: _RANGE | None = Field(None, description="[low, high]: outside, it is stored with the suspect flag")
    aliases: list[str] = Field(default_factory=list, description="more metric names that bind to it (added to the "
                               "built-in's)")
    molar_mass: float | None = Field(None, gt=0, allow_inf_nan=False,
                                     description="g/mol: a gas whose ppm/ppb readings convert to its unit")
    source: str | None = Field(None, description="where the ranges come from (stored in metrics.range_source)")

    @model_validator(mode="before")
    @classmethod
    def _ranges_lax(cls, data: Any) -> Any:
        # TOML integers are fine as bounds: [0, 500]; strict mode would refuse them as floats.
        if isinstance(data, dict):
            for key in ("possible", "plausible"):
                r = data.get(key)
                if isinstance(r, list):
                    data = {**data, key: tuple(float(x) if isinstance(x, int) and not isinstance(x, bool) else x
                                               for x in r)}
            mm = data.get("molar_mass")
            if isinstance(mm, int) and not isinstance(mm, bool):
                data = {**data, "molar_mass": float(mm)}
        return data

    @field_validator("possible", "plausible")
    @classmethod
    def _ordered(cls, v: _RANGE | None, info: ValidationInfo) -> _RANGE | None:
        if v is not None:
            lo, hi = v
            for x in v:
                if x is not None and not math.isfinite(x):
                    raise _fix_error(f"{info.field_name} holds {x}", "write finite numbers, e.g. [0, 500]")
            if lo is not None and hi is not None and lo > hi:
                raise _fix_error(f"{info.field_name} = [{lo:g}, {hi:g}] has its low end above its high end",
                                 f"write [{hi:g}, {lo:g}]")
        return v

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str | None) -> str | None:
        return v if v is None else _storable_name("unit", v, unit=True)

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        for i, a in enumerate(v):
            if not a.strip():
                raise _fix_error(f"aliases[{i}] is empty", 'write a metric name such as "river_level"')
        return v


class PresetSettings(_Section):
    """The built-in sources (ingest.presets), each on unless switched off here."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True, strict=True)

    enabled: bool = Field(True, description="false: no preset at all, only the configured [[sources]]")
    timezone: str | None = Field(
        None, description="IANA zone of the local times some firmware sends without an offset (Tasmota's Time); "
        "unset: such messages take the receive time")
    tasmota: bool = Field(True, description="Tasmota: tele/<topic>/SENSOR and STATE")
    zigbee2mqtt: bool = Field(True, description="Zigbee2MQTT: zigbee2mqtt/<friendly name>")
    homeassistant: bool = Field(True, description="Home Assistant style: homeassistant/<component>/<id>/state")
    esphome: bool = Field(True, description="ESPHome: <node>/sensor|binary_sensor|text_sensor|switch/<name>/state")
    shelly: bool = Field(True, description="Shelly Gen1 (shellies/<id>/...) and Gen2+ (<id>/events/rpc, "
                         "<id>/status/<component>)")
    homie: bool = Field(True, description="Homie 3/4 (homie/<device>/...) and 5 (homie/5/<device>/...)")
    ttn: bool = Field(True, description="The Things Stack v3: v3/<app>@<tenant>/devices/<id>/up")
    chirpstack: bool = Field(True, description="ChirpStack v4: application/<id>/device/<DevEUI>/event/up")
    airrohr: bool = Field(True, description="Sensor.Community / airrohr JSON: airrohr/#")

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        return _zone(v)

    @field_validator("*", mode="before")
    @classmethod
    def _env_bool(cls, v: object, info: ValidationInfo) -> object:
        # true/false from the environment (SENSOR_INGEST_PRESETS__TASMOTA=false) arrive as text; a
        # file's "no" or 0 stays an error (strict).
        if info.field_name != "timezone" and isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        return v

    def active(self) -> list[str]:
        """The names of the presets that are on."""
        return [] if not self.enabled else [n for n in type(self).model_fields
                                            if n not in ("enabled", "timezone") and getattr(self, n)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    database: DatabaseSettings = DatabaseSettings()
    mqtt: MqttSettings = MqttSettings()
    http: HttpSettings = HttpSettings()
    ingest: IngestSettings = IngestSettings()
    log: LogSettings = LogSettings()
    sources: list[Annotated[SourceSettings, AfterValidator(_device_ids_bounded)]] = Field(default_factory=list)
    presets: PresetSettings = PresetSettings()
    catalog: CatalogSettings = CatalogSettings()
    retention: RetentionSettings = RetentionSettings()
    quality: QualitySettings = QualitySettings()
    webhooks: list[WebhookSettings] = Field(default_factory=list, description="[[webhooks]]: where alerts go")
    rules: list[RuleSettings] = Field(default_factory=list, description="[[rules]]: threshold alert rules")
    alerts: AlertSettings = AlertSettings()
    metrics: list[QuantitySettings] = Field(default_factory=list, description="[[metrics]]: catalog quantities "
                                            "to override or add")

    def compiled_alerts(self) -> tuple[tuple[Rule, ...], dict[str, Webhook]]:
        """The rules and webhooks, compiled (secrets read from the environment)."""
        rules, hooks, problems = compile_alerts(self.rules, self.webhooks)
        assert not problems, problems  # _alerts_fit refused them at load
        return rules, hooks

    @model_validator(mode="after")
    def _alerts_fit(self) -> Settings:
        _, _, problems = compile_alerts(self.rules, self.webhooks)
        if problems:
            raise _fix_error("; ".join(p.split(" (fix: ")[0] for p in problems),
                             "; ".join(p.split(" (fix: ", 1)[1].rstrip(")") for p in problems if " (fix: " in p))
        return self

    @model_validator(mode="after")
    def _alerts_mqtt_fits(self) -> Settings:
        """alerts.mqtt: no subscription of the service may match an alert topic (it would read its own
        alerts back as readings, or as rejections)."""
        if not self.alerts.mqtt:
            return self
        from ingest.alerts.mqtt_channel import alerts_filter
        from ingest.routing import compile_template, filters_overlap

        alerts = alerts_filter(self.alerts.mqtt_prefix)
        # The configured sources, then each preset's by its name (not by identity: preset_sources()
        # builds new objects on every call).
        candidates = [(None, s) for s in self.sources] + [(name, s) for name, s in self.preset_sources()]
        for preset, s in candidates:
            subscribed = compile_template(s.topic).filter
            if subscribed == alerts or filters_overlap([subscribed, alerts]):
                what = f"preset {preset!r} (source {s.name!r})" if preset else f"source {s.name!r}"
                change = (f"switch the preset off ([presets] {preset} = false)" if preset
                          else f"narrow sources.{s.name}.topic")
                raise _fix_error(
                    f"{what} subscribes to {subscribed!r}, which matches the alert topics {alerts!r} that "
                    "alerts.mqtt publishes to: the service would read its own alerts back",
                    f'set alerts.mqtt_prefix to levels no source subscribes under (e.g. "sensor-ingest-alerts"), '
                    f"or {change}")
        return self

    def build_catalog(self) -> Catalog | None:
        """The metric catalog these settings describe (None when [catalog] enabled = false)."""
        from ingest.catalog import Catalog, GasReference

        if not self.catalog.enabled:
            return None
        return Catalog(gas=GasReference(self.catalog.reference_temperature, self.catalog.reference_pressure),
                       overrides=self.quantity_overrides())

    def quantity_overrides(self) -> list[Quantity]:
        from ingest.catalog import BUILTIN, GasReference, Quantity, in_unit

        base = {q.name: q for q in BUILTIN}
        out: list[Quantity] = []
        for m in self.metrics:
            old = base.get(m.name)
            if old is not None and m.unit is not None and m.unit != old.unit:
                moved = in_unit(old, m.unit, GasReference(self.catalog.reference_temperature,
                                                          self.catalog.reference_pressure))
                # The ranges it keeps are converted to its new unit; a unit they cannot be converted
                # to is refused by _catalog_fits unless both ranges are given.
                old = moved if not isinstance(moved, str) else replace(old, unit=m.unit)
            if old is None:
                out.append(Quantity(m.name, m.name, m.unit, m.kind or "number", m.possible, m.plausible,
                                    tuple(m.aliases), m.molar_mass, m.source or "this city's configuration"))
            else:
                out.append(Quantity(
                    old.name, old.title, m.unit or old.unit, m.kind or old.kind,
                    m.possible if m.possible is not None else old.possible,
                    m.plausible if m.plausible is not None else old.plausible,
                    (*old.aliases, *m.aliases), m.molar_mass or old.molar_mass,
                    m.source or (old.source if m.possible is None and m.plausible is None
                                 else "this city's configuration"), old.exact))
        return out

    @model_validator(mode="after")
    def _catalog_fits(self) -> Settings:
        from ingest.catalog import BUILTIN, Catalog, CatalogError, GasReference, in_unit

        names = [m.name for m in self.metrics]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise _fix_error(f"[[metrics]] names {twice[0]!r} twice", "merge the two entries into one")
        builtin = {q.name: q for q in BUILTIN}
        for m in self.metrics:
            old = builtin.get(m.name)
            if old is not None and m.unit is not None and m.unit != old.unit and (
                    m.possible is None or m.plausible is None):
                moved = in_unit(old, m.unit, GasReference(self.catalog.reference_temperature,
                                                          self.catalog.reference_pressure))
                if isinstance(moved, str):
                    raise _fix_error(
                        f"[[metrics]] {m.name!r} stores {m.name} in {m.unit!r}, and its built-in ranges (in "
                        f"{old.unit}) cannot be converted to it: {moved}",
                        f"give both possible and plausible in {m.unit}, or use a unit {old.unit} converts to")
            if m.name not in builtin and (m.kind or "number") == "number" and m.unit is None:
                raise _fix_error(f"[[metrics]] {m.name!r} is not a built-in quantity and has no unit",
                                 'give it one, e.g. unit = "m", or use a built-in name (sensor-ingest catalog)')
        try:
            Catalog(overrides=self.quantity_overrides())
        except CatalogError as exc:
            raise _fix_error(str(exc), "give each alias to one quantity only") from exc
        return self

    def preset_sources(self) -> list[tuple[str, SourceSettings]]:
        """(preset name, source) of every preset part that is on and not replaced by a configured
        source named like the preset or like the part."""
        from ingest.presets import PRESETS

        configured = {s.name for s in self.sources}
        out: list[tuple[str, SourceSettings]] = []
        for name in self.presets.active():
            if name in configured:
                continue
            for part in PRESETS[name].parts(self.presets.timezone):
                if part["name"] not in configured:
                    out.append((name, _device_ids_bounded(SourceSettings(**part))))
        return out

    def all_sources(self) -> list[SourceSettings]:
        """The configured sources, then the presets' (routing order)."""
        return [*self.sources, *(s for _, s in self.preset_sources())]

    @model_validator(mode="after")
    def _renames_fit(self) -> Settings:
        limit = self.ingest.max_metric_name_length
        for s in self.sources:
            names = [*s.rename.values(), *(m.rename for m in s.metrics.values() if m.rename is not None)]
            too_long = [n for n in names if len(n) > limit]
            if too_long:
                raise _fix_error(
                    f"source {s.name!r} renames a metric to {json.dumps(too_long[0][:40])}... of {len(too_long[0])} "
                    f"characters, longer than ingest.max_metric_name_length = {limit}: every such reading would be "
                    "refused", "shorten the name, or raise ingest.max_metric_name_length (at most 256)")
        return self

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, sources: list[SourceSettings]) -> list[SourceSettings]:
        seen: set[str] = set()
        for s in sources:
            if s.name in seen:
                raise ValueError(f"two sources are named {s.name!r}; names must be unique")
            seen.add(s.name)
        return sources

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init kwargs; the environment must win over it.
        return (_ShortEnvSource(settings_cls), env_settings, init_settings)


class _ShortEnvSource(PydanticBaseSettingsSource):
    """SENSOR_INGEST_DATABASE_URL and friends -> nested keys."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, dict[str, str]] = {}
        for env, (section, key) in ENV_SHORT_NAMES.items():
            value = os.environ.get(env)
            if value:
                out.setdefault(section, {})[key] = value
        return out


def _key_of(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] = Settings
    keyed = False  # the previous field is a table of models: this item is one of its keys
    for item in loc[:-1]:
        if isinstance(item, int) or keyed:
            keyed = False
            continue
        field = model.model_fields.get(item)
        if field is None:
            return []
        ann = field.annotation
        origin = get_origin(ann)
        inner = get_args(ann)[0] if origin is list else get_args(ann)[1] if origin is dict else ann
        keyed = origin is dict
        if get_origin(inner) is Annotated:
            inner = get_args(inner)[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            model = inner
        else:
            return []
    return list(model.model_fields)


def _problems_of(exc: ValidationError) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        key = _key_of(loc)
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1) if known else []
            fix = f"did you mean {close[0]!r}?" if close else f"known keys here: {', '.join(known)}"
            problems.append(ConfigProblem(key, "unknown key", fix))
            continue
        msg = mask_secrets(err["msg"].removeprefix("Value error, "))
        given = err.get("input")
        ctx = err.get("ctx") or {}
        if err["type"] == _FIX and "fix" in ctx:
            fix = str(ctx["fix"]) + (f"; got {mask_url(given)!r}" if isinstance(given, str) else "")
        elif err["type"] == "missing":
            fix = "add it"
        elif loc and isinstance(loc[-1], str) and is_secret_name(loc[-1]):
            fix = ""  # never echo a secret, even a malformed one
        elif isinstance(given, str):
            fix = f"got {mask_url(given)!r}"  # a URL, or anything else that may hold a password
        elif isinstance(given, int | float | bool):
            fix = f"got {given!r}"
        else:
            fix = ""
        problems.append(ConfigProblem(key, msg, fix))
    return problems


def _secrets_in_file(data: Mapping[str, Any]) -> list[ConfigProblem]:
    problems = []
    for section, key in sorted(SECRET_KEYS):
        sect = data.get(section)
        if isinstance(sect, dict) and key in sect:
            env = next(e for e, sk in ENV_SHORT_NAMES.items() if sk == (section, key))
            problems.append(
                ConfigProblem(f"{section}.{key}", "secrets are not read from files", f"set {env} in the environment")
            )
    for section in ("database", "mqtt"):
        sect = data.get(section)
        url = sect.get("url") if isinstance(sect, dict) else None
        # user:password@ or ?password= (libpq reads it there), parseable or not.
        if isinstance(url, str) and _has_password(url):
            env = f"SENSOR_INGEST_{section.upper()}"
            problems.append(
                ConfigProblem(
                    f"{section}.url",
                    f"the URL holds a password ({mask_url(url)})",
                    f"remove it from the file and set {env}_PASSWORD (or the whole URL in {env}_URL)",
                )
            )
    return problems


def _problem_of_settings_error(exc: SettingsError) -> ConfigProblem:
    """pydantic-settings could not decode a SENSOR_INGEST_<SECTION> variable as JSON."""
    found = re.search(r'field "([^"]+)"', str(exc))
    field = found.group(1) if found else ""
    env = ENV_PREFIX + (field.upper() or "<SECTION>")
    return ConfigProblem(
        field, f"{env} in the environment is not valid JSON", f"write a JSON object, or set one key as {env}__<KEY>"
    )


def load_settings(path: str | Path | None = None) -> Settings:
    """Read the file (if any) and the environment; raise ConfigError listing every problem."""
    source = str(path) if path is not None else "environment"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            problem = ConfigProblem("", f"cannot read the file: {exc.strerror}", "check the path")
            raise ConfigError(source, [problem]) from exc
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(source, [ConfigProblem("", f"not valid TOML: {exc}", "fix the syntax")]) from exc
        secret_problems = _secrets_in_file(data)
        if secret_problems:
            raise ConfigError(source, secret_problems)

    where = source if path is None else f"{source} (with SENSOR_INGEST_* environment overrides)"
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(where, _problems_of(exc)) from exc
    except SettingsError as exc:
        raise ConfigError(where, [_problem_of_settings_error(exc)]) from exc
