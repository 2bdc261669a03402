"""`sensor-ingest rules check`, AlertRuntime.reload, GET /v1/rules and POST /-/reload (ingest/alerts/cli.py,
ingest/alerts/runtime.py, ingest/http.py).

Each mistake in the rules is reported with the rule (or webhook) it is in, the key and the fix; a
reload from a bad file keeps the running set; no output shows a webhook secret.
"""

from __future__ import annotations

import base64
import logging
import socket
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from ingest.alerts.runtime import AlertRuntime, RuleSet, load_rules
from ingest.cli import main
from ingest.http import create_app
from ingest.metrics import Metrics

SECRET_ENV = "SENSOR_INGEST_WEBHOOK_CITY_OPS_SECRET"
KEY = b"\x07secret-key-bytes-that-must-not-leak!"
SECRET = "whsec_" + base64.b64encode(KEY).decode()

WEBHOOK = f"""
[[webhooks]]
name = "city-ops"
url = "http://127.0.0.1:9000/hook?token=abc123"
secret_env = "{SECRET_ENV}"
timeout = 5.0
max_age = "24h"
"""

RULE = """
[[rules]]
name = "pm25-high"
metric = "pm2_5"
devices = ["hn-aq-*"]
where = { district = "hoan-kiem" }
above = 55.5
clear = 50.0
for = "2m"
severity = "warning"
webhooks = ["city-ops"]
summary = "PM2.5 at {device} is {value} (threshold {threshold})"
labels = { team = "environment" }
"""

RIVER = """
[[rules]]
name = "river-level"
metric = "water_level"
outside = [0.2, 4.5]
clear = [0.3, 4.0]
severity = "critical"
webhooks = ["city-ops"]
"""


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return SECRET


def _write(tmp_path: Path, text: str, name: str = "ingest.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _no_secret(text: str) -> None:
    assert SECRET not in text
    assert SECRET.removeprefix("whsec_") not in text
    assert "abc123" not in text  # the URL's token= query parameter is masked too


@pytest.mark.usefixtures("_restore_logging", "secret")
def test_check_lists_a_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, WEBHOOK + RULE + RIVER)

    assert main(["rules", "check", str(path)]) == 0

    out, err = capsys.readouterr()
    assert f"{path}: OK: 2 rule(s), 1 webhook(s)" in out
    for shown in ("pm25-high", "pm2_5", "> 55.5", "river-level", "outside [0.2, 4.5]", "[0.3, 4]", "2m",
                  "city-ops", "hn-aq-* where district=hoan-kiem", "team=environment"):
        assert shown in out
    _no_secret(out + err)


@pytest.mark.usefixtures("_restore_logging", "secret")
def test_check_json_is_the_view_of_get_v1_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    path = _write(tmp_path, WEBHOOK + RULE + RIVER)

    assert main(["rules", "check", "--json", str(path)]) == 0

    out, _ = capsys.readouterr()
    view = json.loads(out)
    pm25, river = view["rules"]
    assert pm25 == {
        "name": "pm25-high", "metric": "pm2_5", "signal": "value", "kind": "above", "threshold": 55.5, "clear": 50.0,
        "for": 120.0,
        "severity": "warning", "webhooks": [{"name": "city-ops", "url": "http://127.0.0.1:9000/hook?token=***"}],
        "devices": ["hn-aq-*"], "where": {"district": "hoan-kiem"}, "labels": {"team": "environment"},
        "summary": "PM2.5 at {device} is {value} (threshold {threshold})",
    }
    assert (river["kind"], river["threshold"], river["clear"], river["for"]) == ("outside", [0.2, 4.5], [0.3, 4.0], 0)
    _no_secret(out)


