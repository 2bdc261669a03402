"""Decoder of the `value` format: one value per topic (ESPHome, Shelly Gen1, Homie, Tasmota stat/<topic>/POWER).

The payload is UTF-8 text with its surrounding whitespace stripped; a JSON string ("\\"21.5\\"") is read as
its content. The text is then, first match wins:

1. a word of the mapping's value_map (the metric's own, else the source's): that number or boolean;
2. the text itself when the mapping says the metric is a state (``states``, ``metrics.<m>.state``);
3. a plain decimal number ("21.5", "-59", "1e3"): a float. "nan" and "inf" are not numbers;
4. true / false, ON / OFF, any case: a boolean;
5. with ``options = { text = true }``, any other text: a text state;
6. else the message is refused (wrong_type), with the three ways to fix it in the detail.

The mapping comes first so that it can override every default reading: value_map {"ON" = 2} wins over
the boolean, a state keeps "ON" or "21.5" as text. An empty payload is refused (empty): it clears a
retained topic and is no reading. A JSON object or array is refused (schema): that payload needs the
json format.

Device and metric (DESIGN.md "Decoding"): the device is the topic's {device} capture. The metric is the
{metric} capture; else the topic's levels after the device's level joined with '.', without empty
levels and without a final "state" level (ESPHome's ``<node>/sensor/<name>/state`` -> "sensor.<name>"),
and "value" when nothing is left. The device's level is the one its template captured
(``ctx.device_level``); without one (a decode with no template) it is the first level equal to the
device, so a literal level before it that spells the device (``shellies/shellies/relay/0``) is
taken for it there. Time: the receive time (FLAG_RECEIVE_TIME), as a bare value
carries none; unit: none (the mapping may set one).
"""

from __future__ import annotations

import json
import math
from datetime import UTC
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from ingest.decoders.base import DecodeContext, Decoded
from ingest.decoders.jsonutil import load_json, shorten
from ingest.decoders.mapping import number_of_text
from ingest.errors import DecodeError
from ingest.model import FLAG_RECEIVE_TIME, Reading

__all__ = ["METRIC_OF_BARE_TOPIC", "Options", "decode"]

METRIC_OF_BARE_TOPIC: Final = "value"  # metric of a topic with no level after the device
_STATE_LEVEL: Final = "state"  # ESPHome's last level of every state topic
_STATE_SUFFIX: Final = "/" + _STATE_LEVEL
_WORDS: Final = {"true": True, "false": False, "on": True, "off": False}
_LONGEST_WORD: Final = max(map(len, _WORDS))
_LONGEST_HINT: Final = 80  # longer metric names and words are not quoted whole in a detail


