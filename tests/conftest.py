"""Session-wide private services and per-test isolation.

- ``pg``: a private PostgreSQL cluster with TimescaleDB preloaded (tests/services.py), started once.
- ``migrated_template``: a database migrated once per session; each test copies it.
- ``database_url``: a fresh, migrated database for one test (dropped afterwards).
- ``empty_database_url``: a fresh database with nothing in it (migration tests).
- ``broker``: a private Mosquitto, started once per session (tests that restart it use ``own_broker``).
- ``topic_prefix``: a unique first topic level for one test.
- ``own_pg``: a PostgreSQL cluster of one test's own, for tests that stop and restart it.
- ``make_proxy``: FaultProxy instances (tests/proxy.py) in front of a port, closed after the test.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.proxy import FaultProxy
from tests.services import Mosquitto, Postgres

# Naive-datetime bugs hide in UTC; the suite runs in Hanoi's zone (UTC+7) to expose them.
os.environ["TZ"] = "Asia/Ho_Chi_Minh"
time.tzset()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    integration = Path(__file__).parent / "integration"
    for item in items:
        if integration in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@contextmanager
def _running_postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def pg() -> Iterator[Postgres]:
    with _running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def migrated_template(pg: Postgres) -> str:
    from ingest.store.migrate import migrate

    name = pg.create_database("template0")
    migrate(pg.url(name))
    return name


@pytest.fixture
def database_url(pg: Postgres, migrated_template: str) -> Iterator[str]:
    name = pg.create_database(migrated_template)
    yield pg.url(name)
    pg.drop_database(name)


@pytest.fixture
def empty_database_url(pg: Postgres) -> Iterator[str]:
    name = pg.create_database("template0")
    yield pg.url(name)
    pg.drop_database(name)


@pytest.fixture(scope="session")
def broker() -> Iterator[Mosquitto]:
    server = Mosquitto()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def own_broker() -> Iterator[Mosquitto]:
    """A broker of this test's own, for tests that stop and restart it."""
    server = Mosquitto()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def topic_prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def own_pg() -> Iterator[Postgres]:
    """A PostgreSQL cluster of this test's own, for tests that stop and restart it."""
    with _running_postgres() as server:
        yield server


@pytest.fixture
def make_proxy() -> Iterator[Callable[[int], FaultProxy]]:
    """``make_proxy(port)``: a FaultProxy in front of 127.0.0.1:port, in mode "pass"."""
    proxies: list[FaultProxy] = []

    def make(port: int) -> FaultProxy:
        proxy = FaultProxy(port)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
