"""Issue #16, body = "alertmanager", end to end: one rule with two webhooks, one of each body kind.

Everything is real: the service is a process, the readings are native messages published to the
private Mosquitto, the events and outbox rows are rows of the private TimescaleDB, and each webhook
is its own HTTP server on 127.0.0.1 (tests/webhook_receiver.py). A scripted series fires and
resolves once; each receiver must get exactly its own format, twice (firing, then resolved): the
standard receiver StandardBody, the Alertmanager receiver a version "4" payload that validates against
tests/schemas/alertmanager-webhook.schema.json, with the right status, startsAt and endsAt and the same
fingerprint in both. Both kinds are sent through the outbox with the Standard Webhooks signature.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import psycopg
import pytest
from pydantic import ValidationError

from ingest.alerts.body import StandardBody, fingerprint
from tests.integration.harness import IngestProcess, Publisher, native, write_config
from tests.services import Mosquitto, wait_until
from tests.webhook_receiver import Delivery, WebhookReceiver, signature_matches

pytestmark = pytest.mark.integration

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "alertmanager-webhook.schema.json")
                    .read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
OPS_ENV = "SENSOR_INGEST_WEBHOOK_OPS_SECRET"
PAGER_ENV = "SENSOR_INGEST_WEBHOOK_PAGER_SECRET"
WAIT = 60.0  # only bounds a hang


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def config(ops_url: str, pager_url: str) -> str:
    return f"""
[alerts]
retry_max = "2s"

[[webhooks]]
name = "ops"
url = "{ops_url}"
secret_env = "{OPS_ENV}"
timeout = 2.0

[[webhooks]]
name = "pager"
url = "{pager_url}"
secret_env = "{PAGER_ENV}"
body = "alertmanager"
external_url = "https://ingest.example.org/"
timeout = 2.0

[[rules]]
name = "level-high"
metric = "level"
above = 5.0
clear = 4.0
severity = "critical"
webhooks = ["ops", "pager"]
summary = "level at {{device}} is {{value}} (threshold {{threshold}})"
labels = {{ team = "hydro" }}
"""


@pytest.fixture
def receivers() -> Iterator[tuple[WebhookReceiver, WebhookReceiver]]:
    ops, pager = WebhookReceiver().up(), WebhookReceiver().up()
    yield ops, pager
    ops.close()
    pager.close()


def outbox(db: str) -> list[tuple[int, int, str, str]]:
    """(outbox id, event id, webhook, status) in id order."""
    with psycopg.connect(db) as c:
        return c.execute("SELECT id, event_id, webhook, status FROM alert_outbox ORDER BY id").fetchall()


def events(db: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db) as c:
        return c.execute("SELECT id, status, event_time, starts_at, value FROM alert_events ORDER BY id").fetchall()


def signed(d: Delivery, secret: str) -> None:
    assert d.verify(secret) == d.webhook_id
    assert signature_matches(secret, d)
    assert d.headers["content-type"] == "application/json"


def test_each_webhook_gets_its_own_body_kind_for_one_episode(
        tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, ingests: list[IngestProcess],
        receivers: tuple[WebhookReceiver, WebhookReceiver]) -> None:
    ops, pager = receivers
    ops_secret, pager_secret = new_secret(), new_secret()
    cfg = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url,
                       extra=config(ops.url("/hook"), pager.url("/api/v2/alerts/webhook")))
    ingest = IngestProcess(cfg, tmp_path / "ingest.log", env={OPS_ENV: ops_secret, PAGER_ENV: pager_secret})
    ingests.append(ingest)
    ingest.start()
    t0 = (datetime.now(UTC) - timedelta(minutes=30)).replace(second=0, microsecond=0)
    at = [t0 + timedelta(minutes=m) for m in range(5)]
    pub = Publisher(broker.port)
    try:
        # above 5 fires at minute 1; 4.5 is in the hysteresis band (clear = 4); 3.5 resolves at minute 3.
        for i, value in enumerate([3.0, 6.0, 4.5, 3.5, 3.0]):
            pub.publish_all([(f"{topic_prefix}/hn-lv-01/up", native("hn-lv-01", at[i].isoformat(), {"level": value}))])
            wait_until(lambda n=i + 1: ingest.metric("sensor_ingest_messages_acked_total") >= n, WAIT,
                       f"reading {i + 1} committed and acknowledged")
    finally:
        pub.close()

    (firing_id, *firing), (resolved_id, *resolved) = events(database_url)
    assert firing == ["firing", at[1], at[1], 6.0]
    assert resolved == ["resolved", at[3], at[1], 3.5]
    wait_until(lambda: [r[3] for r in outbox(database_url)] == ["delivered"] * 4
               and len(ops.delivered()) == 2 and len(pager.delivered()) == 2, WAIT, "4 deliveries")
    rows = outbox(database_url)
    assert sorted((r[1], r[2]) for r in rows) == sorted(
        (e, w) for e in (firing_id, resolved_id) for w in ("ops", "pager"))
    message = {(event_id, hook): f"msg_{row_id}" for row_id, event_id, hook, _ in rows}
    assert len(ops.requests()) == len(pager.requests()) == 2  # answered 200 at once: one request per event

    # The standard receiver: StandardBody, firing then resolved, and nothing of Alertmanager's.
    first, second = ops.delivered()
    assert [d.webhook_id for d in (first, second)] == [message[(firing_id, "ops")], message[(resolved_id, "ops")]]
    for d in (first, second):
        signed(d, ops_secret)
        assert "version" not in d.json()
    std = [StandardBody.model_validate_json(d.body) for d in (first, second)]
    assert [(b.id, b.status, b.starts_at, b.ends_at, b.value) for b in std] == [
        (f"evt_{firing_id}", "firing", at[1], None, 6.0), (f"evt_{resolved_id}", "resolved", at[1], at[3], 3.5)]

    # The Alertmanager receiver: version 4 payloads that validate, firing then resolved, one fingerprint.
    first, second = pager.delivered()
    assert [d.webhook_id for d in (first, second)] == [message[(firing_id, "pager")],
                                                       message[(resolved_id, "pager")]]
    labels = {"alertname": "level-high", "device": "hn-lv-01", "metric": "level", "severity": "critical",
              "team": "hydro"}
    bodies = []
    for d, event_id in ((first, firing_id), (second, resolved_id)):
        signed(d, pager_secret)
        assert d.path == "/api/v2/alerts/webhook"
        body = d.json()
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(body)]
        assert errors == []
        with pytest.raises(ValidationError):
            StandardBody.model_validate_json(d.body)
        (alert,) = body["alerts"]
        assert alert["labels"] == body["commonLabels"] == labels
        assert alert["annotations"]["event_id"] == f"evt_{event_id}"
        assert (body["version"], body["receiver"], body["externalURL"], body["truncatedAlerts"]) == (
            "4", "pager", "https://ingest.example.org/", 0)
        assert body["groupKey"] == '{}:{alertname="level-high", device="hn-lv-01", metric="level"}'
        assert body["groupLabels"] == {"alertname": "level-high", "device": "hn-lv-01", "metric": "level"}
        bodies.append((body["status"], alert["status"], alert["startsAt"], alert["endsAt"], alert["fingerprint"],
                       alert["annotations"]["value"]))
    start = at[1].strftime("%Y-%m-%dT%H:%M:%SZ")
    end = at[3].strftime("%Y-%m-%dT%H:%M:%SZ")
    assert bodies == [("firing", "firing", start, "0001-01-01T00:00:00Z", fingerprint(labels), "6.0"),
                      ("resolved", "resolved", start, end, fingerprint(labels), "3.5")]
    assert ingest.terminate() == 0
