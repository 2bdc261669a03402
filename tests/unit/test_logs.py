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
        # passwords in a URL's query string (libpq reads password= and sslpassword= there)
        ("postgresql://u@h/db?password=s3cret", "postgresql://u@h/db?password=***"),
        ("postgresql://u@h/db?sslmode=require&sslpassword=s3cret", "postgresql://u@h/db?sslmode=require&sslpassword=***"),
        ("mqtt://h:1883?password=x", "mqtt://h:1883?password=***"),
        # libpq's key = value form allows spaces around '='
        ("host=db password = s3cret dbname=x", "host=db password = *** dbname=x"),
        # passwords written without percent-encoding
        ("postgresql://u:ab/cd@h/db", "postgresql://u:***@h/db"),
        ("mqtt://u:p@ss@h:1883 down", "mqtt://u:***@h:1883 down"),
        ("postgresql://u:pa:ss@[bad/db", "postgresql://u:***@[bad/db"),
        # as a repr or JSON shows them
        ("input_value='postgresql://u:s3cret@[bad/db'", "input_value='postgresql://u:***@[bad/db'"),
        ("{'url': 'mqtt://h', 'password': 'hunter2'}", "{'url': 'mqtt://h', 'password': '***'}"),
        ('{"db_password": "hunter2", "n": 1}', '{"db_password": "***", "n": 1}'),
    ],
)
def test_mask_secrets(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked
    assert mask_secrets(masked) == masked  # masking twice (a masked text logged again) changes nothing


def test_masking_twice_keeps_the_text_around_a_masked_value() -> None:
    # An unquoted value runs to the next space or '&' (a password may hold ')' or ','), but a value
    # already masked, as in a ConfigError masked by settings and again by the CLI, keeps what follows.
    masked = "refused (postgresql://u@h/db?password=***), see password=***; token=***&x=1"

    assert mask_secrets(masked) == masked
    assert mask_secrets("password=***x") == "password=***"  # not a masked value: a password


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


def test_filter_masks_a_record_whose_args_do_not_fit() -> None:
    # logging would print msg and args raw in its "--- Logging error ---" report.
    record = _record("connecting to %s as %s", "postgresql://ingest:hunter2@db/x")

    assert SecretMaskingFilter().filter(record) is True
    message = record.getMessage()
    assert "hunter2" not in message
    assert "postgresql://ingest:***@db/x" in message


def _failing_record(logger: str = "ingest.test") -> logging.LogRecord:
    try:
        try:
            raise OSError("connect postgresql://ingest:hunter2@db/x?sslpassword=hunter3")
        except OSError as exc:
            raise ConnectionError("cannot reach mqtt://u:hunter4@broker:1883") from exc
    except ConnectionError:
        return logging.LogRecord(logger, logging.ERROR, __file__, 1, "store down", None, sys.exc_info())


def test_filter_masks_the_traceback_text() -> None:
    record = _failing_record()

    assert SecretMaskingFilter().filter(record) is True
    assert record.exc_text is not None
    assert "ConnectionError" in record.exc_text
    assert "OSError" in record.exc_text  # the chained cause too
    assert "hunter" not in record.exc_text
    # A plain formatter (pytest's, a library's) uses that cached text.
    assert "hunter" not in logging.Formatter().format(record)


def test_filter_masks_the_traceback_through_a_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("ingest.test.exc")
    masking = SecretMaskingFilter()
    logger.addFilter(masking)
    try:
        with caplog.at_level(logging.INFO, logger="ingest.test.exc"):
            try:
                raise ConnectionError("cannot reach postgresql://ingest:hunter2@db/x")
            except ConnectionError:
                logger.exception("store down")
    finally:
        logger.removeFilter(masking)

    assert "ConnectionError" in caplog.text
    assert "postgresql://ingest:***@db/x" in caplog.text
    assert "hunter2" not in caplog.text


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


def test_json_formatter_masks_chained_tracebacks_and_stack_info() -> None:
    record = _failing_record()
    record.stack_info = "Stack (most recent call last):\n  dsn = 'postgresql://u:hunter5@h/db'"

    line = JsonFormatter().format(record)

    out = json.loads(line)
    assert "ConnectionError" in out["exc"]
    assert "OSError" in out["exc"]
    assert "stack" in out
    assert "hunter" not in line


def test_json_formatter_masks_extra_fields() -> None:
    logger = logging.getLogger("ingest.test.json")
    record = logger.makeRecord(
        "ingest.test.json", logging.INFO, __file__, 1, "connecting", (), None,
        extra={"dsn": "postgresql://u:hunter2@h/db", "password": "hunter3", "mqtt_token": "hunter4",
               "params": {"password": "hunter5"}, "count": 3, "note": None},
    )

    line = JsonFormatter().format(record)

    out = json.loads(line)
    assert out["dsn"] == "postgresql://u:***@h/db"
    assert out["password"] == "***"
    assert out["mqtt_token"] == "***"
    assert out["count"] == 3
    assert out["note"] is None
    assert "hunter" not in line


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_logging_masks_tracebacks(capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    setup_logging("info", fmt)
    logger = logging.getLogger("ingest.test.tb")

    try:
        try:
            raise OSError("connect postgresql://ingest:hunter2@db/x?password=hunter3")
        except OSError as exc:
            raise ConnectionError("cannot reach mqtt://u:hunter4@broker:1883") from exc
    except ConnectionError as exc:
        logger.error("task failed: %r", exc, exc_info=exc)
        logger.exception("again, from logger.exception")

    err = capsys.readouterr().err
    assert "ConnectionError" in err
    assert "OSError" in err
    assert "mqtt://u:***@broker:1883" in err
    assert "hunter" not in err
    if fmt == "json":
        assert len(err.splitlines()) == 2


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
