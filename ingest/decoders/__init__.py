"""Payload decoders, one module per format family, and the registry that names them.

A decoder is a pure function ``(payload bytes, DecodeContext) -> Decoded`` (see ``base``). Each
module also has an ``Options`` model: the format's options, validated when the config is loaded.
``decode()`` runs a format's decoder and then the source's mapping: what the service runs per message.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from ingest.decoders import auto, line, lorawan, mapping, native, senml, value
from ingest.decoders import json as json_format
from ingest.decoders.base import DecodeContext, Decoded, Decoder
from ingest.model import Reading, Rejection

__all__ = ["FORMATS", "OPTIONS", "REGISTRY", "DecodeContext", "Decoded", "Decoder", "decode", "get_decoder"]


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


REGISTRY: dict[str, Decoder] = {
    "native": native.decode,
    "senml": senml.decode,
    "json": json_format.decode,
    "lorawan": lorawan.decode,
    "line": line.decode,
    "value": value.decode,
    "auto": auto.decode,
}
OPTIONS: dict[str, type[BaseModel]] = {
    "native": _NoOptions,
    "senml": _NoOptions,
    "json": json_format.Options,
    "lorawan": lorawan.Options,
    "line": line.Options,
    "value": value.Options,
    "auto": _NoOptions,
}
FORMATS = tuple(REGISTRY)
# Formats that read the mapping's time_field / device_field (payload paths) from the payload.
PATH_FIELDS = frozenset({"json"})


def get_decoder(name: str) -> Decoder:
    """The decoder of format ``name``; KeyError naming the known formats when there is none."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown format {name!r}; known formats: {', '.join(sorted(REGISTRY))}") from None


def decode(decoder: Decoder, payload: bytes, ctx: DecodeContext) -> Decoded:
    """Decode, then apply the source's mapping (ingest.decoders.mapping) to the readings.

    Two readings of one message for the same device, metric and time (two leaves renamed to one
    name, two records of a batch without times of their own) would be one row: the first is kept and
    each later one is a problem of the message, never a silent overwrite.
    """
    decoded = decoder(payload, ctx)
    readings = decoded.readings
    if not readings:
        return decoded
    ignored = 0
    if not ctx.mapping.empty:
        readings, ignored = mapping.apply(readings, ctx.mapping)
    # Cheap first: distinct (device, metric) pairs (strings hash once) cannot clash whatever the times.
    if len(readings) > 1 and len({(r.device, r.metric) for r in readings}) < len(readings):
        readings, clashes = _first_of_each(readings)
        if clashes:
            return replace(decoded, readings=readings, problems=[*decoded.problems, *clashes],
                           ignored=decoded.ignored + ignored)
    if readings is decoded.readings:
        return decoded
    return replace(decoded, readings=readings, ignored=decoded.ignored + ignored)


def _first_of_each(readings: list[Reading]) -> tuple[list[Reading], list[Rejection]]:
    seen: set[tuple[str, str, datetime]] = set()
    kept: list[Reading] = []
    clashes: list[Rejection] = []
    for r in readings:
        key = (r.device, r.metric, r.time)
        if key in seen:
            clashes.append(Rejection(
                "schema", f"{r.metric}: a second value ({r.value!r}) for one device and time in this message; "
                "the first is stored (two leaves mapped to one name, or records without times of their own?)",
                r.device))
        else:
            seen.add(key)
            kept.append(r)
    return (readings, []) if not clashes else (kept, clashes)
