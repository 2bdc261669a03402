"""Logging set-up: text for people, JSON lines for collectors, and never a secret.

Every record passes through a filter that masks passwords in URLs (scheme://user:***@host), so a
URL logged by us or by a library cannot leak one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

__all__ = ["SecretMaskingFilter", "mask_secrets", "setup_logging"]

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]+)@")
_KV_PASSWORD = re.compile(r"""(?i)\b(password|passwd|pwd|secret|token)=('[^']*'|"[^"]*"|[^\s&]+)""")


def mask_secrets(text: str) -> str:
    text = _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)
    return _KV_PASSWORD.sub(r"\1=***", text)


class SecretMaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        masked = mask_secrets(msg)
        if masked != msg:
            record.msg = masked
            record.args = None
        return True


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            out["exc"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SecretMaskingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        text = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
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
