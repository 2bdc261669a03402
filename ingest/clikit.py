"""What the operators' commands share: settings for a client, the database, tables, time arguments.

Kept free of heavy imports at module level: building the CLI parser imports this.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.errors import ConfigError
from ingest.logs import mask_secrets

if TYPE_CHECKING:
    from ingest.settings import Settings

__all__ = ["DatabaseUnavailable", "async_connect", "cell", "client_settings", "connect", "console", "database_errors",
           "fail", "json_value", "like", "positive", "rfc3339", "since", "table"]


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not positive")
    return n


def rfc3339(text: str, neither: str = ", e.g. 2026-11-25T03:00:05Z") -> datetime:
    """An RFC 3339 time with an offset, in UTC; ``neither`` ends the message of a text that is none."""
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is {'neither' if neither.startswith(' (') else 'not'} an RFC 3339 "
                                         f"time{neither}") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset; add Z or +hh:mm")
    return when.astimezone(UTC)


def since(text: str) -> datetime:
    """An RFC 3339 time, or a duration back from now (30m, 2h, 7d)."""
    from ingest.alerts.model import parse_duration

    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError:
        return rfc3339(text, " (2026-11-25T03:00:00Z) nor a duration (30m, 2h, 7d)")


def fail(text: str) -> None:
    print(f"sensor-ingest: {mask_secrets(text)}", file=sys.stderr)


def console() -> Any:
    from rich.console import Console

    # Piped or captured output keeps whole rows: rich would otherwise wrap them at 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table of plain text: topics, details and device ids come from publishers, so "[/x]" in
    one prints as it is, never as rich markup."""
    from rich.markup import escape
    from rich.table import Table

    shown = Table(title=escape(title), title_justify="left", show_edge=False, pad_edge=False)
    for column in columns:
        shown.add_column(escape(column), overflow="fold")
    for row in rows:
        shown.add_row(*(escape(c) for c in row))
    console().print(shown)


_ALERTING = re.compile(r"^(rules|webhooks|alerts)(\[|\.|$)")


def client_settings(path: Path | None) -> Settings:
    """The settings of FILE and the environment, for a command that only needs http.addr or [database].

    When the only problems are in [[rules]], [[webhooks]] or [alerts] (a rule being fixed, a secret
    that only the service's environment holds), the rest of the file is used without them."""
    from pydantic import ValidationError

    from ingest.settings import Settings, load_settings

    try:
        return load_settings(path)
    except ConfigError as exc:
        alerting = ("rules", "webhooks", "alerts")
        if path is None or not all(_ALERTING.match(p.key or p.message) for p in exc.problems):
            raise
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            return Settings(**{k: v for k, v in data.items() if k not in alerting})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValidationError):
            raise exc from None


def json_value(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.astimezone(UTC).isoformat()
    return str(v)


def cell(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def like(glob: str) -> str:
    escaped = re.sub(r"([\\%_])", r"\\\1", glob)
    return escaped.replace("*", "%").replace("?", "_")


class DatabaseUnavailable(Exception):
    """The database cannot be reached or read; the message says which and why (no password in it)."""


@contextlib.contextmanager
def database_errors(settings: Settings, older: str, doing: str = "use", after: str = "") -> Iterator[None]:
    """psycopg's failures as DatabaseUnavailable (exit 2): a table or column missing means a schema
    older than this release (``older`` says what is missing: "has no device register"), any other
    failure says what could not be done (``doing``: read, use) and, with ``after``, what it means."""
    import psycopg

    from ingest.settings import mask_url

    try:
        yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
        raise DatabaseUnavailable(f"the database at {mask_url(settings.database.url)} {older} (its schema is older "
                                  "than this release): run `sensor-ingest migrate`") from None
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailable(f"cannot {doing} the database at {mask_url(settings.database.url)}: "
                                  f"{mask_secrets(reason)}{after}") from None


def connect(settings: Settings, *, read_only: bool = False) -> Any:
    """A psycopg connection (autocommit) for an operator's command; DatabaseUnavailable when none."""
    import psycopg

    from ingest.settings import mask_url
    from ingest.store.pool import dsn_of

    try:
        conn = psycopg.connect(dsn_of(settings.database), autocommit=True,
                               connect_timeout=max(2, int(settings.database.connect_timeout)),
                               application_name="sensor-ingest-cli")
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailable(f"cannot reach the database at {mask_url(settings.database.url)}: "
                                  f"{mask_secrets(reason)}") from None
    if read_only:
        conn.read_only = True
    return conn


async def async_connect(settings: Settings) -> Any:
    """An asyncpg connection for a command that writes through the service's own code (replay,
    recalibrate); DatabaseUnavailable when none."""
    import asyncpg

    from ingest.settings import mask_url
    from ingest.store.pool import dsn_of

    try:
        return await asyncpg.connect(dsn_of(settings.database), timeout=settings.database.connect_timeout,
                                     server_settings={"application_name": "sensor-ingest-cli"})
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot reach the database at {mask_url(settings.database.url)}: "
                                  f"{mask_secrets(str(exc) or type(exc).__name__)}") from None
