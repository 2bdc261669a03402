"""TLS and mutual TLS to the broker (``mqtts://``, ``mqtt.ca_file``, ``cert_file``, ``key_file``).

A module fixture makes a small PKI with the openssl CLI: a CA; from it a server certificate for
127.0.0.1 (subjectAltName IP:127.0.0.1: Python matches an IP literal only against an IP entry, never
the CN) and client certificates for the service and for a gateway; and a second CA that nobody
trusts, with a server certificate for 127.0.0.1 of its own. Each test starts a Mosquitto of its own
with a TLS listener (tests/services.py, ``BrokerTls``) and runs the real service against it.

The refused cases go through a pass-through TCP proxy (tests/proxy.py) in front of the TLS listener.
TLS runs end to end through it; it only counts the connections the service opens, so a count that
keeps growing while /readyz answers 503 shows the service retrying without any sleep in the test.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from tests.integration.harness import IngestProcess, count, native, stored_readings, write_config
from tests.proxy import FaultProxy
from tests.services import BrokerTls, Mosquitto, wait_until

T0 = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)
INGEST_CN = "sensor-ingest"
GATEWAY_CN = "gw-tls-0001"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the service and the broker trust
    server: Pair  # 127.0.0.1, from ``ca``
    ingest: Pair  # client certificate of the service, from ``ca``
    gateway: Pair  # client certificate of a publishing gateway, from ``ca``
    rogue_server: Pair  # 127.0.0.1 too, but from a CA that no one here trusts
    rogue_client: Pair  # the service's CN, from that same untrusted CA


def _openssl(*args: str | Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed:\n{done.stderr}")


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _make_ca(d: Path, name: str) -> Pair:
    ca = Pair(d / f"{name}.crt", d / f"{name}.key")
    _openssl("req", "-x509", "-new", *_EC_KEY, "-keyout", ca.key, "-out", ca.cert, "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ca


def _issue(d: Path, name: str, ca: Pair, cn: str, usage: str, san: str | None = None) -> Pair:
    pair = Pair(d / f"{name}.crt", d / f"{name}.key")
    csr, ext = d / f"{name}.csr", d / f"{name}.ext"
    _openssl("req", "-new", *_EC_KEY, "-keyout", pair.key, "-out", csr, "-subj", f"/CN={cn}")
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        + (f"subjectAltName={san}\n" if san else "")
    )
    _openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
             "-out", pair.cert, "-days", "2", "-extfile", ext)
    return pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = _make_ca(d, "city-ca"), _make_ca(d, "rogue-ca")
    return Pki(
        ca=ca.cert,
        server=_issue(d, "server", ca, "127.0.0.1", "serverAuth", "IP:127.0.0.1"),
        ingest=_issue(d, "ingest", ca, INGEST_CN, "clientAuth"),
        gateway=_issue(d, "gateway", ca, GATEWAY_CN, "clientAuth"),
        rogue_server=_issue(d, "rogue-server", rogue, "127.0.0.1", "serverAuth", "IP:127.0.0.1"),
        rogue_client=_issue(d, "rogue-client", rogue, INGEST_CN, "clientAuth"),
    )


@pytest.fixture
def tls_broker() -> Iterator[Callable[[BrokerTls], Mosquitto]]:
    """``tls_broker(BrokerTls(...))``: a started broker of this test's own, with that TLS listener."""
    started: list[Mosquitto] = []

    def start(tls: BrokerTls) -> Mosquitto:
        server = Mosquitto(tls=tls)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.cleanup()


def _tls_port(broker: Mosquitto) -> int:
    assert broker.tls_port is not None
    return broker.tls_port


def _mutual(pki: Pki, server: Pair | None = None) -> BrokerTls:
    """A listener that requires a client certificate from ``pki.ca`` and takes its CN as username."""
    server = server or pki.server
    return BrokerTls(ca_file=pki.ca, cert_file=server.cert, key_file=server.key,
                     require_certificate=True, use_identity_as_username=True)


def _ingest(
    tmp_path: Path, database_url: str, prefix: str, url: str, *, ca: Path, client: Pair | None
) -> IngestProcess:
    lines = [f'ca_file = "{ca}"']
    if client is not None:
        lines += [f'cert_file = "{client.cert}"', f'key_file = "{client.key}"']
    cfg = write_config(tmp_path / "c.toml", prefix=prefix, database_url=database_url, mqtt_url=url,
                       mqtt_extra="\n".join(lines))
    return IngestProcess(cfg, tmp_path / "ingest.log")


