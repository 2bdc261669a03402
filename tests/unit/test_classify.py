"""classify(): one function decides retry (connection), data (narrow to the message) or fatal."""

from __future__ import annotations

import asyncpg
import pytest
from asyncpg.exceptions import _base

from ingest.store.classify import classify, is_connection_failure


def _pg(cls: type[asyncpg.PostgresError]) -> asyncpg.PostgresError:
    return cls("x")


@pytest.mark.parametrize(
    "exc",
    [
        # asyncpg's client-side refusal to encode an argument is an InterfaceError subclass: it must be
        # recognised as data before the connection-class test, or one message loops the writer forever.
        _base.DataError("invalid input for query argument $1: ['\\udc80x'] (surrogates not allowed)"),
        UnicodeEncodeError("utf-8", "\udc80", 0, 1, "surrogates not allowed"),
        OverflowError("value out of int16 range"),
        TypeError("an integer is required"),
        ValueError("bad value"),
        _pg(asyncpg.CharacterNotInRepertoireError),
        _pg(asyncpg.NumericValueOutOfRangeError),
        _pg(asyncpg.CheckViolationError),
        _pg(asyncpg.ProgramLimitExceededError),
    ],
)
def test_data_class(exc: BaseException) -> None:
    assert classify(exc) == "data"
    assert not is_connection_failure(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.exceptions.ConnectionDoesNotExistError("gone"),
        _pg(asyncpg.AdminShutdownError),
        _pg(asyncpg.CannotConnectNowError),
        TimeoutError(),
        ConnectionResetError(),
        OSError("network unreachable"),
    ],
)
def test_connection_class_is_retried_and_renews_the_connection(exc: BaseException) -> None:
    assert classify(exc) == "retry"
    assert is_connection_failure(exc)


def test_overload_and_conflicts_are_retried_without_counting_as_a_lost_connection() -> None:
    for exc in (_pg(asyncpg.TooManyConnectionsError), _pg(asyncpg.DeadlockDetectedError),
                _pg(asyncpg.SerializationError)):
        assert classify(exc) == "retry"
        assert not is_connection_failure(exc)


def test_unexpected_failures_are_fatal() -> None:
    assert classify(RuntimeError("bug")) == "fatal"
    assert classify(_pg(asyncpg.UndefinedTableError)) == "fatal"
    assert classify(_pg(asyncpg.InsufficientPrivilegeError)) == "fatal"


def test_client_configuration_errors_are_not_data() -> None:
    exc = asyncpg.ClientConfigurationError("bad sslmode")
    assert classify(exc) != "data"
