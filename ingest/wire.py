"""The native wire format: pydantic models of what a sender may publish (a trust boundary).

One message names a device (or leaves it to the topic), an optional time, and its readings, either
as a map ``metric -> value`` or as a list of ``{"metric", "value" | "text", "unit"?, "time"?}``.
A payload is one message or a non-empty array of messages (a gateway's batch).

The models check the shape. What they let through on purpose, for the decoder to report per
reading: a string where a number belongs (reason ``wrong_type``) and a time string that cannot be
read (reason ``bad_time``). An explicit ``null`` in an optional key counts as the key being absent.

``python -m ingest.wire`` rewrites schemas/json/*.json from these models (``--check`` only compares).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetJsonSchemaHandler,
    ModelWrapValidatorHandler,
    PlainValidator,
    Tag,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails, PydanticCustomError, core_schema

__all__ = [
    "NativeMessage",
    "ReadingItem",
    "ValueObject",
    "describe_errors",
    "json_schemas",
    "main",
]

# Package data: pyproject.toml maps the repo's schemas/ to ingest.schemas, so an installed wheel reads its own
# copy and an editable install (a checkout) resolves to schemas/json in the repo, the one main() rewrites.
SCHEMA_DIR: Traversable = files("ingest.schemas") / "json"


# --- leaves ----------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar(value: object) -> float | bool | str:
    if isinstance(value, bool):
        return value
    if _is_number(value):
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, str):
        return value  # not valid, but a per-reading problem (wrong_type), not a broken message
    raise PydanticCustomError("scalar_type", "expected a number or boolean")


def _time(value: object) -> str | float:
    if isinstance(value, str):
        return value  # parsed by the decoder: an unreadable time skips readings, not the message
    if _is_number(value):
        return float(value)  # type: ignore[arg-type]
    raise PydanticCustomError("time_type", "expected an RFC 3339 date-time string or seconds since 1970")


def _name(value: object) -> str:
    if isinstance(value, str) and value:
        return value
    raise PydanticCustomError("name_type", "expected a non-empty string")


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    raise PydanticCustomError("text_type", "expected a string")


Scalar = Annotated[
    float | bool | str,
    PlainValidator(_scalar),
    WithJsonSchema({"type": ["number", "boolean"], "description": "A number or a boolean (never a string)."}),
]
WireTime = Annotated[
    str | float,
    PlainValidator(_time),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
            "description": "RFC 3339 date-time with Z or an offset (a time without one needs the "
            "source's `timezone`), or seconds since 1970-01-01T00:00:00Z.",
        }
    ),
]
Name = Annotated[str, PlainValidator(_name), WithJsonSchema({"type": "string", "minLength": 1})]
Text = Annotated[str, PlainValidator(_text), WithJsonSchema({"type": "string"})]

# Exactly one of "value" and "text", said once for the models and once for the JSON Schema.
_ONE_SLOT: dict[str, Any] = {"oneOf": [{"required": ["value"]}, {"required": ["text"]}]}


def _check_one_slot(value: object, text: object) -> None:
    if (value is None) == (text is None):
        raise PydanticCustomError("one_slot", "needs exactly one of `value` and `text`")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ValueObject(_Wire):
    """A value of the map form: {"value": number|boolean, "unit"?} or {"text": string, "unit"?}."""

    model_config = ConfigDict(json_schema_extra=_ONE_SLOT)

    value: Scalar | None = None
    text: Text | None = None
    unit: Name | None = None

    shorthand: ClassVar[bool] = False
    """The value was written bare (``"pm25": 35.2``), not as an object."""

    @model_validator(mode="wrap")
    @classmethod
    def _accept_shorthand(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        if isinstance(data, dict):
            return handler(data)
        if isinstance(data, bool | int | float | str):
            # Most readings are written bare, and this runs once per reading: a bare value needs only
            # its scalar check, so it is built directly rather than validated again as {"value": ...}.
            return cast(Self, _BareValue.model_construct(value=_scalar(data)))
        raise PydanticCustomError("reading_type", "expected a number, boolean or object")

    @model_validator(mode="after")
    def _one_slot(self) -> Self:
        _check_one_slot(self.value, self.text)
        return self


class _BareValue(ValueObject):
    shorthand: ClassVar[bool] = True


class _ShorthandSchema:
    """JSON Schema of a map value: the object form or its number/boolean shorthand."""

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {"anyOf": [{"type": ["number", "boolean"]}, handler(core_schema)]}


class ReadingItem(_Wire):
    """A reading of the list form; its "time" overrides the message's time for this reading."""

    model_config = ConfigDict(json_schema_extra=_ONE_SLOT)

    metric: Name
    value: Scalar | None = None
    text: Text | None = None
    unit: Name | None = None
    time: WireTime | None = None

    @model_validator(mode="after")
    def _one_slot(self) -> Self:
        _check_one_slot(self.value, self.text)
        return self


