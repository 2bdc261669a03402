"""Logging: secrets are masked in every record, and the JSON format is one object per line."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime

import pytest

from ingest.logs import JsonFormatter, SecretMaskingFilter, mask_secrets, setup_logging


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    """setup_logging() replaces the root handlers; put pytest's (and the levels) back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libs = {name: logging.getLogger(name).level for name in ("uvicorn", "uvicorn.access", "uvicorn.error", "asyncio")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lib_level in libs.items():
        logging.getLogger(name).setLevel(lib_level)


def _record(msg: str, *args: object, level: int = logging.INFO, name: str = "ingest.test") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 10, msg, args or None, None)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("mqtt://u:p%40ss@h:1883", "mqtt://u:***@h:1883"),
        ("connect to postgresql://u:secret@h:5432/db failed", "connect to postgresql://u:***@h:5432/db failed"),
        ("mqtts://:only-pw@h", "mqtts://:***@h"),
        ("a postgresql://a:x@h1/d and mqtt://b:y@h2", "a postgresql://a:***@h1/d and mqtt://b:***@h2"),
        ("password=hunter2", "password=***"),
        ("host=db user=ingest password=hunter2 dbname=x", "host=db user=ingest password=*** dbname=x"),
        ("PASSWORD=hunter2&token=abc", "PASSWORD=***&token=***"),
        ("pwd=a passwd=b secret=c", "pwd=*** passwd=*** secret=***"),
    ],
)
def test_mask_secrets(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://u@h/db",
        "mqtt://h:1883",
        "no secrets here",
        "compared passwords: 2",
        "",
    ],
)
def test_mask_secrets_leaves_other_text_alone(text: str) -> None:
    assert mask_secrets(text) == text


def test_filter_masks_a_record_built_with_args() -> None:
    record = _record("connecting to %s as %s (attempt %d)", "postgresql://ingest:hunter2@db/x", "ingest", 3)

    assert SecretMaskingFilter().filter(record) is True
    message = record.getMessage()
    assert "hunter2" not in message
    assert message == "connecting to postgresql://ingest:***@db/x as ingest (attempt 3)"


def test_filter_masks_a_record_without_args() -> None:
    record = _record("dsn password=hunter2")

    assert SecretMaskingFilter().filter(record) is True
    assert record.getMessage() == "dsn password=***"


def test_filter_leaves_clean_records_untouched() -> None:
    record = _record("wrote %d rows in %.1f ms", 5, 2.25)

    assert SecretMaskingFilter().filter(record) is True
    assert record.msg == "wrote %d rows in %.1f ms"
    assert record.args == (5, 2.25)
    assert record.getMessage() == "wrote 5 rows in 2.2 ms"


def test_filter_masks_through_a_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("ingest.test.filter")
    masking = SecretMaskingFilter()
    logger.addFilter(masking)
    try:
        with caplog.at_level(logging.INFO, logger="ingest.test.filter"):
            logger.info("lost %s", "mqtt://ingest:hunter2@broker:1883")
    finally:
        logger.removeFilter(masking)

    assert [r.getMessage() for r in caplog.records] == ["lost mqtt://ingest:***@broker:1883"]
    assert "hunter2" not in caplog.text


def test_json_formatter_fields() -> None:
    record = _record("wrote %d rows", 5, level=logging.WARNING, name="ingest.store")
    record.created = 1764039605.5  # 2025-11-25 03:00:05.5 UTC, 10:00:05.5 in Hanoi

    line = JsonFormatter().format(record)

    assert "\n" not in line
    out = json.loads(line)
    assert out["ts"] == "2025-11-25T03:00:05.500+00:00"
    assert datetime.fromisoformat(out["ts"]).timestamp() == 1764039605.5
    assert out["level"] == "warning"
    assert out["logger"] == "ingest.store"
    assert out["msg"] == "wrote 5 rows"


def test_json_formatter_includes_extra_fields() -> None:
    logger = logging.getLogger("ingest.test.json")
    record = logger.makeRecord(
        "ingest.test.json", logging.INFO, __file__, 1, "batch written", (), None,
        extra={"topic": "city/d/aq-7/up", "rows": 12, "seconds": 0.25, "redelivered": False, "source": None,
               "ids": [1, 2]},
    )

    out = json.loads(JsonFormatter().format(record))

    assert out["topic"] == "city/d/aq-7/up"
    assert out["rows"] == 12
    assert out["seconds"] == 0.25
    assert out["redelivered"] is False
    assert out["source"] is None
    assert out["ids"] == "[1, 2]"  # other types as their str()
    # Standard LogRecord attributes are not repeated.
    assert not {"args", "pathname", "lineno", "created", "levelno", "msecs"} & set(out)


def test_json_formatter_keeps_a_multiline_message_on_one_line() -> None:
    line = JsonFormatter().format(_record("first\nsecond"))

    assert "\n" not in line
    assert json.loads(line)["msg"] == "first\nsecond"


def test_json_formatter_masks_secrets_in_tracebacks() -> None:
    try:
        raise ConnectionError("cannot reach postgresql://ingest:hunter2@db/x")
    except ConnectionError:
        record = logging.LogRecord("ingest", logging.ERROR, __file__, 1, "store down", None, sys.exc_info())

    line = JsonFormatter().format(record)

    assert "\n" not in line
    out = json.loads(line)
    assert "ConnectionError" in out["exc"]
    assert "hunter2" not in line


@pytest.mark.usefixtures("_restore_logging")
def test_setup_logging_json_writes_masked_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json")
    logger = logging.getLogger("ingest.test.setup")

    logger.debug("not shown at info")
    logger.info("connected to %s", "postgresql://ingest:hunter2@db/x", extra={"attempt": 2})
    logger.warning("second\nline")

    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r["level"] for r in records] == ["info", "warning"]
    assert records[0]["msg"] == "connected to postgresql://ingest:***@db/x"
    assert records[0]["attempt"] == 2
    assert records[0]["logger"] == "ingest.test.setup"
    assert "hunter2" not in err


@pytest.mark.usefixtures("_restore_logging")
def test_setup_logging_text_masks_too(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("debug", "text")

    logging.getLogger("ingest.test.text").debug("dsn %s", "mqtt://u:hunter2@broker")

    err = capsys.readouterr().err
    assert "mqtt://u:***@broker" in err
    assert "DEBUG" in err
    assert "hunter2" not in err


def test_quoted_values_with_spaces_are_masked_whole() -> None:
    from ingest.logs import mask_secrets

    assert mask_secrets("dsn: password='my secret' host=h") == "dsn: password=*** host=h"
    assert mask_secrets('password="a b c"') == "password=***"
