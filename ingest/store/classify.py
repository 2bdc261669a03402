"""One function that classifies database failures (STYLE rule 3).

- "retry": the database is away or overloaded (lost connection, timeouts, SQLSTATE classes 08, 53,
  57P0x, 57014, 40001/40P01): retry the same batch with backoff for as long as it takes, messages unacked.
- "data": something in the batch is wrong (classes 22, 23, 54; and the driver's own refusals to
  encode an argument: asyncpg's client-side DataError, UnicodeError, OverflowError, ...): split the
  batch until the one message at fault is found and stored as a rejection.
- "fatal": anything else (a bug, an unexpected SQLSTATE): narrowed like data, so one message that
  trips it cannot hold the fleet; when even a rejection row fails that way the cause is not the
  message, and the write is retried with backoff, loudly, with the messages unacknowledged.

Order matters: asyncpg's client-side DataError is a subclass of InterfaceError (the connection-class
family), so data-class client errors are recognised first. Were they not, one message the driver
cannot encode would be retried forever and stop every other device's data.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import asyncpg
from asyncpg.exceptions import _base as _asyncpg_base

__all__ = ["Kind", "classify", "describe", "is_connection_failure", "is_retryable"]

Kind = Literal["retry", "data", "fatal"]

_RETRY_CLASSES = ("08", "53", "57P", "58")
# 57014: a statement timeout (or a cancel). The client's own command_timeout is a TimeoutError and is
# retried; the server's statement_timeout fires at the same moment and must not be told apart from it:
# a write that waited that long on a lock is not at fault, and narrowing it would store a good message
# as a write_error rejection.
_RETRY_STATES = {"40001", "40P01", "55P03", "25P03", "57014"}
_DATA_CLASSES = ("22", "23", "54")
_CONNECTION_CLASSES = ("08", "57P")

# The driver refusing an argument before anything is sent: the data is at fault, not the connection.
# (ClientConfigurationError is a ValueError too, but says the connection settings are wrong.)
_CLIENT_DATA_ERRORS = (_asyncpg_base.DataError, UnicodeError, OverflowError, TypeError, ValueError)


def _client_data_error(exc: BaseException) -> bool:
    return isinstance(exc, _CLIENT_DATA_ERRORS) and not isinstance(exc, asyncpg.ClientConfigurationError)


def classify(exc: BaseException) -> Kind:
    if _client_data_error(exc):
        return "data"
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


def is_connection_failure(exc: BaseException) -> bool:
    """The connection itself failed (lost, timed out, closed by the server): it must not be reused."""
    if _client_data_error(exc):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return (getattr(exc, "sqlstate", None) or "").startswith(_CONNECTION_CLASSES)
    return isinstance(exc, OSError | TimeoutError | EOFError | asyncpg.InterfaceError
                      | asyncpg.exceptions.InternalClientError)


def is_retryable(exc: BaseException) -> bool:
    return classify(exc) == "retry"


def describe(exc: BaseException) -> str:
    """For logs: the exception's type and text; a bare TimeoutError has no text of its own."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
