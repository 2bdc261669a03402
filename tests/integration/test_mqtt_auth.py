"""Broker credentials come from the environment, work, and never reach the logs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.harness import IngestProcess, Publisher, count, native, stored_readings, write_config
from tests.services import Mosquitto, wait_until

T0 = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)


@pytest.fixture
def secure_broker() -> Iterator[tuple[Mosquitto, str]]:
    password = "pw-" + uuid.uuid4().hex
    server = Mosquitto(users={"ingest": password, "gateway": password + "-gw"})
    try:
        server.start()
        yield server, password
    finally:
        server.cleanup()


def _ingest_as_user(
    tmp_path: Path, database_url: str, broker: Mosquitto, prefix: str, password: str, **env: str
) -> IngestProcess:
    """The username sits in the file's URL; the password may only come from the environment."""
    url = f"mqtt://ingest@127.0.0.1:{broker.port}"
    cfg = write_config(tmp_path / "c.toml", prefix=prefix, database_url=database_url, mqtt_url=url)
    return IngestProcess(cfg, tmp_path / "ingest.log", env={"SENSOR_INGEST_MQTT_PASSWORD": password, **env})


def test_password_from_the_environment_connects_and_is_never_logged(
    tmp_path: Path, database_url: str, secure_broker: tuple[Mosquitto, str], topic_prefix: str
) -> None:
    broker, password = secure_broker
    ingest = _ingest_as_user(tmp_path, database_url, broker, topic_prefix, password, SENSOR_INGEST_LOG_LEVEL="debug")
    log = ingest.log_path
    try:
        ingest.start()
        pub = Publisher(broker.port, "gateway", password + "-gw")
        try:
            pub.publish_all([(f"{topic_prefix}/hn-flood-1/up", native("hn-flood-1", T0.isoformat(), {"level": 1.5}))])
        finally:
            pub.close()
        wait_until(lambda: count(database_url, "readings") == 1, 60, "the reading")
        assert stored_readings(database_url) == {("hn-flood-1", "level", T0.isoformat(), 1.5)}
        assert ingest.terminate() == 0
    finally:
        ingest.close()
    text = log.read_text()
    assert "MQTT connected" in text
    assert password not in text


def test_a_wrong_password_is_retried_and_reported_not_fatal(
    tmp_path: Path, database_url: str, secure_broker: tuple[Mosquitto, str], topic_prefix: str
) -> None:
    broker, password = secure_broker
    ingest = _ingest_as_user(tmp_path, database_url, broker, topic_prefix, "wrong-" + password)
    log = ingest.log_path
    try:
        ingest.start(wait=False)
        wait_until(lambda: "refused the connection" in log.read_text(), 60, "the refusal in the log")
        wait_until(lambda: ingest.readyz() != 0, 30, "the HTTP server")
        assert ingest.readyz() == 503  # not ready: the broker refuses us
        assert ingest.proc is not None
        assert ingest.proc.poll() is None  # still running, still retrying
    finally:
        ingest.close()
    assert password not in log.read_text()
