"""sensor-ingest: a city's sensor readings from MQTT gateways of any make into TimescaleDB."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
