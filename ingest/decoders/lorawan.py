"""Decoder of the `lorawan` format: uplinks of LoRaWAN network servers, as their MQTT integrations
publish them, decoded by the server's payload codec.

Two envelopes, told apart by shape:

- The Things Stack v3 (`ApplicationUp`): ``end_device_ids`` with ``uplink_message``; the readings are
  the leaves of ``uplink_message.decoded_payload``; the time is the envelope's ``received_at``.
- ChirpStack v4 (`UplinkEvent` in its JSON mapping): ``deviceInfo`` with ``fCnt`` / ``data`` /
  ``object`` ...; the readings are the leaves of ``object``; the time is ``time``.

A metric is the leaf's path inside the decoded payload, keys verbatim and joined with '.', list items
by index (``{"a": [1, 2]}`` gives ``a.0`` and ``a.1``). Numbers and booleans are readings; a string
is what the source's mapping makes of it (``SourceMapping.text``), else ignored; nulls and empty
containers are ignored. The decoded payload carries no units, so readings have none.

Messages that by design carry no readings are skipped (counted, acknowledged, not rejected): other
The Things Stack messages (join_accept, downlink_*, service_data, location_solved, ...), ChirpStack
events other than ``up`` (join, status, ack, txack, log, location, integration), and uplinks the
server did not decode (no codec configured, or the codec failed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ingest.decoders.base import DecodeContext, Decoded
from ingest.decoders.json import is_not_reading_key
from ingest.decoders.jsonutil import (
    BadTime,
    check_count,
    describe,
    is_number,
    load_json,
    parse_time,
    resolve_device,
    shorten,
)
from ingest.errors import DecodeError
from ingest.model import FLAG_RECEIVE_TIME, Reading, Rejection

__all__ = ["SKIP_NOT_AN_UPLINK", "SKIP_NO_DECODED_PAYLOAD", "Options", "decode"]

SKIP_NOT_AN_UPLINK: Final = "lorawan_not_an_uplink"
SKIP_NO_DECODED_PAYLOAD: Final = "lorawan_no_decoded_payload"

RSSI_METRIC, RSSI_UNIT = "rssi", "dBm"
SNR_METRIC, SNR_UNIT = "snr", "dB"

# Top-level keys that only ChirpStack v4 events other than `up` have (integration.proto). The
# integration event carries an `object` too, so these are looked at before the uplink's own keys.
_CHIRPSTACK_OTHER_EVENT_KEYS: Final = frozenset({
    "integrationName", "eventType",  # integration
    "queueItemId", "acknowledged", "fCntDown",  # ack, txack
    "downlinkId", "gatewayId",  # txack
    "level", "code", "description",  # log
    "margin", "batteryLevel", "externalPowerSource", "batteryLevelUnavailable",  # status
    "location",  # location
})
# Keys of an UplinkEvent that no other event has. The JSON mapping may leave out a field at its
# default (the docs' `up` example has no fCnt), so any one of them marks an uplink.
_CHIRPSTACK_UPLINK_KEYS: Final = frozenset({"fCnt", "fPort", "data", "object", "rxInfo", "dr", "adr", "confirmed"})

# Envelopes this decoder does not read, recognised only to say so in the rejection.
_OTHER_ENVELOPES: Final = (
    ("devEUI", "ChirpStack v3 JSON (devEUI, applicationID); configure ChirpStack v4 or its JSON marshaler"),
    ("payload_fields", "The Things Network v2 JSON (dev_id, payload_fields); The Things Stack v3 is read"),
)

# RFC 3339 allows any number of fractional digits; both servers send nanoseconds and fromisoformat
# reads at most microseconds. The extra digits are dropped (truncation, never rounding up a second).
_SUB_MICROSECONDS = re.compile(r"(:\d\d\.\d{6})\d+")
# A protobuf Timestamp left unset is rendered as year 1 (The Things Stack storage examples show it
# in uplink_message.received_at of simulated uplinks): that is "no time", not a time.
_UNSET_TIME: Final = datetime(1, 1, 1, tzinfo=UTC)


class Options(BaseModel):
    """The format's options (`options = {...}` of a source).

    device: which identifier of the envelope is the device id.
            "auto" (default): the one each server puts in its MQTT topic, so that a template's
            {device} capture can check it: The Things Stack `end_device_ids.device_id` (topic
            v3/{app}@{tenant}/devices/{device_id}/up), ChirpStack `deviceInfo.devEui` (topic
            application/{app}/device/{dev_eui}/event/up).
            "dev_eui": the DevEUI on both, verbatim (The Things Stack `end_device_ids.dev_eui`, which it
            writes in upper case; ChirpStack `deviceInfo.devEui`, lower case). The Things Stack's
            topic still carries the device id: a {device} capture is checked against
            `end_device_ids.device_id`, and the readings are stored under the DevEUI.
    radio:  also store the received signal of the best gateway (the highest RSSI) as metrics `rssi`
            (dBm) and `snr` (dB, of that same gateway): The Things Stack `rx_metadata[].rssi` (or
            `channel_rssi`) and `snr`, ChirpStack `rxInfo[].rssi` and `snr`. Default off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # "no" is not false

    device: Literal["auto", "dev_eui"] = "auto"
    radio: bool = False


