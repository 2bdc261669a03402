"""Payload decoders, one module per format family, and the registry that names them.

A decoder is a pure function ``(payload bytes, DecodeContext) -> Decoded`` (see ``base``).
"""

from __future__ import annotations

from ingest.decoders import native, senml
from ingest.decoders.base import DecodeContext, Decoded, Decoder

__all__ = ["REGISTRY", "DecodeContext", "Decoded", "Decoder", "get_decoder"]

REGISTRY: dict[str, Decoder] = {
    "native": native.decode,
    "senml": senml.decode,
}


def get_decoder(name: str) -> Decoder:
    """The decoder of format ``name``; KeyError naming the known formats when there is none."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown format {name!r}; known formats: {', '.join(sorted(REGISTRY))}") from None
