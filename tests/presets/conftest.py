"""The unit tests' fixtures: no SENSOR_INGEST_* variable leaks in; main()'s logging is undone."""

from tests.unit.conftest import _clean_env, _restore_logging

__all__ = ["_clean_env", "_restore_logging"]