@dataclass(frozen=True, slots=True)
class _Uplink:
    """One uplink's envelope, read into the fields this decoder uses (each with its path, for details)."""

    decoded: dict[str, Any]
    decoded_path: str
    device: object  # the id stored
    device_path: str
    topic_id: object  # the id the server puts in its topic, which a {device} capture is checked against
    topic_id_path: str
    time: object
    time_path: str
    gateways: object
    gateways_path: str
    rssi_keys: tuple[str, ...]  # where a gateway's RSSI is, first found wins


def decode(payload: bytes, ctx: DecodeContext) -> Decoded:
    options = _options(ctx)
    data = load_json(payload, ctx.max_depth)
    if not isinstance(data, dict):
        raise DecodeError("schema", f"expected a LoRaWAN uplink (a JSON object), got {describe(data)}")
    if "end_device_ids" in data:
        uplink = _the_things_stack(data, options)
    elif "deviceInfo" in data:
        uplink = _chirpstack(data, options)
    else:
        raise DecodeError("schema", _neither_envelope(data))
    if isinstance(uplink, str):
        return Decoded(readings=[], skipped=uplink)

    # Checked only for messages that carry readings: a skipped message stores nothing for anyone.
    device = _device(uplink, ctx)
    when, flags = _server_time(uplink.time, uplink.time_path, ctx)
    leaves = list(_leaves(uplink.decoded))
    check_count(len(leaves) + (2 if options.radio else 0), ctx)

    readings: list[Reading] = []
    problems: list[Rejection] = []
    ignored = 0
    seen: set[str] = set()  # every leaf's name, stored or not, so that a duplicate is always reported
    for metric, value in leaves:
        if not metric:
            problems.append(Rejection("bad_metric", f"{uplink.decoded_path}: a key \"\" names no metric", device))
            continue
        if metric in seen:
            # A key holding a '.' can spell the same path as nested keys; the first one is kept.
            problems.append(Rejection("schema", f"{uplink.decoded_path}.{metric}: a second leaf named "
                                      f"{shorten(metric)}", device))
            continue
        seen.add(metric)
        reading_value = _value(metric, value, ctx)
        if reading_value is None:
            if isinstance(value, str) and ctx.mapping.expects_number(metric):
                problems.append(ctx.mapping.wrong_type(metric, value, device))
            else:
                ignored += 1
            continue
        readings.append(Reading(device=device, metric=metric, time=when, value=reading_value, flags=flags))
    if options.radio:
        radio, radio_problems = _radio(uplink, device, when, {r.metric for r in readings})
        if flags:
            radio = [replace(r, flags=flags) for r in radio]
        readings += radio
        problems += radio_problems
    return Decoded(readings=readings, problems=problems, ignored=ignored)


_OPTION_NAMES = frozenset(Options.model_fields)


def _options(ctx: DecodeContext) -> Options:
    try:
        # Validated when the config was loaded: only a hand-built context needs the check again.
        if isinstance(ctx.options, dict) and set(ctx.options) == _OPTION_NAMES:
            return Options.model_construct(**ctx.options)
        return Options.model_validate(dict(ctx.options))
    except ValidationError as exc:
        # Validated at start-up; reaching here means a context built around that check.
        raise DecodeError("unsupported", f"lorawan options {dict(ctx.options)!r} are not valid: "
                          f"{exc.errors(include_url=False)[0]['msg']}") from exc


