"""Decoder of the `json` format: flat or nested JSON objects, and arrays of them.

Naming (DESIGN.md "Decoding"): a leaf's metric is the path of keys from the root of its record, joined
with '.', keys verbatim (``{"AM2301": {"Temperature": 21.3}}`` -> ``AM2301.Temperature``); list items add
their index (``{"a": [1, 2]}`` -> ``a.0``, ``a.1``). With a {metric} capture in the topic every name is
prefixed with it (``<metric>.<path>``), and a bare scalar payload is that metric's one value.

Shapes: a top-level object is one record; a top-level array of objects is one record per item (a
gateway's batch), each with its own time_field and device_field, and names inside the record (no index).

Leaves: numbers and booleans are values; a string is what the mapping says (``SourceMapping.text``: a
value_map entry, the text of a state metric, a decimal number such as "18.83", else not a reading);
nulls, unreadable strings and ids, serials, versions and times (``NOT_READING_KEYS``) are not
readings and are counted in ``ignored``; a leaf the mapping lists by its exact name is a reading even
when its key is id-like. The time_field and device_field leaves are consumed (neither readings nor
ignored). An empty object or array gives no readings (the service records such a message as "empty").

Option ``strings_as_numbers`` (default true): whether "18.83" is a reading.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from fnmatch import translate
from functools import lru_cache
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ingest.decoders.base import DecodeContext, Decoded
from ingest.decoders.jsonutil import (
    MISSING,
    BadTime,
    NoZone,
    check_count,
    describe,
    get_path,
    load_json,
    parse_time_field,
    resolve_device,
    shorten,
)
from ingest.errors import DecodeError
from ingest.model import FLAG_RECEIVE_TIME, Reading, Rejection

__all__ = ["NOT_READING_KEYS", "NOT_READING_SUFFIXES", "Options", "decode", "is_not_reading_key"]

# A leaf whose own key (its last object key; for a list item, the key of the list), compared in lower
# case, is one of these is not a reading, even when it holds a number: an id or serial is a label, a
# version is a release, a time is when, not what was measured (the time_field, when set, is consumed
# anyway). Kept small and fixed so that the default stays predictable; measurements that merely look
# like ids (rssi, linkquality, battery, uptime) are readings. A leaf listed by its exact decoded name
# in the mapping (rename, metrics.<name>, states) is a reading all the same: the operator asked for it.
NOT_READING_KEYS: Final = frozenset({
    # ids and serials
    "id", "uid", "uuid", "guid", "serial", "serialnumber", "serial_number", "sn", "mac", "ip",
    "imei", "imsi", "iccid", "chipid", "esp8266id",  # esp8266id: Sensor.Community's node id
    # versions
    "version", "ver", "fw", "firmware", "swversion", "fwversion", "hwversion", "build",
    # times not chosen as time_field
    "time", "timestamp", "ts", "unixtime", "epoch",
})
# ...and keys ending in one of these (lower case): "sensor_id", "installed_version", "software_version".
NOT_READING_SUFFIXES: Final = ("_id", "_uuid", "_serial", "_version")
# ...and camelCase ids: "Id" or "ID" after a lower-case letter ("sensorId", "chipID"; not "PID", "liquid").
_CAMEL_ID_ENDS: Final = ("Id", "ID")

# A device id sent as a JSON number must be an integer that a float holds exactly (load_json reads
# every number as a float): beyond 2**53 the digits stored would not be the digits sent.
_MAX_EXACT_INT: Final = 2**53


class Pairs(BaseModel):
    """A list of name/value records inside the payload (Sensor.Community's ``sensordatavalues``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    key: str = Field(min_length=1, description="the key of the record that holds the list")
    name: str = Field("name", min_length=1, description="the key of each item holding the metric name")
    value: str = Field("value", min_length=1, description="the key of each item holding the value")


class Options(BaseModel):
    """The format's options (`options = {...}` of a source)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # "no" is not false

    strings_as_numbers: bool = Field(
        True,
        description='a string holding a decimal number ("18.83") is a reading; false: only JSON numbers, '
        "booleans, value_map entries and states are",
    )
    root: str | None = Field(
        None, min_length=1, description='dotted path of the object (or array of objects) that holds the readings, '
        'e.g. "params" for Shelly\'s RPC notifications; time_field and device_field are read inside it')
    only_if: dict[str, list[str | float | bool]] | None = Field(
        None, description='payload paths and the values they must have for the message to carry readings, e.g. '
        '{ method = ["NotifyStatus"] }; any other message is acknowledged and counted as skipped (not_selected)')
    time_required: bool = Field(
        True, description="false: a record without the time_field takes the receive time instead of being refused")
    naive_time: Literal["reject", "receive"] = Field(
        "reject", description='a time_field without an offset when the source has no timezone: "reject" (bad_time), '
        'or "receive": the receive time is used (flagged)')
    skip_scalars: bool = Field(
        False, description="a payload that is not a JSON object or array (a bare value, JSON or raw text), on a "
        "topic without {metric}, is acknowledged and counted as skipped (scalar), not rejected (schema, malformed)")
    allow_empty: bool = Field(
        False, description="an empty object or array is acknowledged and counted as skipped (empty_object), "
        "not rejected (empty)")
    unit_fields: dict[str, list[str]] = Field(
        default_factory=dict, description='a key of the record whose text is the unit of the metrics the globs '
        'match, e.g. { TempUnit = ["*Temperature"] } (Tasmota); the key itself is not a reading')
    pairs: Pairs | None = Field(
        None, description='a list of name/value records, e.g. { key = "sensordatavalues", name = "value_type", '
        'value = "value" }: each item is one reading named by its name')

    @field_validator("unit_fields")
    @classmethod
    def _globs(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, globs in v.items():
            if not globs or any(not g for g in globs):
                raise ValueError(f"unit_fields.{key}: list at least one non-empty metric glob")
            if "." in key:
                raise ValueError(f"unit_fields.{key}: a unit field is a key of the record itself, not a path")
        return v

    @field_validator("only_if")
    @classmethod
    def _choices(cls, v: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        for path, allowed in (v or {}).items():
            if not allowed:
                raise ValueError(f"only_if.{path}: list at least one value (an empty list skips every message)")
        return v


@lru_cache(maxsize=4096)  # bounded; keys repeat from message to message, and the test is 5x dearer than a hit
def is_not_reading_key(key: str) -> bool:
    """Whether a leaf of this own key is, by default, an id, serial, version or time (not a reading)."""
    low = key.lower()
    return (
        low in NOT_READING_KEYS
        or low.endswith(NOT_READING_SUFFIXES)
        or (key.endswith(_CAMEL_ID_ENDS) and len(key) > 2 and key[-3].islower())
    )


def decode(payload: bytes, ctx: DecodeContext) -> Decoded:
    options = ctx.options
    if options.get("skip_scalars") and payload.lstrip()[:1] not in (b"{", b"[") and not ctx.captures.get("metric"):
        # Zigbee2MQTT's attribute output publishes text raw (ON, single, a,b) as well as numbers.
        return Decoded(readings=[], skipped="scalar")
    data = load_json(payload, ctx.max_depth)
    prefix = ctx.captures.get("metric") or None
    only_if, root = options.get("only_if"), options.get("root")
    if only_if or root is not None or options.get("allow_empty") or options.get("pairs"):
        # The options of presets and of unusual makes; plain JSON sources skip all of this.
        if only_if and not _selected(data, only_if):
            return Decoded(readings=[], skipped="not_selected")
        if root is not None:
            data = get_path(data, root)
            if data is MISSING:
                raise DecodeError("schema", f"the payload has no {shorten(root)} (the source's options.root)")
        if options.get("allow_empty") and (type(data) is dict or type(data) is list) and not data:
            return Decoded(readings=[], skipped="empty_object")
        pairs = options.get("pairs")
        if pairs is not None and type(data) is dict and pairs["key"] in data:
            data = _with_pairs(data, pairs)
    if type(data) is dict:
        records: list[dict[str, Any]] = [data]
        batch = False
    elif type(data) is list:
        for i, item in enumerate(data):
            if type(item) is not dict:
                raise DecodeError("schema", f"[{i}]: expected an object (a record), got {describe(item)}; a "
                                  "top-level array must hold objects only")
        records = data
        batch = True
    elif prefix is not None:
        return _bare_value(data, prefix, ctx)
    elif options.get("skip_scalars"):
        return Decoded(readings=[], skipped="scalar")
    else:
        raise DecodeError("schema", f"expected a JSON object or an array of objects, got {describe(data)}; for "
                          'one bare value per topic use format = "value", or a {metric} capture in the topic')

    # Every record's leaves are listed (cheap) and counted before any is turned into a reading.
    base = prefix + "." if prefix is not None else ""
    flat: list[tuple[list[tuple[str, str, Any]], bool]] = []
    count = 0
    for record in records:
        leaves: list[tuple[str, str, Any]] = []
        flat.append((leaves, _flatten(record, "", "", leaves)))
        count += len(leaves)
    check_count(count, ctx, "leaves")

    mapping = ctx.mapping
    time_field, device_field = mapping.time_field, mapping.device_field
    unit_fields: dict[str, list[str]] = options.get("unit_fields") or {}
    consumed = {time_field, device_field, *unit_fields}  # None never equals a path
    time_required = options.get("time_required", True)
    has_rules = bool(mapping.rules)
    numbers = bool(options.get("strings_as_numbers", True))
    received = ctx.received_at.astimezone(UTC)
    readings: list[Reading] = []
    problems: list[Rejection] = []
    ignored = 0
    for i, (record, (leaves, dotted)) in enumerate(zip(records, flat, strict=True)):
        who = f"record [{i}]" if batch else "payload"
        device = _device(record, device_field, who, ctx)
        units = _units_of(record, unit_fields) if unit_fields else None
        if time_field is None or (not time_required and get_path(record, time_field) is MISSING):
            when, flags = received, FLAG_RECEIVE_TIME
        else:
            found = _time(record, time_field, who, ctx)
            if isinstance(found, str):
                if not batch:
                    raise DecodeError("bad_time", found)
                problems.append(Rejection("bad_time", found, device))
                continue
            when, flags = (received, FLAG_RECEIVE_TIME) if found is None else (found, 0)

        start = len(readings)
        for path, key, raw in leaves:
            if path in consumed:
                continue  # consumed: the record's time and device, not readings
            metric = base + path if base else path
            if not metric:  # {"": 1}: the one leaf whose path is empty; a name is needed to store it
                problems.append(Rejection("bad_metric", f"{who}: the value of the empty key \"\" has no name; "
                                          "rename the key in the publisher", device))
                continue
            if raw is None or (has_rules and mapping.ignored(metric)):
                ignored += 1
                continue
            if is_not_reading_key(key) and not (has_rules and _listed(metric, ctx)):
                ignored += 1
                continue
            value: float | bool | str | None
            if type(raw) is str:
                value = mapping.text(metric, raw, numbers=numbers)
                if value is None:
                    if has_rules and mapping.expects_number(metric):
                        problems.append(mapping.wrong_type(metric, raw, device))
                    else:
                        ignored += 1
                    continue
            else:
                value = raw
            unit = None
            if units:
                for pattern, text in units:
                    if pattern.match(metric):
                        unit = text
                        break
            readings.append(Reading(device=device, metric=metric, time=when, value=value, unit=unit, flags=flags))
        if dotted:
            problems += _drop_repeated_names(readings, start, who)
    return Decoded(readings=readings, problems=problems, ignored=ignored)


def _selected(data: Any, only_if: dict[str, list[Any]]) -> bool:
    """Whether the payload has, at every path of ``only_if``, one of the values listed for it."""
    for path, allowed in only_if.items():
        found = get_path(data, path)
        if found is MISSING or type(found) in (dict, list):
            return False
        # true is not 1 (Python's True == 1.0): a value matches one of its own kind.
        if not any(found == a and (type(found) is bool) == (type(a) is bool) for a in allowed):
            return False
    return True


def _with_pairs(record: dict[str, Any], pairs: dict[str, str]) -> dict[str, Any]:
    """The record with its list of name/value items turned into keys (``{"value_type": "SDS_P1",
    "value": "5.53"}`` -> ``"SDS_P1": "5.53"``). An item without a usable name, or whose name is
    taken (a second item of that name, a key of the record), stays where it was, under the list's
    key and its own index (``sensordatavalues.3.value``), so that its leaves are still seen."""
    items = record[pairs["key"]]
    if type(items) is not list:
        return record
    out = {k: v for k, v in record.items() if k != pairs["key"]}
    rest: dict[str, Any] = {}
    name_key, value_key = pairs["name"], pairs["value"]
    for index, item in enumerate(items):
        name = item.get(name_key) if type(item) is dict else None
        if type(name) is str and name and name not in out and value_key in item:
            out[name] = item[value_key]
        else:
            rest[str(index)] = item
    if rest:
        out[pairs["key"]] = rest
    return out


@lru_cache(maxsize=256)
def _unit_pattern(glob: str) -> re.Pattern[str]:
    return re.compile(translate(glob))


def _units_of(record: dict[str, Any], unit_fields: dict[str, list[str]]) -> list[tuple[re.Pattern[str], str]]:
    """(metric pattern, unit) for every unit field the record holds as a non-empty string."""
    found: list[tuple[re.Pattern[str], str]] = []
    for key, globs in unit_fields.items():
        text = record.get(key)
        if type(text) is str and text.strip():
            found += [(_unit_pattern(g), text.strip()) for g in globs]
    return found


def _flatten(node: dict[str, Any] | list[Any], base: str, owner: str, out: list[tuple[str, str, Any]]) -> bool:
    """Append (path, own key, value) for every scalar leaf under ``node``, in document order; True when
    a key holds '.' (then two leaves may spell one name).

    ``base`` is the path so far with its trailing '.' ('' at the root); ``owner`` is the key of the nearest
    object member, which is a list item's own key for the id check. Empty objects and lists add nothing.
    Recursion is bounded: load_json refused anything deeper than ctx.max_depth.
    """
    dotted = False
    if type(node) is dict:
        for key, value in node.items():
            if "." in key:
                dotted = True
            kind = type(value)
            if kind is dict or kind is list:
                if value:
                    dotted = _flatten(value, base + key + ".", key, out) or dotted
            else:
                out.append((base + key, key, value))
    else:
        for index, value in enumerate(node):
            kind = type(value)
            if kind is dict or kind is list:
                if value:
                    dotted = _flatten(value, f"{base}{index}.", owner, out) or dotted
            else:
                out.append((f"{base}{index}", owner, value))
    return dotted


def _listed(metric: str, ctx: DecodeContext) -> bool:
    """Whether the mapping names this metric exactly (a glob meant for values does not turn ids into
    readings). Asked only for id-like keys, so the scan of the rules stays off the common path."""
    return ctx.mapping.listed(metric)


def _device(record: dict[str, Any], device_field: str | None, who: str, ctx: DecodeContext) -> str:
    """The record's device: its device_field (checked against the topic's {device}), else the topic's."""
    if device_field is None:
        return resolve_device(None, ctx, who)
    raw = get_path(record, device_field)
    if raw is MISSING:
        return resolve_device(None, ctx, f"{who} (it has no device_field {device_field!r})")
    field = f"{who}, device_field {device_field!r}"
    if type(raw) is str:
        if not raw:
            raise DecodeError("schema", f"{field}: the device id is empty")
        return resolve_device(raw, ctx, field)
    if type(raw) is float and math.isfinite(raw) and raw.is_integer():
        if abs(raw) > _MAX_EXACT_INT:
            raise DecodeError("schema", f"{field}: the number {raw:.0f} is too large to be read exactly; send "
                              "the device id as a string")
        return resolve_device(str(int(raw)), ctx, field)  # esp8266id 13463000 -> "13463000", not "13463000.0"
    raise DecodeError("schema", f"{field}: expected a device id (a string or an integer), got {describe(raw)}")