# The two forms of "readings" are told apart by JSON type; the tag appears in error locations,
# which describe_errors() drops again.
_READINGS_TAGS = ("map", "list")


def _readings_form(value: Any) -> str | None:
    if isinstance(value, dict):
        return "map"
    if isinstance(value, list):
        return "list"
    return None


ReadingsMap = Annotated[
    dict[Name, Annotated[ValueObject, _ShorthandSchema()]],
    Field(min_length=1, description="metric -> value; metric names are kept verbatim"),
]
ReadingsList = Annotated[list[ReadingItem], Field(min_length=1)]
Readings = Annotated[
    Annotated[ReadingsMap, Tag("map")] | Annotated[ReadingsList, Tag("list")],
    Discriminator(
        _readings_form,
        custom_error_type="readings_type",
        custom_error_message="expected an object (metric -> value) or an array of readings",
    ),
]


class NativeMessage(_Wire):
    """One device's readings. Without "device", the topic's {device} capture names the device."""

    model_config = ConfigDict(title="NativeMessage")

    device: Name | None = None
    time: WireTime | None = None
    readings: Readings


NativePayload = NativeMessage | Annotated[list[NativeMessage], Field(min_length=1)]

# --- errors ----------------------------------------------------------------------------------------

_PLAIN_MESSAGES = {
    "extra_forbidden": "unknown key (not part of the native format)",
    "missing": "required key is missing",
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
    "dict_type": "expected an object",
    "list_type": "expected an array",
    "too_short": "must not be empty",
}


def _path(loc: Sequence[int | str]) -> str:
    parts = list(loc)
    if len(parts) > 1 and parts[0] == "readings" and parts[1] in _READINGS_TAGS:
        del parts[1]
    suffix = ""
    if parts and parts[-1] == "[key]":  # (..., key, "[key]"): the key itself is wrong
        parts, suffix = parts[:-2], " (a metric name)"
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out + suffix


def _describe(error: ErrorDetails) -> str:
    message = _PLAIN_MESSAGES.get(error["type"], error["msg"])
    path = _path(error["loc"])
    return f"{path}: {message}" if path else message


def describe_errors(exc: ValidationError, prefix: str = "", limit: int = 3) -> str:
    """The validation errors as one line naming each JSON path, e.g. ``readings.pm25: expected ...``."""
    errors = exc.errors(include_url=False, include_input=False)
    shown = [_describe(e) for e in errors[:limit]]
    if prefix:
        shown = [f"{prefix}.{s}" if not s.startswith("[") else f"{prefix}{s}" for s in shown]
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(shown) + more


# --- JSON Schema -----------------------------------------------------------------------------------


class _OptionalMeansAbsent(GenerateJsonSchema):
    """Optional keys are documented as optional, not as nullable with a null default.

    The models accept an explicit null as "absent" (lenient on input); the schema tells senders
    to leave the key out.
    """

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema of each wire format: the payloads defined here, the webhook body."""
    from ingest.alerts.body import StandardBody  # the body is ingest.alerts'; only its file is written here
    native = TypeAdapter(NativePayload).json_schema(mode="validation", schema_generator=_OptionalMeansAbsent)
    # What the dispatcher sends (serialization): an optional key may come as null.
    webhook = StandardBody.model_json_schema(mode="serialization")
    return {
        "native.schema.json": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "sensor-ingest native payload",
            "description": "One message, or a non-empty array of messages (a gateway's batch), "
            "published by a sensor or gateway in sensor-ingest's own JSON format.",
            **native,
        },
        "webhook.schema.json": {
            **webhook,
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "sensor-ingest webhook body (body = \"standard\")",
            "description": "One alert event, POSTed as the JSON body of a webhook delivery with the Standard "
            "Webhooks headers webhook-id (\"msg_<delivery id>\", the same in every retry: an idempotency key), "
            "webhook-timestamp and webhook-signature (v1, HMAC-SHA256 over id.timestamp.body). Verify the "
            "signature over the raw bytes before parsing them.",
        },
    }


def render(schema: dict[str, Any]) -> str:
    """The exact text of a schema file: indent=2, sorted keys, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write schemas/json/*.json; with --check, only report files that differ (exit 1)."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    target = SCHEMA_DIR if isinstance(SCHEMA_DIR, Path) else None
    # Only the checkout's copy is committed: rewriting an installed one changes nothing, and the next install
    # undoes it.
    if not check and (target is None or not (target.parent.parent / "pyproject.toml").is_file()):
        print(f"{SCHEMA_DIR} is not schemas/json of a checkout: run `python -m ingest.wire` with the repo's "
              "editable install (make schemas), or pass --check", file=sys.stderr)
        return 2
    stale: list[Traversable] = []
    for name, schema in json_schemas().items():
        path = SCHEMA_DIR / name
        text = render(schema)
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        stale.append(path)
        if target is not None and not check:
            target.mkdir(parents=True, exist_ok=True)
            (target / name).write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'stale' if check else 'wrote'} {path}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