# (what to change in the valid file, what the one problem must say: the rule, the key, the fix)
MISTAKES = {
    "two of above, below, outside": (
        RULE.replace("above = 55.5", "above = 55.5\nbelow = 5"),
        ["rules[0] (pm25-high)", "rule 'pm25-high' sets above and below", "fix: set exactly one"]),
    "unknown webhook": (
        RULE.replace('webhooks = ["city-ops"]', 'webhooks = ["city-opz"]'),
        ["rules[0] (pm25-high).webhooks", "no [[webhooks]] entry is named 'city-opz'", "fix: add it, or use one of",
         "city-ops"]),
    "clear on the wrong side": (
        RULE.replace("clear = 50.0", "clear = 60.0"),
        ["rules[0] (pm25-high)", "clear = 60 is above the threshold 55.5", "fix: set clear at or below above"]),
    "bad duration": (
        RULE.replace('for = "2m"', 'for = "2 minutes"'),
        ["rules[0] (pm25-high).for", "'2 minutes' is not a duration", 'fix: write a duration such as "30s"']),
    "unknown summary field": (
        RULE.replace("(threshold {threshold})", "at {station}"),
        ["rules[0] (pm25-high).summary", "summary names {station}, which is not a field", "fix: use {device}"]),
    "duplicate names": (
        RULE + RULE.replace("above = 55.5", "above = 150.0").replace("clear = 50.0", ""),
        ["rules[1] (pm25-high)", "a second rule named 'pm25-high'", "fix: give each rule its own name"]),
}


@pytest.mark.usefixtures("_restore_logging", "secret")
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_check_names_the_rule_the_key_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mistake: str
) -> None:
    rules, said = MISTAKES[mistake]
    path = _write(tmp_path, WEBHOOK + rules)

    assert main(["rules", "check", str(path)]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert f"sensor-ingest: {path}: 1 problem(s)\n" in err
    problem = err.splitlines()[-1]
    for part in said:
        assert part in problem, f"{mistake}: {part!r} not in {problem!r}"
    _no_secret(err)


@pytest.mark.usefixtures("_restore_logging")
def test_check_names_a_missing_secret_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    path = _write(tmp_path, WEBHOOK + RULE)

    assert main(["rules", "check", str(path)]) == 1

    problem = capsys.readouterr().err.splitlines()[-1]
    assert f"webhooks[0] (city-ops).secret_env: {SECRET_ENV} is not set in the environment" in problem
    assert f"(fix: set {SECRET_ENV} in the service's environment to whsec_" in problem


@pytest.mark.usefixtures("_restore_logging")
def test_check_refuses_a_secret_that_is_not_whsec_and_does_not_print_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "hunter2-is-my-password")
    path = _write(tmp_path, WEBHOOK + RULE)

    assert main(["rules", "check", str(path)]) == 1

    err = capsys.readouterr().err
    problem = err.splitlines()[-1]
    assert f"webhooks[0] (city-ops).secret_env: the value of {SECRET_ENV} is not a Standard Webhooks secret" in problem
    assert "fix: whsec_ and the base64" in problem
    assert "hunter2" not in err


@pytest.mark.usefixtures("_restore_logging", "secret")
def test_check_lists_every_problem_each_with_its_own_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Found together by compile_alerts (after the keys themselves are valid): one line each.
    rules = (RULE.replace('webhooks = ["city-ops"]', 'webhooks = ["nowhere"]') + RULE
             + WEBHOOK.replace(SECRET_ENV, "SENSOR_INGEST_WEBHOOK_UNSET_SECRET"))
    path = _write(tmp_path, WEBHOOK + rules)

    assert main(["rules", "check", str(path)]) == 1

    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"sensor-ingest: {path}: 3 problem(s)"
    assert lines[1].startswith("  - webhooks[1] (city-ops): a second webhook named 'city-ops' (fix: give each")
    assert lines[2].startswith("  - rules[0] (pm25-high).webhooks: no [[webhooks]] entry is named 'nowhere' (fix:")
    assert lines[3].startswith("  - rules[1] (pm25-high): a second rule named 'pm25-high' (fix: give each rule")


# -- reload -----------------------------------------------------------------------------------------------


def _runtime(path: Path) -> tuple[AlertRuntime, list[RuleSet]]:
    active, problems = load_rules(path)
    assert active is not None, problems
    runtime = AlertRuntime(active, config=path)
    changes: list[RuleSet] = []
    runtime.on_change(changes.append)
    return runtime, changes


@pytest.mark.usefixtures("secret")
def test_reload_keeps_the_old_set_on_a_bad_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, WEBHOOK + RULE + RIVER)
    runtime, changes = _runtime(path)
    before = runtime.active
    path.write_text(WEBHOOK + RULE.replace('for = "2m"', 'for = "soon"') + RIVER.replace("clear = [0.3, 4.0]",
                                                                                        "clear = [0.1, 4.0]"))

    with caplog.at_level(logging.ERROR, logger="ingest.alerts.runtime"):
        ok, text = runtime.reload()

    assert not ok
    assert runtime.active is before
    assert runtime.rules_for("pm2_5")[0].for_seconds == 120
    assert changes == []
    assert text.splitlines()[0] == (f"rules not reloaded from {path}: 2 problem(s); the active set stays "
                                    "(2 rule(s), 1 webhook(s))")
    assert "rules[0] (pm25-high).for: for: 'soon' is not a duration" in text
    assert "rules[1] (river-level): rule 'river-level': clear = [0.1, 4] must lie inside outside" in text
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert logged[0] == text.splitlines()[0]
    assert [m.removeprefix("rules reload: ") for m in logged[1:]] == [
        line.removeprefix("  - ") for line in text.splitlines()[1:]]
    _no_secret(text + caplog.text)