def _time(record: dict[str, Any], time_field: str, who: str, ctx: DecodeContext) -> datetime | str | None:
    """The record's time, or why it has none (a bad_time detail naming the path and the fix), or None
    for the receive time (a local time and no zone, with option naive_time = "receive")."""
    raw = get_path(record, time_field)
    if raw is MISSING:
        return (f"{who} has no time_field {time_field!r}; set time_field to the path of the payload's time, "
                "or remove it to use the receive time")
    try:
        return parse_time_field(raw, ctx.timezone)
    except NoZone as exc:
        if ctx.options.get("naive_time") == "receive":
            return None
        return f"{who}, time_field {time_field!r}: {exc.detail}"
    except BadTime as exc:
        return f"{who}, time_field {time_field!r}: {exc.detail}"


def _drop_repeated_names(readings: list[Reading], start: int, who: str) -> list[Rejection]:
    """Keep the first of two leaves of one record that spell the same name, and report the later.

    Only a key holding '.' can do it ({"a.b": 1, "a": {"b": 2}}): one (device, metric, time) holds one
    value, and the store's unique key would silently keep just one of them.
    """
    seen: set[str] = set()
    kept: list[Reading] = []
    problems: list[Rejection] = []
    for r in readings[start:]:
        if r.metric in seen:
            problems.append(Rejection("schema", f"{who}: two leaves spell the name {shorten(r.metric)} (a key "
                                      "holding '.'); the later one is not stored", r.device))
        else:
            seen.add(r.metric)
            kept.append(r)
    readings[start:] = kept
    return problems


