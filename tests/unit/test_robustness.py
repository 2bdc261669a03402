"""Robustness of every decoder and every preset (issue #12): arbitrary bytes, arbitrary JSON and
mutated real payloads never raise anything but DecodeError, and through the whole per-message path
(Processor.process: route, decode, map, validate) never raise at all and always give an outcome.

2,000 examples per decoder (hypothesis, deadline off); each preset part gets 400 through the
processor on its own topics. The real payloads are every golden case of tests/decoders/cases and
tests/presets/cases.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decoders import FORMATS, OPTIONS, DecodeContext, decode, get_decoder
from ingest.errors import DecodeError
from ingest.model import RawMessage
from ingest.process import Outcome, Processor
from ingest.settings import Settings

TESTS = Path(__file__).resolve().parents[1]
REAL = sorted({p.read_bytes() for p in [*TESTS.glob("decoders/cases/*/*/payload"),
                                         *TESTS.glob("presets/cases/*/*/payload")] if p.stat().st_size <= 8192})
NOW = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
PER_DECODER = settings(max_examples=2000, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PER_PRESET = settings(max_examples=400, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_scalars = st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers(-(2**70), 2**70) | st.text(max_size=20)
_json_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=40)
# Keys the decoders look for, so that arbitrary JSON reaches past the first shape check.
_KEYS = ["bn", "bt", "n", "v", "vs", "t", "u", "device", "time", "readings", "end_device_ids", "uplink_message",
         "decoded_payload", "deviceInfo", "object", "sensordatavalues", "value_type", "value", "esp8266id",
         "method", "params", "ts", "Time", "TempUnit", "last_seen", "state", "ENERGY"]
_shaped = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=6),
    max_leaves=40)


def _dump(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A real payload, cut, with bytes flipped, inserted or deleted, or a slice repeated."""
    data = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from([b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\x00",
                                                b"1e999", b"NaN", b"-", b"\n", b" ", b"=", b"\xff", b"\xc3"]))
        elif kind == "delete" and data:
            del data[at: at + draw(st.integers(1, 8))]
        elif kind == "cut":
            del data[at:]
        elif kind == "repeat" and data:
            data[at:at] = data[at: at + 16] * draw(st.integers(2, 20))
    return bytes(data)


PAYLOADS = st.binary(max_size=2048) | _json_values.map(_dump) | _shaped.map(_dump) | _mutated()


def _context(topic: str, options: dict[str, Any]) -> DecodeContext:
    return DecodeContext(topic=topic, received_at=NOW, device="dev-1", captures={"device": "dev-1"},
                         options=options, fallback_device="dev-1")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_decoder_raises_only_decode_errors(fmt: str) -> None:
    decoder = get_decoder(fmt)
    options = OPTIONS[fmt]().model_dump()

    @PER_DECODER
    @given(payload=PAYLOADS)
    def run(payload: bytes) -> None:
        error: DecodeError | None = None
        try:
            decoded = decode(decoder, payload, _context("x/dev-1/y", options))
        except DecodeError as exc:
            error = exc
        if error is not None:
            assert error.reason
            assert error.detail
        else:
            assert isinstance(decoded.readings, list)

    run()


PROCESSOR = Processor.from_settings(Settings())
# Per preset part, topics its template matches: its filter with the wildcards filled in.
PART_TOPICS = {name: [r.filter.replace("+", "shelly-dev-1").replace("#", "sensor/temperature"),
                      r.filter.replace("+", "dev 2").replace("#", "a/$state")]
               for name, r in ((n, s.route) for n, s in PROCESSOR.sources.items())}


@pytest.mark.parametrize("part", sorted(PART_TOPICS))
def test_every_preset_processes_anything_without_raising(part: str) -> None:
    @PER_PRESET
    @given(payload=PAYLOADS, which=st.integers(0, 1))
    def run(payload: bytes, which: int) -> None:
        topic = PART_TOPICS[part][which]
        out = PROCESSOR.process(RawMessage(topic, payload, NOW))
        assert isinstance(out, Outcome)
        # Nothing silently dropped: readings, a rejection, or a counted skip.
        assert out.readings or out.rejection is not None or out.skipped is not None

    run()


def test_the_real_payloads_are_loaded() -> None:
    assert len(REAL) >= 150
