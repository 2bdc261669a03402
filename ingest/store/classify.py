"""One function that classifies database failures (STYLE rule 3).

- "retry": the database is away or overloaded (lost connection, timeouts, SQLSTATE classes 08, 53,
  57P0x, 40001/40P01): retry the same batch with backoff for as long as it takes, messages unacked.
- "data": something in the batch is wrong (classes 22, 23, 54, 42 on data): split the batch until the
  one message at fault is found and stored as a rejection.
- "fatal": anything else (a bug, a schema that is not migrated): retried too, slowly and loudly,
  because dropping messages is never the answer; the operator sees it in logs and /readyz.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import asyncpg

__all__ = ["Kind", "classify", "describe", "is_retryable"]

Kind = Literal["retry", "data", "fatal"]

_RETRY_CLASSES = ("08", "53", "57P", "58")
_RETRY_STATES = {"40001", "40P01", "55P03", "25P03"}
_DATA_CLASSES = ("22", "23", "54")


def classify(exc: BaseException) -> Kind:
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        if state in _RETRY_STATES or state.startswith(_RETRY_CLASSES):
            return "retry"
        if state.startswith(_DATA_CLASSES):
            return "data"
        return "fatal"
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError):
        # Connection closed under us, pool closing, protocol errors after a lost connection.
        return "retry"
    # OSError covers ConnectionError, socket.gaierror and ssl.SSLError.
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | OSError | EOFError):
        return "retry"
    return "fatal"


def is_retryable(exc: BaseException) -> bool:
    return classify(exc) == "retry"


def describe(exc: BaseException) -> str:
    """For logs: the exception's type and text; a bare TimeoutError has no text of its own."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
