"""Broker credentials come from the environment, work, and never reach the logs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.harness import IngestProcess, Publisher, count, native, stored_readings, write_config
from tests.proxy import CONNACK, CONNECT, FaultProxy
from tests.services import Mosquitto, wait_until

T0 = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)
_BAD_CREDENTIALS = {0x86, 0x87}  # CONNACK reason codes: bad user name or password, not authorized


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
    tmp_path: Path, database_url: str, broker: Mosquitto, prefix: str, password: str, port: int | None = None,
    **env: str,
) -> IngestProcess:
    """The username sits in the file's URL; the password may only come from the environment.
    ``port``: where to connect instead of the broker's own port (a proxy in front of it)."""
    url = f"mqtt://ingest@127.0.0.1:{port or broker.port}"
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


def _set_password(broker: Mosquitto, user: str, password: str) -> None:
    """What an operator does to change a password: rewrite the broker's password file, then SIGHUP
    (Mosquitto reloads its password file without dropping anyone)."""
    passwd = broker.dir / "passwd"
    subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", str(passwd), user,
                    password], check=True, capture_output=True)
    if broker.ids is not None:  # the broker, started as root, reads it as its own user
        os.chown(passwd, *broker.ids)
    passwd.chmod(0o600)
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)


def test_a_wrong_password_is_retried_and_reported_not_fatal(
    tmp_path: Path, database_url: str, secure_broker: tuple[Mosquitto, str], topic_prefix: str
) -> None:
    broker, password = secure_broker
    wrong = "wrong-" + password
    with FaultProxy(broker.port, record_mqtt=True) as proxy:

        def connacks() -> list[int | None]:
            return [p.reason for p in proxy.packets(CONNACK)]

        ingest = _ingest_as_user(tmp_path, database_url, broker, topic_prefix, wrong, port=proxy.port)
        log = ingest.log_path
        try:
            ingest.start(wait=False)
            # Refused, and tried again, again and again: one CONNECT per connection, each refused for
            # its credentials (Mosquitto 2.0 answers 0x87, not authorized; 0x86 is bad user name or
            # password); the service keeps running, not ready.
            wait_until(lambda: len(connacks()) >= 3, 60, "three refused CONNECTs")
            wait_until(lambda: ingest.readyz() != 0, 30, "the HTTP server")
            assert ingest.readyz() == 503  # not ready: the broker refuses us
            assert ingest.proc is not None
            assert ingest.proc.poll() is None  # still running, still retrying
            seen = proxy.packets()
            refused = [p for p in seen if p.type == CONNACK]
            assert {p.reason for p in refused} <= _BAD_CREDENTIALS
            conns = [p.conn for p in refused]
            assert len(set(conns)) == len(conns), "one refused CONNECT per connection"
            assert [p.conn for p in seen if p.type == CONNECT and p.conn in conns] == conns

            # The password is fixed at the broker: the next retry connects, and data flows.
            _set_password(broker, "ingest", wrong)
            wait_until(ingest.ready, 60, "the service to connect with the password the broker now knows")
            assert 0 in connacks()
            assert sum(1 for r in connacks() if r in _BAD_CREDENTIALS) >= 3
            pub = Publisher(broker.port, "gateway", password + "-gw")
            try:
                pub.publish_all([(f"{topic_prefix}/hn-flood-2/up", native("hn-flood-2", T0.isoformat(),
                                                                           {"level": 2.5}))])
            finally:
                pub.close()
            wait_until(lambda: count(database_url, "readings") == 1, 60, "the reading")
            assert stored_readings(database_url) == {("hn-flood-2", "level", T0.isoformat(), 2.5)}
            assert ingest.terminate() == 0
        finally:
            ingest.close()
    text = log.read_text()
    # Reported once, when it began (with the variables to check), not once per retry.
    assert text.count("refused the connection") == 1
    assert "SENSOR_INGEST_MQTT_PASSWORD" in text
    assert "MQTT broker back after" in text
    assert password not in text  # (nor the wrong one, which holds it)
