"""The alert rules of the running service (GET /v1/rules, POST /-/reload, SIGHUP) and the operators'
commands (`sensor-ingest rules list|reload`, `sensor-ingest alerts list|history|deliveries`).

The service is the real process (IngestProcess) with a config holding rules; each command is run as
an operator runs it, in a process of its own whose environment has no webhook secret (only the
service needs it). A reload from a broken file leaves the running set and says why; no answer, log
line or printed row shows the secret.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.integration.harness import IngestProcess, write_config
from tests.services import REPO, Mosquitto, wait_until

HANG = 60  # seconds: a bound on a hang only
SECRET_ENV = "SENSOR_INGEST_WEBHOOK_CITY_OPS_SECRET"
SECRET = "whsec_" + base64.b64encode(b"integration-test-key-never-printed").decode()

WEBHOOK = f"""
[[webhooks]]
name = "city-ops"
url = "http://127.0.0.1:9/hook"
secret_env = "{SECRET_ENV}"
"""


def _rule(name: str, above: float, for_: str = "0s") -> str:
    return f"""
[[rules]]
name = "{name}"
metric = "pm25"
above = {above}
for = "{for_}"
webhooks = ["city-ops"]
"""


def _command(*args: str) -> subprocess.CompletedProcess[str]:
    """`sensor-ingest ARGS` in a process of its own, without the service's environment (no secret)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSOR_INGEST_")}
    return subprocess.run([sys.executable, "-m", "ingest", *args], capture_output=True, text=True, timeout=HANG,
                          env=env, cwd=REPO, check=False)


def _rules(ingest: IngestProcess) -> dict[str, float]:
    """The active rules' thresholds by name, from GET /v1/rules."""
    response = httpx.get(f"http://{ingest.http}/v1/rules", timeout=5)
    assert response.status_code == 200, response.text
    assert SECRET not in response.text
    return {r["name"]: r["threshold"] for r in response.json()["rules"]}


def _config(tmp_path: Path, database_url: str, broker: Mosquitto, prefix: str, rules: str) -> Path:
    return write_config(tmp_path / "ingest.toml", prefix=prefix, database_url=database_url, mqtt_url=broker.url,
                        extra=WEBHOOK + rules)


def _rewrite(config: Path, rules: str) -> None:
    """The same file with other rules: everything up to the first [[webhooks]] is kept."""
    head = config.read_text().split("[[webhooks]]", 1)[0].rstrip("\n")
    config.write_text(head + "\n" + WEBHOOK + rules)


def test_rules_are_listed_reloaded_by_the_command_and_by_sighup_and_a_broken_file_changes_nothing(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, ingests: list[IngestProcess]
) -> None:
    config = _config(tmp_path, database_url, broker, topic_prefix, _rule("pm25-high", 55.5, "2m"))
    log = tmp_path / "ingest.log"
    ingest = IngestProcess(config, log, env={SECRET_ENV: SECRET})
    ingests.append(ingest)
    ingest.start()

    # The active set, from the service and through the command (which has no secret of its own).
    assert _rules(ingest) == {"pm25-high": 55.5}
    listed = _command("rules", "list", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    view: dict[str, Any] = json.loads(listed.stdout)
    assert [(r["name"], r["metric"], r["kind"], r["for"], r["webhooks"]) for r in view["rules"]] == [
        ("pm25-high", "pm25", "above", 120.0, [{"name": "city-ops", "url": "http://127.0.0.1:9/hook"}])]
    assert view["config"] == str(config)
    table = _command("rules", "list", "--config", str(config))
    assert table.returncode == 0, table.stderr
    assert "pm25-high" in table.stdout
    assert "> 55.5" in table.stdout

    # Edited: `rules reload` swaps the set and says what changed.
    _rewrite(config, _rule("pm25-high", 75.0, "2m") + _rule("pm25-very-high", 150.0))
    reloaded = _command("rules", "reload", "--config", str(config))
    assert reloaded.returncode == 0, reloaded.stderr
    assert "rule(s) added: pm25-very-high" in reloaded.stdout
    assert "rule(s) changed: pm25-high (threshold)" in reloaded.stdout
    assert _rules(ingest) == {"pm25-high": 75.0, "pm25-very-high": 150.0}

    # Broken: the service keeps its set, the command exits 1 and prints each problem with its fix.
    _rewrite(config, _rule("pm25-high", 10.0, "soon") + _rule("pm25-high", 20.0))
    refused = _command("rules", "reload", "--config", str(config))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "the active set stays (2 rule(s), 1 webhook(s))" in refused.stderr
    assert "rules[0] (pm25-high).for: for: 'soon' is not a duration" in refused.stderr
    assert "(fix: write a duration such as" in refused.stderr
    assert _rules(ingest) == {"pm25-high": 75.0, "pm25-very-high": 150.0}
    assert ingest.running

    # SIGHUP reloads too.
    _rewrite(config, _rule("pm25-low", 35.0))
    assert ingest.proc is not None
    ingest.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _rules(ingest) == {"pm25-low": 35.0}, HANG, "the rules of the file after SIGHUP")
    assert ingest.running
    assert ingest.terminate() == 0

    text = log.read_text()
    assert "rules reload: rules[0] (pm25-high).for: for: 'soon' is not a duration" in text
    assert "rules reload: rule(s) added: pm25-low" in text
    for output in (text, listed.stdout, table.stdout, reloaded.stdout, refused.stderr):
        assert SECRET not in output
        assert SECRET.removeprefix("whsec_") not in output


