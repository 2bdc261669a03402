"""Fixtures shared by the unit tests."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SENSOR_INGEST_* variable of the outer environment may leak into a test."""
    for name in list(os.environ):
        if name.upper().startswith("SENSOR_INGEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    """main() installs its own root handler; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