def _the_things_stack(data: dict[str, Any], options: Options) -> _Uplink | str:
    ids = data["end_device_ids"]
    if not isinstance(ids, dict):
        raise DecodeError("schema", f"end_device_ids: expected an object, got {describe(ids)}")
    if "uplink_message" not in data:
        return SKIP_NOT_AN_UPLINK
    message = data["uplink_message"]
    if not isinstance(message, dict):
        raise DecodeError("schema", f"uplink_message: expected an object, got {describe(message)}")
    decoded = _decoded(message.get("decoded_payload"), "uplink_message.decoded_payload")
    if decoded is None:
        return SKIP_NO_DECODED_PAYLOAD
    key = "device_id" if options.device == "auto" else "dev_eui"
    # The envelope's received_at (Application Server), not uplink_message.received_at (Network
    # Server): the AS sets it on every message, simulated uplinks included, whose NS time is unset.
    return _Uplink(decoded, "uplink_message.decoded_payload", ids.get(key), f"end_device_ids.{key}",
                   ids.get("device_id"), "end_device_ids.device_id", data.get("received_at"), "received_at",
                   message.get("rx_metadata"), "uplink_message.rx_metadata", ("rssi", "channel_rssi"))


def _chirpstack(data: dict[str, Any], options: Options) -> _Uplink | str:
    info = data["deviceInfo"]
    if not isinstance(info, dict):
        raise DecodeError("schema", f"deviceInfo: expected an object, got {describe(info)}")
    if not _CHIRPSTACK_OTHER_EVENT_KEYS.isdisjoint(data) or _CHIRPSTACK_UPLINK_KEYS.isdisjoint(data):
        return SKIP_NOT_AN_UPLINK
    decoded = _decoded(data.get("object"), "object")
    if decoded is None:
        return SKIP_NO_DECODED_PAYLOAD
    # Both options name devEui: it is also what the MQTT integration puts in the topic.
    return _Uplink(decoded, "object", info.get("devEui"), "deviceInfo.devEui", info.get("devEui"),
                   "deviceInfo.devEui", data.get("time"), "time", data.get("rxInfo"), "rxInfo", ("rssi",))


