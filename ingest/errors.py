"""The project's one error tree.

Library errors are translated once, at the boundary where they occur, with ``raise ... from exc``;
each error carries its data as attributes so that callers (and the rejection rows) can say what
went wrong and where without parsing messages.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "DecodeError",
    "IngestError",
    "MigrationError",
    "StoreError",
]


class IngestError(Exception):
    """Base of every error raised on purpose by sensor-ingest."""


class ConfigProblem:
    """One problem in a config file: where it is and how to fix it."""

    __slots__ = ("fix", "key", "message")

    def __init__(self, key: str, message: str, fix: str = "") -> None:
        self.key = key
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}" if self.key else self.message
        return f"{text} (fix: {self.fix})" if self.fix else text

    def __repr__(self) -> str:
        return f"ConfigProblem({self.key!r}, {self.message!r}, {self.fix!r})"


class ConfigError(IngestError):
    """The configuration cannot be used. ``problems`` lists every problem found, not just the first."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class DecodeError(IngestError):
    """A payload that cannot be turned into readings.

    ``reason`` is a short stable code stored in rejected_messages.reason (for counting and
    alerting); ``detail`` says in words what is wrong and where, for the operator fixing the mapping.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class StoreError(IngestError):
    """A database operation failed. ``sqlstate`` is the server's error code when it sent one."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        self.sqlstate = sqlstate
        super().__init__(message)


class MigrationError(StoreError):
    """The schema could not be brought up to date; the message says what to do."""