def _seed_alerts(url: str) -> None:
    """A firing, a pending and an ok series, their events, and deliveries in each status."""
    with psycopg.connect(url) as c:
        device = c.execute("INSERT INTO devices (uid) VALUES ('hn-aq-001') RETURNING id").fetchone()
        other = c.execute("INSERT INTO devices (uid) VALUES ('hn-wl-007') RETURNING id").fetchone()
        metric = c.execute("INSERT INTO metrics (name) VALUES ('pm25') RETURNING id").fetchone()
        assert device is not None
        assert other is not None
        assert metric is not None
        d, w, m = device[0], other[0], metric[0]
        c.execute(
            "INSERT INTO alert_state (rule, device_id, metric_id, status, episode_start, last_time, last_value)"
            " VALUES ('pm25-high', %(d)s, %(m)s, 'firing', '2026-11-25T03:00:00Z', '2026-11-25T03:05:00Z', 80.5),"
            " ('pm25-high', %(w)s, %(m)s, 'pending', '2026-11-25T03:04:00Z', '2026-11-25T03:04:30Z', 60),"
            " ('pm25-very-high', %(d)s, %(m)s, 'ok', NULL, '2026-11-25T03:05:00Z', 80.5)",
            {"d": d, "w": w, "m": m})
        events = c.execute(
            "INSERT INTO alert_events (rule, device_id, metric_id, status, event_time, starts_at, value, threshold,"
            " severity, notified) VALUES"
            " ('pm25-high', %(d)s, %(m)s, 'firing', '2026-11-24T01:00:00Z', '2026-11-24T01:00:00Z', 70, 55.5,"
            "  'warning', true),"
            " ('pm25-high', %(d)s, %(m)s, 'resolved', '2026-11-24T02:00:00Z', '2026-11-24T01:00:00Z', 40, 55.5,"
            "  'warning', true),"
            " ('pm25-high', %(d)s, %(m)s, 'firing', '2026-11-25T03:00:00Z', '2026-11-25T03:00:00Z', 80.5, 55.5,"
            "  'warning', true) RETURNING id", {"d": d, "m": m}).fetchall()
        first, second, third = (e[0] for e in events)
        series = f"pm25-high\x1f{d}\x1f{m}"
        c.execute(
            "INSERT INTO alert_outbox (event_id, webhook, series, body, status, attempts, delivered_at,"
            " last_status, last_error) VALUES"
            " (%(a)s, 'city-ops', %(s)s, '{}', 'delivered', 1, now(), 200, NULL),"
            " (%(b)s, 'city-ops', %(s)s, '{}', 'failed', 7, NULL, 500,"
            "  'gave up after max_age: http://ops:hunter2@10.0.0.9/hook answered 500'),"
            " (%(c)s, 'city-ops', %(s)s, '{}', 'pending', 2, NULL, NULL, 'connection refused')",
            {"a": first, "b": second, "c": third, "s": series})


def test_alerts_commands_read_state_events_and_deliveries(tmp_path: Path, database_url: str) -> None:
    _seed_alerts(database_url)
    config = tmp_path / "cli.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n' + WEBHOOK + _rule("pm25-high", 55.5))

    def run(*args: str) -> Any:
        done = _command("alerts", *args, "--config", str(config), "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    active = run("list")
    assert [(a["rule"], a["device"], a["status"], a["severity"], a["threshold"]) for a in active] == [
        ("pm25-high", "hn-aq-001", "firing", "warning", 55.5), ("pm25-high", "hn-wl-007", "pending", None, None)]
    assert active[0]["since"] == "2026-11-25T03:00:00+00:00"
    assert [a["device"] for a in run("list", "--firing")] == ["hn-aq-001"]
    assert len(run("list", "--all")) == 3

    history = run("history", "--rule", "pm25-high", "--device", "hn-aq-*")
    assert [(e["status"], e["value"]) for e in history] == [("firing", 80.5), ("resolved", 40), ("firing", 70)]
    assert [e["status"] for e in run("history", "--since", "2026-11-25T00:00:00Z")] == ["firing"]
    assert run("history", "--limit", "1")[0]["event_time"] == "2026-11-25T03:00:00+00:00"
    assert run("history", "--device", "hn-wl-*") == []

    failed = run("deliveries", "--failed")
    assert [(d["status"], d["attempts"], d["last_status"], d["event"]) for d in failed] == [
        ("failed", 7, 500, "resolved")]
    assert {d["status"] for d in run("deliveries", "--failed", "--pending")} == {"failed", "pending"}
    assert len(run("deliveries", "--webhook", "city-ops")) == 3
    assert run("deliveries", "--webhook", "elsewhere") == []

    table = _command("alerts", "deliveries", "--failed", "--config", str(config))
    assert table.returncode == 0, table.stderr
    assert "failed" in table.stdout
    assert "city-ops" in table.stdout
    assert "hunter2" not in table.stdout  # a password in a stored error is masked when shown
    listed = _command("alerts", "list", "--config", str(config))
    assert "hn-aq-001" in listed.stdout
    assert "2026-11-25 03:00:00Z" in listed.stdout
