"""Golden cases: tests/decoders/cases/<family>/<case>/ holds payload, context.json, source.txt and either
expected.json (readings in order, problems, ignored) or error.json (the DecodeError reason).

context.json: "topic" and "received_at"; optional "device" (the topic's {device} capture), "timezone",
"captures" (every capture of the topic template; its "device" is the device when "device" is not
given), "options" (the format's options) and "mapping" (a source's mapping keys as in [[sources]]:
time_field, device_field, rename, ignore, states, value_map, metrics). The case runs exactly what the
service runs: the source's settings are validated, then the decoder and the mapping are applied.

Optional keys beyond the required ones: "detail_contains" in error.json and in each problem;
"skipped" in expected.json (a message acknowledged without readings by design).

source.txt says where the payload comes from. Its first line is "<kind>: <reference>", one of
  spec: a specification and its section, e.g. "spec: RFC 8428 §5.1.2, second example";
  vendor: a vendor's document, by title and version or address;
  issue: a public issue thread, with its https:// address;
  project: this project's contract, for its own format and for hostile, limit and rule cases
           whose payload was written here, e.g. "project: schemas/json/native.schema.json;
           README 'Rejection reasons': too_deep".
Further lines are free notes: where the expected output follows the source and where it follows this
project's own rules (device and metric naming, the receive time for "now"). A case named
rfc8428_* claims to be an RFC 8428 example, so its kind must be spec and its reference "RFC 8428 §...".
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from ingest.decoders import DecodeContext, decode, get_decoder
from ingest.errors import DecodeError
from ingest.model import Reading
from ingest.settings import SourceSettings

CASES = Path(__file__).parent / "cases"
CASE_DIRS = sorted(p for p in CASES.glob("*/*") if p.is_dir())


def _context(path: Path, family: str) -> DecodeContext:
    raw = json.loads(path.read_text(encoding="utf-8"))
    zone = raw.get("timezone")
    captures = dict(raw.get("captures", {}))
    device = raw.get("device", captures.get("device"))
    if device is not None:
        captures.setdefault("device", device)
    # Through SourceSettings, so that a case's options and mapping are valid config as written.
    topic = "/".join(f"{{{k}}}" for k in captures) or "golden/#"
    source = SourceSettings(name="golden", topic=topic, format=family, timezone=zone,
                            options=raw.get("options", {}), **raw.get("mapping", {}))
    return DecodeContext(
        topic=raw["topic"],
        device=device,
        captures=captures,
        received_at=datetime.fromisoformat(raw["received_at"]),
        timezone=ZoneInfo(zone) if zone else None,
        options=source.format_options(),
        mapping=source.mapping(),
    )


def _value(value: Any) -> tuple[str, Any]:
    # Tagged so that True never equals 1.0, and NaN compares equal to NaN.
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", "NaN" if math.isnan(value) else float(value))
    return ("text", value)


def _actual(reading: Reading) -> dict[str, Any]:
    assert reading.time.tzinfo is UTC, f"{reading} time is not in UTC"
    return {
        "device": reading.device,
        "metric": reading.metric,
        "time": reading.time,
        "value": _value(reading.value),
        "unit": reading.unit,
        "flags": reading.flags,
    }


def _expected(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "device": entry["device"],
        "metric": entry["metric"],
        "time": datetime.fromisoformat(entry["time"]),
        "value": _value(entry["value"]),
        "unit": entry["unit"],
        "flags": entry["flags"],
    }


def test_cases_are_present() -> None:
    families = {p.parent.name for p in CASE_DIRS}
    assert {"native", "senml", "json", "lorawan", "line", "value"} <= families


_SOURCE_LINE = re.compile(r"(spec|vendor|issue|project): (\S.*)")


def _source_problem(case: Path) -> str | None:
    """What is wrong with a case's source.txt, or None."""
    source = case / "source.txt"
    if not source.is_file():
        return "has no source.txt"
    lines = source.read_text(encoding="utf-8").splitlines()
    match = _SOURCE_LINE.fullmatch(lines[0].strip()) if lines else None
    if match is None:
        return "source.txt does not start with '<spec|vendor|issue|project>: <reference>'"
    kind, reference = match.groups()
    if kind == "spec" and "§" not in reference:
        return "a spec source names no section (§)"
    if kind == "issue" and "https://" not in reference:
        return "an issue source has no https:// address"
    if case.name.startswith("rfc8428_") and not (kind == "spec" and reference.startswith("RFC 8428 §")):
        return "an rfc8428_* case must have the source 'spec: RFC 8428 §...'"
    return None


def test_every_case_names_its_source() -> None:
    problems = [f"{c.parent.name}/{c.name}: {why}" for c in CASE_DIRS if (why := _source_problem(c))]
    assert not problems, "cases without a usable source:\n" + "\n".join(problems)


@pytest.mark.parametrize("case", CASE_DIRS, ids=[f"{p.parent.name}/{p.name}" for p in CASE_DIRS])
def test_golden(case: Path) -> None:
    decoder = get_decoder(case.parent.name)
    payload = (case / "payload").read_bytes()
    ctx = _context(case / "context.json", case.parent.name)
    expected_file, error_file = case / "expected.json", case / "error.json"
    assert expected_file.exists() != error_file.exists(), "a case has expected.json or error.json"

    if error_file.exists():
        error = json.loads(error_file.read_text(encoding="utf-8"))
        with pytest.raises(DecodeError) as info:
            decode(decoder, payload, ctx)
        assert info.value.reason == error["reason"], info.value.detail
        assert error.get("detail_contains", "") in info.value.detail
        return

    expected = json.loads(expected_file.read_text(encoding="utf-8"))
    decoded = decode(decoder, payload, ctx)
    assert [_actual(r) for r in decoded.readings] == [_expected(r) for r in expected["readings"]]
    assert [p.reason for p in decoded.problems] == [p["reason"] for p in expected["problems"]], [
        p.detail for p in decoded.problems
    ]
    for got, want in zip(decoded.problems, expected["problems"], strict=True):
        assert want.get("detail_contains", "") in got.detail
    assert decoded.ignored == expected["ignored"]
    assert decoded.skipped == expected.get("skipped")