@pytest.mark.usefixtures("secret")
def test_reload_swaps_a_good_file_once_and_says_what_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path, WEBHOOK + RULE + RIVER)
    runtime, changes = _runtime(path)
    extra = RULE.replace("pm25-high", "pm25-very-high").replace("above = 55.5", "above = 150.0")
    path.write_text(WEBHOOK + RULE.replace("above = 55.5", "above = 75.0").replace('"2m"', '"5m"') + extra)

    with caplog.at_level(logging.INFO, logger="ingest.alerts.runtime"):
        ok, summary = runtime.reload()

    assert ok, summary
    assert len(changes) == 1
    assert changes[0] is runtime.active
    assert [r.name for r in runtime.active.rules] == ["pm25-high", "pm25-very-high"]
    assert [r.threshold for r in runtime.rules_for("pm2_5")] == [75.0, 150.0]
    assert runtime.rules_for("water_level") == ()
    assert summary == (f"rules reloaded from {path}: 2 rule(s), 1 webhook(s); rule(s) added: pm25-very-high; "
                       "rule(s) removed: river-level; rule(s) changed: pm25-high (threshold, for_seconds)")
    assert "rules reload: rule(s) removed: river-level" in caplog.messages

    # The same file again: replaced (one more call), and said to change nothing.
    ok, summary = runtime.reload()
    assert ok
    assert summary == f"rules reloaded from {path}: no change (2 rule(s), 1 webhook(s))"
    assert len(changes) == 2


def test_reload_without_a_config_file_keeps_the_set() -> None:
    runtime = AlertRuntime(RuleSet())
    ok, text = runtime.reload()
    assert not ok
    assert "started without --config" in text


# -- the HTTP endpoints the commands ask ---------------------------------------------------------------


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest")


@pytest.mark.asyncio
@pytest.mark.usefixtures("secret")
async def test_get_rules_and_post_reload(tmp_path: Path) -> None:
    path = _write(tmp_path, WEBHOOK + RULE)
    runtime, changes = _runtime(path)
    client = _client(create_app(Metrics(), lambda: {}, alerts=runtime))

    got = await client.get("/v1/rules")
    assert got.status_code == 200
    body = got.json()
    assert [r["name"] for r in body["rules"]] == ["pm25-high"]
    assert body["rules"][0]["for"] == 120.0
    assert body["webhooks"] == [{"name": "city-ops", "url": "http://127.0.0.1:9000/hook?token=***"}]
    assert body["config"] == str(path)
    _no_secret(got.text)

    path.write_text(WEBHOOK + RULE.replace("above = 55.5", "above = 55.5\nbelow = 5"))
    refused = await client.post("/-/reload")
    assert refused.status_code == 422
    assert refused.json()["reloaded"] is False
    assert "rules[0] (pm25-high): rule 'pm25-high' sets above and below" in refused.json()["message"]
    assert changes == []

    path.write_text(WEBHOOK + RULE + RIVER)
    taken = await client.post("/-/reload")
    assert taken.status_code == 200
    assert taken.json() == {"reloaded": True, "message": f"rules reloaded from {path}: 2 rule(s), 1 webhook(s); "
                            "rule(s) added: river-level"}
    assert [r["name"] for r in (await client.get("/v1/rules")).json()["rules"]] == ["pm25-high", "river-level"]
    assert len(changes) == 1
    await client.aclose()


