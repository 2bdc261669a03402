"""Golden cases: tests/decoders/cases/<family>/<case>/ holds payload, context.json and either
expected.json (readings in order, problems, ignored) or error.json (the DecodeError reason).

Optional keys beyond the required ones: "detail_contains" in error.json and in each problem.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from ingest.decoders import DecodeContext, get_decoder
from ingest.errors import DecodeError
from ingest.model import Reading

CASES = Path(__file__).parent / "cases"
CASE_DIRS = sorted(p for p in CASES.glob("*/*") if p.is_dir())


def _context(path: Path) -> DecodeContext:
    raw = json.loads(path.read_text(encoding="utf-8"))
    zone = raw.get("timezone")
    return DecodeContext(
        topic=raw["topic"],
        device=raw.get("device"),
        received_at=datetime.fromisoformat(raw["received_at"]),
        timezone=ZoneInfo(zone) if zone else None,
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
    assert {"native", "senml"} <= families


@pytest.mark.parametrize("case", CASE_DIRS, ids=[f"{p.parent.name}/{p.name}" for p in CASE_DIRS])
def test_golden(case: Path) -> None:
    decode = get_decoder(case.parent.name)
    payload = (case / "payload").read_bytes()
    ctx = _context(case / "context.json")
    expected_file, error_file = case / "expected.json", case / "error.json"
    assert expected_file.exists() != error_file.exists(), "a case has expected.json or error.json"

    if error_file.exists():
        error = json.loads(error_file.read_text(encoding="utf-8"))
        with pytest.raises(DecodeError) as info:
            decode(payload, ctx)
        assert info.value.reason == error["reason"], info.value.detail
        assert error.get("detail_contains", "") in info.value.detail
        return

    expected = json.loads(expected_file.read_text(encoding="utf-8"))
    decoded = decode(payload, ctx)
    assert [_actual(r) for r in decoded.readings] == [_expected(r) for r in expected["readings"]]
    assert [p.reason for p in decoded.problems] == [p["reason"] for p in expected["problems"]], [
        p.detail for p in decoded.problems
    ]
    for got, want in zip(decoded.problems, expected["problems"], strict=True):
        assert want.get("detail_contains", "") in got.detail
    assert decoded.ignored == expected["ignored"]
