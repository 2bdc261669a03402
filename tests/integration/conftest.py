"""Fixtures shared by the integration tests (the session-wide services are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.harness import IngestProcess


@pytest.fixture
def ingests() -> Iterator[list[IngestProcess]]:
    """Kills a service that a failed test left running."""
    procs: list[IngestProcess] = []
    yield procs
    for p in procs:
        p.close()