def _decoded(value: object, path: str) -> dict[str, Any] | None:
    """The decoded payload, or None when the server sent none (an empty one is sent as none)."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise DecodeError("schema", f"{path}: expected an object (the codec's output), got {describe(value)}")
    return value


def _neither_envelope(data: dict[str, Any]) -> str:
    for key, what in _OTHER_ENVELOPES:
        if key in data:
            return f"this looks like {what}"
    return ("expected a The Things Stack v3 uplink (end_device_ids, uplink_message) or a ChirpStack v4 event "
            "(deviceInfo); found neither")


def _device(uplink: _Uplink, ctx: DecodeContext) -> str:
    named = _id(uplink.device, uplink.device_path)
    if ctx.device is not None and uplink.topic_id_path != uplink.device_path:
        # The topic names the device by another id than the one stored (The Things Stack's device_id,
        # with device = "dev_eui"): the capture is checked against that one, like with like.
        resolve_device(_id(uplink.topic_id, uplink.topic_id_path), ctx, uplink.topic_id_path)
        return named
    return resolve_device(named, ctx, uplink.device_path)


def _id(value: object, path: str) -> str:
    # No fallback to the topic's device: with device = "dev_eui" it is another kind of id.
    if value is None or value == "":
        raise DecodeError("no_device", f"{path}: missing; the uplink names no device")
    if not isinstance(value, str):
        raise DecodeError("schema", f"{path}: expected a string, got {describe(value)}")
    return value


def _server_time(raw: object, path: str, ctx: DecodeContext) -> tuple[datetime, int]:
    if raw is None:
        # Both servers always set it; an uplink relayed without it gets the receive time, flagged,
        # as every payload without a time does (DESIGN.md "Decoding").
        return ctx.received_at.astimezone(UTC), FLAG_RECEIVE_TIME
    if not isinstance(raw, str):
        raise DecodeError("bad_time", f"{path}: expected an RFC 3339 time, got {describe(raw)}")
    try:
        when = parse_time(_SUB_MICROSECONDS.sub(r"\1", raw, count=1), ctx.timezone)
    except BadTime as exc:
        raise DecodeError("bad_time", f"{path}: {exc.detail}") from exc
    if when == _UNSET_TIME:
        raise DecodeError("bad_time", f"{path}: {shorten(raw)} is the unset (zero) timestamp")
    return when, 0


def _leaves(root: dict[str, Any]) -> Iterator[tuple[str, object]]:
    """(metric, value) of every leaf in document order; an empty object or array is a leaf.

    Iterative, so that the walk never meets the recursion limit, whatever ingest.max_json_depth is.
    """
    stack: list[tuple[str | None, Iterator[tuple[str, Any]]]] = [(None, iter(root.items()))]
    while stack:
        prefix, items = stack[-1]
        step = next(items, None)
        if step is None:
            stack.pop()
            continue
        key, value = step
        name = key if prefix is None else f"{prefix}.{key}"
        if isinstance(value, dict) and value:
            stack.append((name, iter(value.items())))
        elif isinstance(value, list) and value:
            stack.append((name, ((str(i), item) for i, item in enumerate(value))))
        else:
            yield name, value


def _value(metric: str, value: object, ctx: DecodeContext) -> float | bool | str | None:
    """The reading's value, or None when the leaf is not a reading (ignored by the mapping; an id,
    serial, version or time by its own key, as in the json format, unless the mapping lists it)."""
    if ctx.mapping.ignored(metric):
        return None
    own = metric.rpartition(".")[2]
    if own.isdigit():  # a list item: the list's key is its own
        own = metric.rpartition(".")[0].rpartition(".")[2]
    if is_not_reading_key(own) and not ctx.mapping.listed(metric):
        return None
    if isinstance(value, bool):
        return value
    if is_number(value):
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, str):
        return ctx.mapping.text(metric, value)
    return None  # null, {} or []


def _radio(uplink: _Uplink, device: str, when: datetime, taken: set[str]) -> tuple[list[Reading], list[Rejection]]:
    """rssi and snr of the gateway that heard the uplink best, and what had to be skipped to find it."""
    path = uplink.gateways_path
    if uplink.gateways is None:
        return [], []
    if not isinstance(uplink.gateways, list):
        return [], [Rejection("schema", f"{path}: expected an array, got {describe(uplink.gateways)}", device)]
    problems: list[Rejection] = []
    best: tuple[float, dict[str, Any]] | None = None
    for i, gateway in enumerate(uplink.gateways):
        if not isinstance(gateway, dict):
            problems.append(Rejection("schema", f"{path}[{i}]: expected an object, got {describe(gateway)}", device))
            continue
        key = next((k for k in uplink.rssi_keys if k in gateway), None)
        if key is None:
            continue
        rssi = gateway[key]
        if not _finite(rssi):
            problems.append(Rejection("schema", f"{path}[{i}].{key}: expected a number, got {describe(rssi)}", device))
            continue
        if best is None or float(rssi) > best[0]:
            best = (float(rssi), gateway)
    if best is None:
        return [], problems
    rssi_value, gateway = best
    readings = [Reading(device=device, metric=RSSI_METRIC, time=when, value=rssi_value, unit=RSSI_UNIT)]
    snr = gateway.get("snr")
    if snr is not None:  # The Things Stack leaves out an SNR of 0 like every zero; it is not guessed back
        if _finite(snr):
            readings.append(Reading(device=device, metric=SNR_METRIC, time=when, value=float(snr), unit=SNR_UNIT))
        else:
            problems.append(Rejection("schema", f"{path}: snr of the best gateway: expected a number, got "
                                      f"{describe(snr)}", device))
    kept = []
    for reading in readings:
        if reading.metric in taken:
            problems.append(Rejection("schema", f"{path}: the decoded payload has its own {reading.metric!r}; the "
                                      "radio one is not stored", device))
        else:
            kept.append(reading)
    return kept, problems


def _finite(value: object) -> bool:
    return is_number(value) and math.isfinite(value)  # type: ignore[arg-type]