def _publish_over_tls(port: int, pki: Pki, topic: str, payload: bytes) -> None:
    """One QoS 1 PUBLISH over mutual TLS, as a gateway would send it; returns once the broker has it."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="gw-" + uuid.uuid4().hex[:8],
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.tls_set(ca_certs=str(pki.ca), certfile=str(pki.gateway.cert), keyfile=str(pki.gateway.key))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(30)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("mutual", [True, False], ids=["mutual-tls", "server-tls"])
def test_a_reading_published_over_tls_is_stored(
    tmp_path: Path, database_url: str, pki: Pki, topic_prefix: str,
    tls_broker: Callable[[BrokerTls], Mosquitto], mutual: bool,
) -> None:
    """mutual: the broker requires a client certificate and takes its CN as the username, so its log
    names the service by the CN of the certificate in mqtt.cert_file. server: mqtts:// with only
    mqtt.ca_file, to a listener that asks for no client certificate."""
    tls = _mutual(pki) if mutual else BrokerTls(ca_file=pki.ca, cert_file=pki.server.cert, key_file=pki.server.key,
                                                require_certificate=False)
    broker = tls_broker(tls)
    ingest = _ingest(tmp_path, database_url, topic_prefix, broker.tls_url, ca=pki.ca,
                     client=pki.ingest if mutual else None)
    try:
        ingest.start()
        _publish_over_tls(_tls_port(broker), pki, f"{topic_prefix}/hn-tls-1/up",
                          native("hn-tls-1", T0.isoformat(), {"level": 2.5}))
        wait_until(lambda: count(database_url, "readings") == 1, 60, "the reading published over TLS")
        assert stored_readings(database_url) == {("hn-tls-1", "level", T0.isoformat(), 2.5)}
        assert count(database_url, "rejected_messages") == 0
        assert ingest.terminate() == 0
    finally:
        ingest.close()
    if mutual:
        client_id = ingest.config.read_text().split('client_id = "', 1)[1].split('"', 1)[0]
        connected = [line for line in broker.log_path.read_text().splitlines() if f" as {client_id} " in line]
        assert connected, f"no client {client_id} in the broker's log"
        assert all(f"u'{INGEST_CN}'" in line for line in connected), connected


def _refused_and_retrying(ingest: IngestProcess, proxy: FaultProxy, reason: str) -> None:
    """The service logs ``reason``, opens connection after connection, never turns ready, never exits."""

    def retried() -> bool:
        assert ingest.running, f"the service exited:\n{ingest.log_path.read_text()[-3000:]}"
        code = ingest.readyz()
        assert code in (0, 503), f"/readyz answered {code} while the broker should refuse the service"
        return proxy.accepted >= 3 and reason in ingest.log_path.read_text()

    ingest.start(wait=False)
    wait_until(retried, 60, f"three connection attempts and {reason!r} in {ingest.log_path}")
    wait_until(lambda: ingest.readyz() != 0, 30, "the HTTP server")
    assert ingest.readyz() == 503
    assert ingest.running


@pytest.mark.parametrize("client_cert", ["none", "untrusted"])
def test_a_broker_requiring_a_client_certificate_refuses_the_service_which_retries(
    tmp_path: Path, database_url: str, pki: Pki, topic_prefix: str,
    tls_broker: Callable[[BrokerTls], Mosquitto], make_proxy: Callable[[int], FaultProxy], client_cert: str,
) -> None:
    """none: no mqtt.cert_file at all; untrusted: a certificate from a CA the broker does not trust.

    With TLS 1.3 the client's side of the handshake is over before the broker has checked the client
    certificate, so the connect succeeds and the refusal comes on the first read, ahead of the CONNACK:
    a TLS alert, or only an end of stream. The service's log must give paho's error (which paho
    keeps to its own log) and say which keys to check."""
    broker = tls_broker(_mutual(pki))
    proxy = make_proxy(_tls_port(broker))
    client, reason, broker_says = {
        "none": (None, "set mqtt.cert_file and mqtt.key_file", "peer did not return a certificate"),
        "untrusted": (pki.rogue_client, f"check that mqtt.cert_file ({pki.rogue_client.cert})",
                      "certificate verify failed"),
    }[client_cert]
    ingest = _ingest(tmp_path, database_url, topic_prefix, f"mqtts://127.0.0.1:{proxy.port}", ca=pki.ca, client=client)
    try:
        _refused_and_retrying(ingest, proxy, reason)
    finally:
        ingest.close()
    assert broker_says in broker.log_path.read_text()  # the broker's side: refused for that very reason
    assert "disconnected before CONNACK" in ingest.log_path.read_text()
    assert count(database_url, "readings") == 0


def test_a_server_certificate_from_an_untrusted_ca_is_refused_and_the_service_retries(
    tmp_path: Path, database_url: str, pki: Pki, topic_prefix: str,
    tls_broker: Callable[[BrokerTls], Mosquitto], make_proxy: Callable[[int], FaultProxy],
) -> None:
    # The broker would accept the service's certificate; only its own is from the wrong CA.
    broker = tls_broker(_mutual(pki, server=pki.rogue_server))
    proxy = make_proxy(_tls_port(broker))
    ingest = _ingest(tmp_path, database_url, topic_prefix, f"mqtts://127.0.0.1:{proxy.port}", ca=pki.ca,
                     client=pki.ingest)
    try:
        _refused_and_retrying(ingest, proxy, "certificate verify failed")
    finally:
        ingest.close()
    assert "New client connected" not in broker.log_path.read_text()
