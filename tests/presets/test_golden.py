"""Golden cases of the presets: real published payloads of each firmware, decoded by
`sensor-ingest decode --topic T --received-at R PAYLOAD` with no config file and no flag.

tests/presets/cases/<preset>/<case>/ holds ``payload`` (the bytes as published), ``context.json``
("topic", "received_at", optional "env": SENSOR_INGEST_* variables of the run, e.g. the presets'
time zone), ``source.txt`` (first line "<kind>: <reference>": where the payload was published; kind
vendor, issue, spec, project, or repo for a capture in a public repository's file) and
``expected.json``: the command's whole output (source, format, readings with device, metric, time,
value, unit and flags, rejection, ignored, skipped).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ingest.cli import main
from ingest.presets import PRESETS

CASES = Path(__file__).parent / "cases"
CASE_DIRS = sorted(p for p in CASES.glob("*/*") if p.is_dir())
_KINDS = re.compile(r"^(vendor|issue|spec|project|repo): \S")


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize("case", CASE_DIRS, ids=[f"{p.parent.name}/{p.name}" for p in CASE_DIRS])
def test_golden(case: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    context = json.loads((case / "context.json").read_text(encoding="utf-8"))
    for name, value in context.get("env", {}).items():
        assert name.startswith("SENSOR_INGEST_"), name
        monkeypatch.setenv(name, value)
    expected = json.loads((case / "expected.json").read_text(encoding="utf-8"))

    code = main(["decode", "--topic", context["topic"], "--received-at", context["received_at"],
                 str(case / "payload")])

    out, _ = capsys.readouterr()
    got = json.loads(out)
    assert got == expected
    assert code == (1 if expected["rejection"] else 0)
    # The case is the preset's own: its source is a part of the preset it is filed under.
    assert got["source"] in {part["name"] for part in PRESETS[case.parent.name].parts("UTC")}


@pytest.mark.parametrize("case", CASE_DIRS, ids=[f"{p.parent.name}/{p.name}" for p in CASE_DIRS])
def test_golden_case_names_its_source(case: Path) -> None:
    first = (case / "source.txt").read_text(encoding="utf-8").splitlines()[0]
    assert _KINDS.match(first), f"{case}: source.txt must start with '<kind>: <reference>', got {first!r}"
    assert (case / "payload").exists()


def test_every_preset_has_three_golden_cases() -> None:
    counts = {name: 0 for name in PRESETS}
    for case in CASE_DIRS:
        counts[case.parent.name] += 1
    assert {name: n for name, n in counts.items() if n < 3} == {}