@pytest.mark.asyncio
async def test_without_alerts_the_app_has_no_rules_endpoints() -> None:
    async with _client(create_app(Metrics(), lambda: {})) as client:
        assert (await client.get("/v1/rules")).status_code == 404
        assert (await client.post("/-/reload")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200


# -- the client commands, when there is nothing to ask ------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize("action", ["reload", "list"])
def test_rules_client_says_how_to_check_an_unreachable_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    # The rules are broken and the secret is not in this environment: the address is still read.
    port = _closed_port()
    path = _write(tmp_path, f'[http]\naddr = "127.0.0.1:{port}"\n' + WEBHOOK
                  + RULE.replace('for = "2m"', 'for = "whenever"'))

    assert main(["rules", action, "--config", str(path)]) == 2

    err = capsys.readouterr().err
    assert f"cannot reach the service at http://127.0.0.1:{port}" in err
    assert f"curl http://127.0.0.1:{port}/healthz" in err
    assert f"http.addr in {path}" in err


@pytest.mark.usefixtures("_restore_logging")
def test_alerts_client_says_when_the_database_cannot_be_read(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _closed_port()
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", f"postgresql://ingest@127.0.0.1:{port}/sensor_ingest")
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_PASSWORD", "pg-password-never-shown")

    assert main(["alerts", "deliveries", "--failed"]) == 2

    err = capsys.readouterr().err
    assert f"cannot reach the database at postgresql://ingest@127.0.0.1:{port}/sensor_ingest" in err
    assert "pg-password-never-shown" not in err


@pytest.mark.parametrize("command", [["rules"], ["rules", "check"], ["rules", "list"], ["rules", "reload"],
                                     ["alerts"], ["alerts", "list"], ["alerts", "history"],
                                     ["alerts", "deliveries"]])
def test_help_explains_each_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sensor-ingest {' '.join(command)}")
    assert "SENSOR_INGEST_" in out or "secret_env" in out


# -- `rules list` of the no_data, rate and window kinds (the body of GET /v1/rules, printed) -------------------


def _listed(body: dict[str, object], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """The table rows `rules list` prints for BODY, by rule name (as _rules_list reads the answer)."""
    from ingest.alerts.cli import _print_rules
    from ingest.alerts.runtime import RuleSetView

    _print_rules(RuleSetView.model_validate(body).model_dump(mode="json", by_alias=True))
    out = capsys.readouterr().out
    return {line.split()[0]: line for line in out.splitlines() if line.split()}


KINDS = """
[[rules]]
name = "gateway-silent"
no_data = "30m"
per = "device"
devices = ["hn-gw-*"]
webhooks = ["city-ops"]

[[rules]]
name = "level-silent"
metric = "water_level"
no_data = "15m"

[[rules]]
name = "river-falling"
metric = "water_level"
rate = { over = "10m", below = -0.5 }
clear = -0.2

[[rules]]
name = "noise-max"
metric = "noise"
window = { agg = "max", over = "5m", align = "rolling" }
outside = [30, 85]
"""


@pytest.mark.usefixtures("secret")
def test_rules_list_shows_each_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ingest.alerts.runtime import view_of

    active, problems = load_rules(_write(tmp_path, WEBHOOK + RULE + KINDS))
    assert active is not None, problems
    rows = _listed(view_of(active).model_dump(mode="json", by_alias=True), capsys)

    assert "> 55.5" in rows["pm25-high"]
    assert "any metric" in rows["gateway-silent"]
    assert "no data for 30m (per device)" in rows["gateway-silent"]
    assert "hn-gw-*" in rows["gateway-silent"]
    assert "city-ops" in rows["gateway-silent"]
    assert "no data for 15m " in rows["level-silent"]
    assert "(per device)" not in rows["level-silent"]
    assert "rate over 10m < -0.5/min" in rows["river-falling"]
    assert "-0.2/min" in rows["river-falling"]
    assert "max over 5m (rolling) outside [30, 85]" in rows["noise-max"]


def test_rules_list_reads_an_older_and_a_newer_service(capsys: pytest.CaptureFixture[str]) -> None:
    rule = {"name": "r", "metric": "m", "kind": "above", "threshold": 5.0, "clear": 4.0, "for": 0.0,
            "severity": "warning", "webhooks": [], "devices": [], "where": {}, "labels": {}, "summary": ""}
    base: dict[str, object] = {"config": None, "webhooks": [], "max_notify_age": 3600.0, "retry_max": 300.0}
    # Before the kinds: no signal.
    assert "> 5" in _listed({**base, "rules": [rule]}, capsys)["r"]
    # A kind this release does not know, with its own keys: listed by its threshold, not refused.
    newer = {**rule, "signal": "forecast", "forecast": {"horizon": 3600}}
    assert "> 5" in _listed({**base, "rules": [newer]}, capsys)["r"]