def _bare_value(raw: object, metric: str, ctx: DecodeContext) -> Decoded:
    """A scalar payload on a topic with a {metric} capture: that metric's one value."""
    mapping = ctx.mapping
    device = _device({}, mapping.device_field, "payload", ctx)
    if mapping.time_field is not None:
        raise DecodeError("bad_time", f"payload has no time_field {mapping.time_field!r}: it is {describe(raw)}, "
                          "not an object; remove time_field from the source to use the receive time")
    has_rules = bool(mapping.rules)
    if raw is None or (has_rules and mapping.ignored(metric)):
        return Decoded(readings=[], ignored=1)
    if is_not_reading_key(metric.rpartition(".")[2]) and not (has_rules and _listed(metric, ctx)):
        return Decoded(readings=[], ignored=1)
    value: float | bool | str | None
    if isinstance(raw, str):
        value = mapping.text(metric, raw, numbers=bool(ctx.options.get("strings_as_numbers", True)))
        if value is None:
            if mapping.expects_number(metric):
                raise DecodeError("wrong_type", mapping.wrong_type(metric, raw, None).detail)
            return Decoded(readings=[], ignored=1)
    elif isinstance(raw, float | bool):
        value = raw
    else:  # load_json gives no other scalar; kept so that the type is narrowed without assert
        raise DecodeError("schema", f"expected a number, boolean or string, got {describe(raw)}")
    when = ctx.received_at.astimezone(UTC)
    return Decoded(readings=[Reading(device=device, metric=metric, time=when, value=value, flags=FLAG_RECEIVE_TIME)])
