"""The rejection reasons are listed once (ingest/reasons.py), and the README's table is that list."""

from __future__ import annotations

import re
from pathlib import Path

from ingest.reasons import REASONS, markdown_table

REPO = Path(__file__).resolve().parents[2]
# A reason code as the code writes it: Rejection("code", ...), DecodeError("code", ...), or a
# "reason" passed by keyword to either.
_WRITTEN = re.compile(r'\b(?:Rejection|DecodeError)\(\s*"([a-z_]+)"|reason\s*=\s*"([a-z_]+)"')


def _codes_in_source() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "ingest").rglob("*.py"):
        for m in _WRITTEN.finditer(path.read_text(encoding="utf-8")):
            found.add(m.group(1) or m.group(2))
    return found


def test_every_reason_the_code_writes_is_listed_with_a_meaning_and_a_fix() -> None:
    written = _codes_in_source()
    assert written, "the pattern found no reason at all: it no longer matches how the code writes them"
    assert written - set(REASONS) == set()
    for r in REASONS.values():
        assert r.meaning, r.code
        assert r.fix, r.code


def test_every_listed_reason_is_written_somewhere() -> None:
    # db_rejected and write_error are written by the pipeline's narrowing (ingest/pipeline.py
    # _db_rejection) from the failure's class, not as a literal.
    pipeline = (REPO / "ingest" / "pipeline.py").read_text(encoding="utf-8")
    assert '"db_rejected"' in pipeline
    assert '"write_error"' in pipeline
    assert set(REASONS) - _codes_in_source() <= {"db_rejected", "write_error"}


def test_the_readme_table_is_the_list() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Rejection reasons", 1)[1].split("\n## ", 1)[0]
    assert markdown_table() in section
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [re.findall(r"`([a-z_]+)`", row.split("|")[1]) for row in rows] == [[code] for code in REASONS]
