"""schemas/json/*.json are generated from ingest.wire; this fails when a file drifts from the models.

Fix a failure with `python -m ingest.wire` and commit the rewritten file with the model change.
"""

from __future__ import annotations

import json

import pytest

from ingest.wire import SCHEMA_DIR, json_schemas, render

SCHEMAS = json_schemas()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_file_matches_models(name: str) -> None:
    path = SCHEMA_DIR / name
    assert path.exists(), f"{path} is missing: run `python -m ingest.wire`"
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == SCHEMAS[name], f"{path} drifted from ingest/wire.py: run `python -m ingest.wire`"
    assert text == render(SCHEMAS[name]), f"{path} is not in generated form: run `python -m ingest.wire`"


def test_native_schema_is_the_payload() -> None:
    schema = SCHEMAS["native.schema.json"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    message = schema["$defs"]["NativeMessage"]
    assert message["additionalProperties"] is False
    assert message["required"] == ["readings"]
    # one message or a non-empty batch of them
    assert {"$ref": "#/$defs/NativeMessage"} in schema["anyOf"]
    assert any(alt.get("type") == "array" and alt.get("minItems") == 1 for alt in schema["anyOf"])
