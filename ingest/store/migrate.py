"""The migration runner (psycopg 3, synchronous): schemas/migrations/NNNN_name.sql, in order.

Each migration runs in its own transaction and is recorded in schema_migrations with a checksum.
A session-level advisory lock makes concurrent runs safe: the second waits, then finds nothing to do.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

import psycopg

from ingest.errors import MigrationError
from ingest.settings import mask_url

__all__ = ["MIGRATIONS_DIR", "Migration", "applied_versions", "discover", "migrate"]

log = logging.getLogger(__name__)

# Package data, not a path beside the source: pyproject.toml maps the repo's schemas/ to ingest.schemas, so a
# wheel install carries the migrations and an editable install reads them from the checkout.
MIGRATIONS_DIR: Traversable = files("ingest.schemas") / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant works; it only has to be the same for every sensor-ingest process.
_LOCK_KEY = 0x5E5_0001


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Traversable = MIGRATIONS_DIR) -> list[Migration]:
    # Without this, an install that lost its package data would find nothing to apply and call the schema
    # up to date.
    if not directory.is_dir():
        raise MigrationError(
            f"{directory}: no migrations directory there; an installed sensor-ingest carries its migrations in "
            "ingest/schemas/migrations: reinstall it from a wheel built by pip from the repo"
        )
    found: list[Migration] = []
    # Traversable has no glob(); sorting by name keeps the NNNN_ order.
    entries = sorted((e for e in directory.iterdir() if e.is_file() and e.name.endswith(".sql")), key=lambda e: e.name)
    for path in entries:
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"{path}: migration files are named NNNN_name.sql (lowercase, digits, _)")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migrations share a version number")
    return found


def _connect(url: str, connect_timeout: float) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=int(max(1, connect_timeout)),
                               options="-c TimeZone=UTC", application_name="sensor-ingest-migrate")
    except psycopg.OperationalError as exc:
        raise MigrationError(f"cannot connect to {mask_url(url)}: {str(exc).strip()}") from exc


def _ensure_timescaledb(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:
        detail = str(exc).strip().splitlines()[0]
        raise MigrationError(
            "the timescaledb extension cannot be created in this database: "
            f"{detail}. Install TimescaleDB for this PostgreSQL server and add it to "
            "shared_preload_libraries (deploy/local/services.sh install does both on Debian/Ubuntu), "
            "then restart PostgreSQL; the role running migrate must be allowed to CREATE EXTENSION.",
            sqlstate=exc.sqlstate,
        ) from exc


def applied_versions(conn: psycopg.Connection[tuple[object, ...]]) -> dict[int, str]:
    rows = conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY version").fetchall()
    return {int(str(v)): str(c) for v, c in rows}


def migrate(url: str, *, directory: Traversable = MIGRATIONS_DIR, connect_timeout: float = 10.0) -> list[Migration]:
    """Apply pending migrations; return those applied now (empty when the schema is up to date)."""
    migrations = discover(directory)
    done: list[Migration] = []
    with _connect(url, connect_timeout) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            _ensure_timescaledb(conn)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = applied_versions(conn)
            for m in migrations:
                if m.version in applied:
                    if applied[m.version] != m.checksum:
                        log.warning(
                            "migration %04d_%s changed after it was applied; edits to applied "
                            "migrations are not re-run: add a new migration instead", m.version, m.name
                        )
                    continue
                log.info("applying migration %04d_%s", m.version, m.name)
                try:
                    with conn.transaction():
                        conn.execute(m.sql.encode())  # a file of several statements, no parameters
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                            (m.version, m.name, m.checksum),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {m.version:04d}_{m.name} failed and was rolled back: {str(exc).strip()}",
                        sqlstate=exc.sqlstate,
                    ) from exc
                done.append(m)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return done
