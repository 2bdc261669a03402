"""The storage contract and the migration runner, on a real TimescaleDB."""

from __future__ import annotations

import threading

import psycopg
import pytest

from ingest.errors import MigrationError
from ingest.store.migrate import discover, migrate


def _rows(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as c:
        return c.execute(query).fetchall()  # type: ignore[arg-type]


def test_hypertables_and_their_one_unique_index(database_url: str) -> None:
    tables = {r[0] for r in _rows(database_url, "SELECT hypertable_name FROM timescaledb_information.hypertables")}
    assert tables == {"readings", "states", "rejected_messages"}
    indexes = _rows(database_url, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'readings'")
    assert len(indexes) == 1
    assert "UNIQUE" in str(indexes[0][1])
    assert "(device_id, metric_id, \"time\")" in str(indexes[0][1])


def test_migrate_applies_everything_then_is_a_no_op(empty_database_url: str) -> None:
    applied = migrate(empty_database_url)
    assert [m.version for m in applied] == [m.version for m in discover()]
    before = _rows(empty_database_url, "SELECT version, checksum, applied_at FROM schema_migrations ORDER BY 1")
    assert migrate(empty_database_url) == []
    after = _rows(empty_database_url, "SELECT version, checksum, applied_at FROM schema_migrations ORDER BY 1")
    assert before == after
    assert len(after) == len(discover())


def test_two_concurrent_migrates_both_succeed(empty_database_url: str) -> None:
    results: list[object] = []

    def run() -> None:
        try:
            results.append(len(migrate(empty_database_url)))
        except Exception as exc:  # recorded and asserted below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results, key=str) == sorted([0, len(discover())], key=str)
    assert _rows(empty_database_url, "SELECT count(*) FROM schema_migrations") == [(len(discover()),)]


def test_sessions_use_utc(database_url: str) -> None:
    assert _rows(database_url, "SHOW TimeZone") == [("UTC",)]


def test_refuses_clearly_without_timescaledb(pg: object, empty_database_url: str) -> None:
    # A role that may not create extensions stands in for a server without TimescaleDB.
    role = "no_ext_" + empty_database_url.rsplit("_", 1)[1]
    with psycopg.connect(empty_database_url, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")  # type: ignore[arg-type]
        c.execute(f"GRANT ALL ON SCHEMA public TO {role}")  # type: ignore[arg-type]
    url = empty_database_url.replace("postgres@", f"{role}@")
    with pytest.raises(MigrationError, match="timescaledb extension cannot be created") as info:
        migrate(url)
    assert "shared_preload_libraries" in str(info.value)
    assert info.value.sqlstate == "42501"
