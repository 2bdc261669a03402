"""Logging set-up: text for people, JSON lines for collectors, and never a secret.

Every record passes through a filter that masks passwords in the message, the traceback and the
stack (URLs' user:***@, password= in query strings and libpq key=value strings, 'password': '...' in
reprs and JSON), so a secret logged by us or by a library cannot leak; both formatters mask their
whole output again, because a record may reach them without passing the filter.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "SecretMaskingFilter", "WorkerFilter", "is_secret_name", "mask_secrets", "setup_logging"]

# A name whose value is a secret: password, sslpassword, db_passwd, pwd, client_secret, api_token ...
_SECRET_NAME = r"\w*(?:password|passwd|pwd|secret|token)"
_SECRET_NAME_RE = re.compile(rf"(?i){_SECRET_NAME}")

# scheme://user:password@ — the password runs to the last '@' of the URL (a password written without
# percent-encoding may hold ':', '/', '?', '#' or '@'); a URL ends at whitespace or a quote.
_URL_PASSWORD = re.compile(r"""(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s'"]*):[^\s'"]*@""")
# password=..., also in a query string (?password=, &sslpassword=) and libpq's "password = ...".
# A value already masked (*** then a delimiter) is taken as it is, so masking twice changes nothing.
_KV_PASSWORD = re.compile(
    rf"""(?i)\b({_SECRET_NAME})(\s*=\s*)(\*\*\*(?=[\s&)\]}},;'"]|$)|'[^']*'|"[^"]*"|[^\s&]+)"""
)
# 'password': '...' as a dict's repr or JSON shows it.
_QUOTED_KEY_PASSWORD = re.compile(
    rf"""(?i)(?P<q>['"])(?P<key>{_SECRET_NAME})(?P=q)(?P<sep>\s*:\s*)(?:'[^']*'|"[^"]*"|[^\s,}}\]]+)"""
)


def is_secret_name(name: str) -> bool:
    """True for a key whose value is a secret (password, sslpassword, api_token, ...)."""
    return _SECRET_NAME_RE.fullmatch(name) is not None


def mask_secrets(text: str) -> str:
    """``text`` with every password it holds (in URLs, key=value pairs, reprs and JSON) replaced by ***."""
    text = _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)
    text = _KV_PASSWORD.sub(r"\1\2***", text)
    return _QUOTED_KEY_PASSWORD.sub(r"\g<q>\g<key>\g<q>\g<sep>\g<q>***\g<q>", text)


_EXCEPTIONS = logging.Formatter()


class SecretMaskingFilter(logging.Filter):
    """Masks the message, the traceback and the stack of every record, in place.

    The traceback is formatted here and cached in ``record.exc_text``, which the standard formatters
    (ours, pytest's, a library's) print instead of formatting ``record.exc_info`` again.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except (TypeError, ValueError):
            # Arguments that do not fit the format: logging would print msg and args raw in its
            # "--- Logging error ---" report. Keep both, masked, in a message that formats.
            msg = f"{record.msg} {record.args!r}"
            record.msg, record.args = mask_secrets(msg), None
        else:
            masked = mask_secrets(msg)
            if masked != msg:
                record.msg = masked
                record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _EXCEPTIONS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_secrets(record.stack_info)
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; every text in it masked (message, extra fields, traceback, stack)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_secrets(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                if is_secret_name(key) and value is not None:
                    out[key] = "***"
                elif isinstance(value, int | float | bool | None):
                    out[key] = value
                else:
                    out[key] = mask_secrets(value if isinstance(value, str) else str(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_secrets(self.formatException(record.exc_info))
        if record.exc_text:
            out["exc"] = mask_secrets(record.exc_text)
        if record.stack_info:
            out["stack"] = mask_secrets(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False)


class WorkerFilter(logging.Filter):
    """Marks every record with the worker process it comes from (``sensor-ingest run --workers N``).

    The number goes on the record as ``worker``: a field of its own in JSON lines, ``[w2]`` in text,
    so that the interleaved output of N workers on one stderr can be told apart and filtered.
    """

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def setup_logging(level: str = "info", fmt: str = "text", worker: int | None = None) -> None:
    """``worker``: the worker number of a process the supervisor started (None: a process on its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SecretMaskingFilter())
    if worker is not None:
        handler.addFilter(WorkerFilter(worker))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = "" if worker is None else "[w%(worker)d] "
        text = _TextFormatter(f"%(asctime)s.%(msecs)03dZ %(levelname)-7s {tag}%(name)s: %(message)s",
                              "%Y-%m-%dT%H:%M:%S")
        text.converter = time.gmtime  # logs in UTC whatever the machine's zone
        handler.setFormatter(text)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries at warning unless we debug: their info lines are noise at ingest rates.
    for name in ("uvicorn", "uvicorn.access", "uvicorn.error", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    # asyncpg's pool logs a traceback at each failed attempt to keep its minimum connection while the
    # database is away; the service already logs the outage once when it starts and once when it ends.
    logging.getLogger("asyncpg.pool").setLevel(logging.DEBUG if level == "debug" else logging.ERROR)
