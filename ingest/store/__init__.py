"""Everything that talks to PostgreSQL/TimescaleDB."""

from __future__ import annotations
