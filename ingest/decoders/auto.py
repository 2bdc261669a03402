"""The `auto` format: tells the family from the payload itself, then decodes it as that family.

For a source that receives several makes on one topic tree, and for `sensor-ingest decode` when no
source matches. The payload is looked at in this order, first match wins:

1. a JSON array whose first item is an object with a SenML key (bn, bt, bu, n, u, v, vs, vb, vd, s, t,
   ut) -> ``senml``; an array of objects with "readings" -> ``native``; any other array -> ``json``;
2. a JSON object with "end_device_ids" (The Things Stack v3) or "deviceInfo" (ChirpStack v4) ->
   ``lorawan``; with "sensordatavalues" (Sensor.Community / airrohr) -> ``json`` reading that list
   as name/value pairs; with "readings" holding an object or an array -> ``native``; else ``json``;
3. text whose first point line looks like line protocol (``measurement[,tags] field=value``) -> ``line``;
4. anything else (a number, ON/OFF, a JSON scalar, text) -> ``value``.

Each family is decoded with its default options (the source's mapping applies as usual); the
payload is parsed once more by the family's decoder, which is why a source that knows its format
should name it. The options of ``auto`` itself: none.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Final

from ingest.decoders import json as json_format
from ingest.decoders import line, lorawan, native, senml, value
from ingest.decoders.base import DecodeContext, Decoded, Decoder
from ingest.decoders.jsonutil import load_json

__all__ = ["decode", "detect"]

_SENML_KEYS: Final = frozenset({"bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut"})
# measurement (escaped commas and spaces allowed), optional tags, a space, then a field key and '='.
_LINE: Final = re.compile(r"(?:[^\s,\\]|\\.)(?:[^\s,\\]|\\.)*(?:,\S*)? +(?:[^\s=\\]|\\.)+=\S")
_AIRROHR: Final = json_format.Options(
    pairs=json_format.Pairs(key="sensordatavalues", name="value_type", value="value")).model_dump()

_FAMILIES: Final[dict[str, tuple[Decoder, dict[str, Any]]]] = {
    "senml": (senml.decode, {}),
    "native": (native.decode, {}),
    "json": (json_format.decode, json_format.Options().model_dump()),
    "airrohr": (json_format.decode, _AIRROHR),
    "lorawan": (lorawan.decode, lorawan.Options().model_dump()),
    "line": (line.decode, line.Options().model_dump()),
    "value": (value.decode, value.Options(text=True).model_dump()),
}


def detect(payload: bytes, max_depth: int = 32) -> str:
    """The family of ``payload``: senml, native, json, airrohr (json with pairs), lorawan, line or value.

    A JSON payload that cannot be read (malformed, too deep) raises its DecodeError here.
    """
    head = payload[:1] if payload[:1] not in b" \t\r\n" else payload.lstrip()[:1]
    if head in (b"{", b"["):
        data = load_json(payload, max_depth)
        if type(data) is list:
            first = data[0] if data else None
            if type(first) is dict:
                if _SENML_KEYS.intersection(first):
                    return "senml"
                if "readings" in first:
                    return "native"
            return "json"
        if type(data) is dict:
            if "end_device_ids" in data or "deviceInfo" in data:
                return "lorawan"
            if type(data.get("sensordatavalues")) is list:
                return "airrohr"
            if type(data.get("readings")) in (dict, list):
                return "native"
            return "json"
        return "value"
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "value"  # whose decoder says why it is not text
    for raw in text.split("\n", 64)[:64]:
        stripped = raw.strip()
        if not stripped or stripped[0] == "#":
            continue
        return "line" if _LINE.match(stripped) else "value"
    return "value"


def decode(payload: bytes, ctx: DecodeContext) -> Decoded:
    family = detect(payload, ctx.max_depth)
    decoder, options = _FAMILIES[family]
    return decoder(payload, replace(ctx, options=options))
