"""schemas/json/*.json are generated from ingest.wire; this fails when a file drifts from the models.

Fix a failure with `python -m ingest.wire` and commit the rewritten file with the model change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.wire import SCHEMA_DIR, json_schemas, render

SCHEMAS = json_schemas()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_file_matches_models(name: str) -> None:
    path = SCHEMA_DIR / name  # a Traversable (package data of ingest.schemas), so is_file(), not exists()
    assert path.is_file(), f"{path} is missing: run `python -m ingest.wire`"
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == SCHEMAS[name], f"{path} drifted from ingest/wire.py: run `python -m ingest.wire`"
    assert text == render(SCHEMAS[name]), f"{path} is not in generated form: run `python -m ingest.wire`"


def test_schema_dir_is_the_checkouts() -> None:
    # `make schemas` rewrites SCHEMA_DIR; through the editable install it must resolve to the repo's own copy.
    assert Path(__file__).resolve().parents[2] / "schemas" / "json" == SCHEMA_DIR


def test_native_schema_is_the_payload() -> None:
    schema = SCHEMAS["native.schema.json"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    message = schema["$defs"]["NativeMessage"]
    assert message["additionalProperties"] is False
    assert message["required"] == ["readings"]
    # one message or a non-empty batch of them
    assert {"$ref": "#/$defs/NativeMessage"} in schema["anyOf"]
    assert any(alt.get("type") == "array" and alt.get("minItems") == 1 for alt in schema["anyOf"])