class Options(BaseModel):
    """The format's options (`options = {...}` of a source)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # "no" is not false

    state_level: bool = Field(
        True, description='a final "state" level is not part of the metric (ESPHome\'s <node>/sensor/<name>/state); '
        'false: it is (Homie, where the last level is the property)')
    allow_empty: bool = Field(
        False, description="an empty payload (a cleared retained topic; Homie 5's 0x00 empty string) is acknowledged "
        "and counted as skipped (empty), not rejected")
    text: bool = Field(
        False,
        description="every text that is not a value_map word, a number, true/false or ON/OFF is a text state "
        "(stored in `states`); without it such a payload is refused (wrong_type)",
    )


def decode(payload: bytes, ctx: DecodeContext) -> Decoded:
    device = ctx.device if ctx.device is not None else ctx.fallback_device
    metric = _metric(ctx, device) if device else None
    if metric is not None and ctx.mapping.ignored(metric):
        # Checked before the payload is read: an ignored topic (Homie's $-attributes, Shelly's JSON
        # announce) may carry anything, and its payload must not turn into a rejection.
        return Decoded(readings=[], ignored=1)
    if ctx.options.get("allow_empty") and (not payload.strip() or payload == b"\x00"):
        return Decoded(readings=[], skipped="empty")
    text = _text(payload, ctx.max_depth)
    if not device or metric is None:
        # After the payload checks, so that a too deep payload is too_deep whatever the context.
        raise DecodeError(
            "no_device",
            "the value format takes the device from the topic, and the topic template has no {device} "
            'capture; capture the device level, e.g. topic = "shellies/{device}/#"',
        )
    value = _value(text, metric, ctx)
    received = ctx.received_at
    if received.tzinfo is not UTC:
        received = received.astimezone(UTC)
    return Decoded([Reading(device, metric, received, value, None, FLAG_RECEIVE_TIME)], [], 0, None)


def _metric(ctx: DecodeContext, device: str) -> str:
    named = ctx.captures.get("metric")
    if named:
        return named
    # String searches instead of split/index/join: this runs once per message on the hot path.
    topic = ctx.topic
    if ctx.device_level is not None:  # the template says which level the device is
        rest = "/".join(topic.split("/")[ctx.device_level + 1 :])
    elif topic.startswith(device + "/"):
        rest = topic[len(device) + 1 :]
    else:
        inner = "/" + device + "/"
        at = topic.find(inner)
        # No later level spells the device (or it is the last one, or not in the topic): nothing after it.
        rest = topic[at + len(inner) :] if at >= 0 else ""
    if rest and ("//" in rest or rest[0] == "/" or rest[-1] == "/"):
        rest = "/".join(level for level in rest.split("/") if level)
    if ctx.options.get("state_level", True):
        if rest == _STATE_LEVEL:
            return METRIC_OF_BARE_TOPIC
        if rest.endswith(_STATE_SUFFIX):
            rest = rest[: -len(_STATE_SUFFIX)]
    return rest.replace("/", ".") or METRIC_OF_BARE_TOPIC


def _text(payload: bytes, max_depth: int) -> str:
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DecodeError("malformed", f"not UTF-8: {exc.reason} at byte {exc.start}") from exc
    if not text:
        raise DecodeError("empty", "the payload is empty: an empty message clears a retained topic, it is no reading")
    first = text[0]
    if first in "[{":
        try:
            load_json(payload, max_depth)  # too_deep is raised here, before any parse
        except DecodeError as exc:
            if exc.reason != "malformed":
                raise
            return text  # not JSON after all ("[ok]"): plain text
        kind = "an object" if first == "{" else "an array"
        raise DecodeError(
            "schema",
            f"the payload is JSON {kind}, not one value; a topic that carries JSON needs "
            'format = "json" (or, if it holds no reading, ignore = ["<its metric>"])',
        )
    if first == '"' and len(text) > 1 and text[-1] == '"':
        try:
            inner = json.loads(text)
        except ValueError:
            return text  # quotes that do not make a JSON string are part of the text
        if isinstance(inner, str):
            text = inner.strip()
            if not text:
                raise DecodeError("empty", "the payload is an empty JSON string: it is no reading")
    return text


def _value(text: str, metric: str, ctx: DecodeContext) -> float | bool | str:
    mapping = ctx.mapping
    if not mapping.empty:
        mapped = mapping.text(metric, text, numbers=False)
        if mapped is not None:
            return mapped
    number = number_of_text(text)
    if number is not None:
        return number
    if len(text) <= _LONGEST_WORD:
        word = _WORDS.get(text.lower())
        if word is not None:
            return word
    if _not_finite(text):
        # A sensor that failed to measure (ESPHome publishes "nan"): the same reason as a JSON NaN,
        # text option or not (a NaN kept as text would sit as a state in a numeric series).
        raise DecodeError("not_finite", _wrong_type(text, metric))
    if ctx.options.get("text", False):
        return text
    raise DecodeError("wrong_type", _wrong_type(text, metric))


def _not_finite(text: str) -> bool:
    """NaN, an infinity, or a decimal number too large for a float (1e999)."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _wrong_type(text: str, metric: str) -> str:
    # The metric is cut for the words, and pasted whole into the fix (a TOML basic string) when it is
    # short enough to be a stored name at all.
    name = json.dumps(metric) if len(metric) <= _LONGEST_HINT else '"<metric>"'
    word = json.dumps(text) if len(text) <= _LONGEST_HINT else '"<word>"'
    label = metric if len(metric) <= _LONGEST_HINT else metric[:_LONGEST_HINT] + "…"
    if _not_finite(text):
        what = f"{label}: {shorten(text)} is not a finite number (NaN and infinities are no readings)"
    else:
        what = f"{label}: {shorten(text)} is not a number (plain decimal, finite), true/false or ON/OFF"
    return (
        f"{what}; if it is text, list the metric as a state (states = [{name}]), map its words to values "
        f"(value_map = {{ {word} = 1 }}), or read every text of this source as a state "
        "(options = { text = true })"
    )
