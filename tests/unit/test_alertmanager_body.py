"""body = "alertmanager" (issue #16): the Alertmanager webhook payload (version 4) of an event, its
fingerprint, times and receiver as Alertmanager writes them, and the config that turns it on.

Every body is checked against tests/schemas/alertmanager-webhook.schema.json, a strict JSON Schema of
the payload written from Alertmanager's docs and Go types (each rule names its source); the schema
itself is shown to refuse the mistakes that break real receivers, so a pass means something.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import socket
import string
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.alerts.body import (
    AlertmanagerBody,
    Annotations,
    StandardBody,
    alertmanager_body,
    fingerprint,
    rfc3339,
)
from ingest.alerts.settings import RuleSettings, WebhookSettings, compile_alerts
from ingest.errors import ConfigError
from ingest.settings import load_settings

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schemas" / "alertmanager-webhook.schema.json"
SCHEMA = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
T0 = datetime(2026, 11, 25, 3, 1, tzinfo=UTC)


def check(body: dict[str, Any]) -> None:
    """The body validates against the kept schema (every error listed if not)."""
    errors = sorted(VALIDATOR.iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def event(status: str = "firing", **changes: Any) -> StandardBody:
    fields: dict[str, Any] = {
        "id": "evt_7", "status": status, "rule": "level-high", "severity": "critical", "device": "hn-lv-01",
        "metric": "level", "value": 5.5 if status == "firing" else 3.9, "unit": "m", "threshold": 5.0,
        "starts_at": T0, "ends_at": T0 + timedelta(minutes=5) if status == "resolved" else None,
        "event_time": T0 + timedelta(minutes=5) if status == "resolved" else T0,
        "labels": {"team": "hydro"},
        "annotations": Annotations(summary="level at hn-lv-01 is 5.5 (threshold 5.0)"),
        "device_attributes": {"district": "hoan-kiem"},
    }
    fields.update(changes)
    return StandardBody(**fields)


def wire(body: AlertmanagerBody) -> dict[str, Any]:
    """What a receiver parses: the JSON text the outbox stores."""
    parsed: dict[str, Any] = json.loads(body.model_dump_json())
    return parsed


LABELS = {"alertname": "level-high", "device": "hn-lv-01", "metric": "level", "severity": "critical", "team": "hydro"}
# FNV-1a 64 of LABELS, from the research port of prometheus/common's labelSetToFingerprint
# (/tmp/amresearch/fp_check.py, itself checked against upstream's test vectors below): an independent value.
LABELS_FINGERPRINT = "01bab2ecc7b161b9"


# --- the mapping, firing and resolved ----------------------------------------------------------------


def test_a_firing_event_is_one_firing_alert_with_the_zero_end_time() -> None:
    body = wire(alertmanager_body(event("firing"), "pager", "https://ingest.example.org/"))
    check(body)
    annotations = {
        "summary": "level at hn-lv-01 is 5.5 (threshold 5.0)",
        "description": "level at hn-lv-01 is 5.5 m (threshold 5.0 m; rule level-high, severity critical)",
        "value": "5.5", "threshold": "5.0", "unit": "m", "event_time": "2026-11-25T03:01:00Z", "event_id": "evt_7",
    }
    assert body == {
        "version": "4",
        "groupKey": '{}:{alertname="level-high", device="hn-lv-01", metric="level"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "pager",
        "groupLabels": {"alertname": "level-high", "device": "hn-lv-01", "metric": "level"},
        "commonLabels": LABELS,
        "commonAnnotations": annotations,
        "externalURL": "https://ingest.example.org/",
        "alerts": [{
            "status": "firing", "labels": LABELS, "annotations": annotations, "startsAt": "2026-11-25T03:01:00Z",
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": LABELS_FINGERPRINT,
        }],
    }


def test_a_resolved_event_ends_at_the_resolving_reading_and_keeps_the_fingerprint() -> None:
    firing = wire(alertmanager_body(event("firing"), "pager", "http://h/"))
    resolved = wire(alertmanager_body(event("resolved"), "pager", "http://h/"))
    check(resolved)
    assert resolved["status"] == "resolved"
    (alert,) = resolved["alerts"]
    assert alert["status"] == "resolved"
    assert alert["startsAt"] == "2026-11-25T03:01:00Z"  # the episode's start, as when it fired
    assert alert["endsAt"] == "2026-11-25T03:06:00Z"
    assert alert["fingerprint"] == firing["alerts"][0]["fingerprint"] == LABELS_FINGERPRINT
    assert alert["labels"] == firing["alerts"][0]["labels"]
    assert resolved["groupKey"] == firing["groupKey"]
    assert alert["annotations"]["description"] == ("level at hn-lv-01 is back to 3.9 m (threshold 5.0 m; "
                                                   "rule level-high, severity critical)")
    assert alert["annotations"]["event_time"] == "2026-11-25T03:06:00Z"
    assert resolved["commonAnnotations"] == alert["annotations"]


def test_each_series_is_its_own_group() -> None:
    """One payload is one series' event, so its group is the series: a receiver keying incidents on
    groupKey keeps two devices of one rule apart (one resolving does not close the other's)."""
    keys = {wire(alertmanager_body(event(**c), "pager", "http://h/"))["groupKey"]
            for c in ({}, {"device": "hn-lv-02"}, {"metric": "flow"}, {"rule": "level-low"})}
    assert len(keys) == 4
    assert wire(alertmanager_body(event("resolved"), "pager", "http://h/"))["groupKey"] == \
        wire(alertmanager_body(event("firing"), "pager", "http://h/"))["groupKey"]


def test_group_key_values_are_quoted_as_go_quotes_them() -> None:
    body = wire(alertmanager_body(event(device='tram "A"\\01 Hà Nội'), "pager", "http://h/"))
    check(body)
    assert body["groupKey"] == '{}:{alertname="level-high", device="tram \\"A\\"\\\\01 Hà Nội", metric="level"}'


def test_a_metric_without_a_unit_has_no_unit_annotation() -> None:
    body = wire(alertmanager_body(event(unit=None), "pager", "http://h/"))
    check(body)
    assert "unit" not in body["alerts"][0]["annotations"]
    assert body["alerts"][0]["annotations"]["description"] == ("level at hn-lv-01 is 5.5 (threshold 5.0; "
                                                               "rule level-high, severity critical)")


def test_a_description_given_is_the_description_of_the_alert_and_of_the_group() -> None:
    # The stage gives the words of the rule's kind for a no_data, rate or window event (a silence in
    # seconds is not "back to 1803 s"); a per-device silence is on metric "*", a label value as any.
    said = "gateway-silent: hn-gw-1 reports again after 1803.25 s of silence"
    silence = event("resolved", rule="gateway-silent", device="hn-gw-1", metric="*", value=1803.25, unit="s",
                    threshold=1800.0)
    body = wire(alertmanager_body(silence, "pager", "http://h/", said))
    check(body)
    (alert,) = body["alerts"]
    assert alert["annotations"]["description"] == body["commonAnnotations"]["description"] == said
    assert alert["annotations"]["summary"] == "level at hn-lv-01 is 5.5 (threshold 5.0)"  # the event's own
    assert (alert["labels"]["metric"], body["groupLabels"]["metric"]) == ("*", "*")
    assert body["groupKey"] == '{}:{alertname="gateway-silent", device="hn-gw-1", metric="*"}'
    # Given none (a threshold rule's event), the description is the value against the threshold.
    plain = wire(alertmanager_body(silence, "pager", "http://h/"))
    assert plain["alerts"][0]["annotations"]["description"] == (
        "* at hn-gw-1 is back to 1803.25 s (threshold 1800.0 s; rule gateway-silent, severity critical)")
    assert {k: v for k, v in plain["alerts"][0].items() if k != "annotations"} == \
        {k: v for k, v in alert.items() if k != "annotations"}  # the description changes nothing else


def test_the_event_fields_win_over_a_rule_label_of_the_same_name() -> None:
    # compile_alerts refuses such a rule for an alertmanager webhook; the builder still never lets a
    # rule label hide the rule's name or the device.
    body = wire(alertmanager_body(event(labels={"device": "other", "alertname": "x"}), "pager", "http://h/"))
    assert body["alerts"][0]["labels"]["device"] == "hn-lv-01"
    assert body["alerts"][0]["labels"]["alertname"] == "level-high"


@pytest.mark.parametrize(("name", "sent"), [
    ("pager", "pager"), ("city-ops", "city-ops"), ("team_1", "team_1"),
    ("team.ops", "team\\.ops"),  # template.go: Receiver is regexp.QuoteMeta(name)
])
def test_the_receiver_is_the_webhook_name_quoted_as_alertmanager_quotes_it(name: str, sent: str) -> None:
    assert wire(alertmanager_body(event(), name, "http://h/"))["receiver"] == sent


# --- fingerprint --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("labels", "expected"), [
    # prometheus/common model/signature_test.go TestLabelsToSignature and
    # model/fingerprinting_test.go TestMetricToFingerprint: 14695981039346656037 and 5799056148416392346.
    ({}, f"{14695981039346656037:016x}"),
    ({"name": "garland, briggs", "fear": "love is not enough"}, f"{5799056148416392346:016x}"),
    # prometheus/alertmanager template/template_test.go TestData: the Fingerprint of each alert.
    ({"severity": "warning", "job": "foo"}, "9266ef3da838ad95"),
    ({"severity": "critical", "job": "foo"}, "3b15fd163d36582e"),
])
def test_fingerprint_equals_upstreams_published_test_values(labels: dict[str, str], expected: str) -> None:
    assert fingerprint(labels) == expected


def test_fingerprint_pads_to_sixteen_hex_digits() -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint({"a": "b"}))
    assert fingerprint({}) == "cbf29ce484222325"


@given(st.dictionaries(st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True), st.text(max_size=12),
                       min_size=1, max_size=8), st.randoms())
def test_fingerprint_does_not_depend_on_label_order(labels: dict[str, str], rnd: Any) -> None:
    items = list(labels.items())
    rnd.shuffle(items)
    assert fingerprint(dict(items)) == fingerprint(labels)


def test_fingerprint_separates_names_from_values() -> None:
    assert fingerprint({"a": "bc"}) != fingerprint({"ab": "c"})
    assert fingerprint({"a": "b"}) != fingerprint({"a": "c"})
    assert fingerprint({"a": ""}) != fingerprint({})


# --- times --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "text"), [
    (datetime(2026, 1, 1, 12, tzinfo=UTC), "2026-01-01T12:00:00Z"),
    (datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=UTC), "2026-01-01T12:00:00.123Z"),
    (datetime(2026, 1, 1, 12, 0, 0, 1, tzinfo=UTC), "2026-01-01T12:00:00.000001Z"),
    (datetime(2026, 1, 1, 19, tzinfo=timezone(timedelta(hours=7))), "2026-01-01T12:00:00Z"),
])
def test_times_are_rfc3339_in_utc_as_go_writes_them(t: datetime, text: str) -> None:
    assert rfc3339(t) == text


def test_a_time_without_a_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        rfc3339(datetime(2026, 1, 1, 12))


def test_a_starts_at_in_another_zone_is_sent_in_utc() -> None:
    hanoi = timezone(timedelta(hours=7))
    body = wire(alertmanager_body(event(starts_at=T0.astimezone(hanoi)), "pager", "http://h/"))
    check(body)
    assert body["alerts"][0]["startsAt"] == "2026-11-25T03:01:00Z"


# --- any event validates -------------------------------------------------------------------------------

_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_LABEL_NAMES = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,12}", fullmatch=True).filter(
    lambda n: n not in {"alertname", "device", "metric", "severity"})
_TIMES = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))


@given(status=st.sampled_from(["firing", "resolved"]), rule=_NAMES, receiver=_NAMES, device=st.text(min_size=1),
       metric=st.text(string.ascii_lowercase + "_", min_size=1),
       value=st.floats(allow_nan=False, allow_infinity=False), unit=st.none() | st.text(min_size=1, max_size=8),
       start=_TIMES, later=st.timedeltas(timedelta(0), timedelta(days=30)),
       labels=st.dictionaries(_LABEL_NAMES, st.text(max_size=20), max_size=5), summary=st.text(max_size=50))
def test_every_event_gives_a_body_the_schema_accepts(status: str, rule: str, receiver: str, device: str, metric: str,
                                                     value: float, unit: str | None, start: datetime,
                                                     later: timedelta, labels: dict[str, str], summary: str) -> None:
    end = start + later + timedelta(microseconds=1)
    e = event(status, rule=rule, device=device, metric=metric, value=value, unit=unit, starts_at=start,
              ends_at=end if status == "resolved" else None, event_time=end, labels=labels,
              annotations=Annotations(summary=summary))
    body = wire(alertmanager_body(e, receiver, "http://ingest.example.org:8080/"))
    check(body)
    (alert,) = body["alerts"]
    assert body["status"] == alert["status"] == status
    assert body["commonLabels"] == alert["labels"]
    assert body["commonAnnotations"] == alert["annotations"]
    assert alert["fingerprint"] == fingerprint(alert["labels"])
    assert datetime.fromisoformat(alert["startsAt"]) == start
    if status == "resolved":
        assert datetime.fromisoformat(alert["endsAt"]) == end


# --- the schema is strict where receivers are ---------------------------------------------------------


def _broken(change: Any) -> dict[str, Any]:
    body = copy.deepcopy(wire(alertmanager_body(event(), "pager", "http://h/")))
    change(body)
    return body


@pytest.mark.parametrize("change", [
    lambda b: b.update(version=4),  # a number: Go receivers fail to decode it
    lambda b: b.pop("groupKey"),  # prometheus-msteams refuses a message without one
    lambda b: b.pop("truncatedAlerts"),
    lambda b: b.update(status="FIRING"),
    lambda b: b["alerts"][0].update(endsAt="2026-11-25T04:00:00Z"),  # a firing alert's endsAt is the zero time
    lambda b: b["alerts"][0].update(startsAt="2026-11-25T03:01:00"),  # no offset: Go's parser refuses it
    lambda b: b["alerts"][0]["labels"].update(value=5.5),  # a KV is string to string
    lambda b: b["alerts"][0]["labels"].update({"team-name": "x"}),  # not a label name
    lambda b: b["alerts"][0]["labels"].pop("alertname"),
    lambda b: b["alerts"][0].update(fingerprint="01BAB2ECC7B161B9"),
    lambda b: b.update(commonLabels=None),
    lambda b: b.update(status="resolved"),  # a resolved message holds only resolved alerts
    lambda b: b.update(alerts=[]),
    lambda b: b.update(externalURL=""),
])
def test_the_schema_refuses_what_breaks_receivers(change: Any) -> None:
    assert list(VALIDATOR.iter_errors(_broken(change)))


def test_the_kept_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


# --- the config --------------------------------------------------------------------------------------


def hook(**changes: Any) -> WebhookSettings:
    return WebhookSettings.model_validate({"name": "pager", "url": "http://127.0.0.1:9000/am",
                                           "secret_env": "HOOK_SECRET", "body": "alertmanager", **changes})


def rule(**changes: Any) -> RuleSettings:
    return RuleSettings.model_validate({"name": "level-high", "metric": "level", "above": 5.0, "webhooks": ["pager"],
                                        **changes})


def test_settings_accept_the_alertmanager_body_and_compile_its_webhook() -> None:
    rules, hooks, problems = compile_alerts([rule(labels={"team": "hydro"})],
                                            [hook(external_url="https://ingest.example.org/")],
                                            env={"HOOK_SECRET": SECRET})
    assert problems == []
    assert hooks["pager"].body == "alertmanager"
    assert hooks["pager"].external_url == "https://ingest.example.org/"
    assert rules[0].labels == (("team", "hydro"),)


def test_the_default_external_url_is_this_hosts_http_address() -> None:
    _, hooks, problems = compile_alerts([], [hook()], env={"HOOK_SECRET": SECRET})
    assert problems == []
    url = hooks["pager"].external_url
    assert url in (f"http://{socket.gethostname()}/", "http://localhost/")
    assert VALIDATOR.evolve(schema=SCHEMA["properties"]["externalURL"]).is_valid(url)


def test_a_standard_webhook_has_no_external_url() -> None:
    _, hooks, _ = compile_alerts([], [hook(body="standard")], env={"HOOK_SECRET": SECRET})
    assert (hooks["pager"].body, hooks["pager"].external_url) == ("standard", "")
    with pytest.raises(ValidationError, match="external_url is only sent in the Alertmanager body"):
        hook(body="standard", external_url="https://ingest.example.org/")


@pytest.mark.parametrize("kind", ["slack", "Alertmanager", "", 4])
def test_settings_still_refuse_unknown_body_kinds(kind: object) -> None:
    with pytest.raises(ValidationError, match="is not a body this service sends") as info:
        hook(body=kind)
    assert 'use body = "standard"' in str(info.value.errors()[0]["ctx"])


@pytest.mark.parametrize("url", ["ingest.example.org", "ftp://x/", "http://", "http://a b/"])
def test_a_bad_external_url_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="is not an http"):
        hook(external_url=url)


@pytest.mark.parametrize(("label", "words"), [
    ("team-name", "'team-name' is not a Prometheus label name, and webhook 'pager' sends the Alertmanager body "
                  "(fix: use letters, digits and \"_\", not starting with a digit, e.g. 'team_name')"),
    ("1st", "e.g. '_1st'"),
    ("zone.id", "e.g. 'zone_id'"),
    ("severity", "'severity' is a label the Alertmanager body of webhook 'pager' sets itself"),
    ("alertname", "alertname, device, metric, severity come from the rule and the reading (fix: rename the label)"),
    ("device", "(fix: rename the label)"),
])
def test_a_rule_label_that_is_not_a_label_name_is_refused_for_an_alertmanager_webhook(label: str, words: str) -> None:
    rules, _, problems = compile_alerts([rule(labels={label: "x", "team": "hydro"})], [hook()],
                                        env={"HOOK_SECRET": SECRET})
    assert rules == ()
    (problem,) = problems
    assert problem.startswith("rules[0] (level-high).labels: ")
    assert words in problem


def test_the_same_labels_are_kept_for_a_standard_webhook() -> None:
    rules, _, problems = compile_alerts([rule(labels={"team-name": "x", "severity": "y"})], [hook(body="standard")],
                                        env={"HOOK_SECRET": SECRET})
    assert problems == []
    assert rules[0].labels == (("severity", "y"), ("team-name", "x"))


def test_a_rule_with_both_kinds_of_webhook_is_checked_for_the_alertmanager_one() -> None:
    hooks = [hook(name="ops", body="standard"), hook()]
    _, _, problems = compile_alerts([rule(webhooks=["ops", "pager"], labels={"team-name": "x"})], hooks,
                                    env={"HOOK_SECRET": SECRET})
    assert len(problems) == 1
    assert "webhook 'pager' sends the Alertmanager body" in problems[0]


def _config(tmp_path: Path, body: str, labels: str = "") -> Path:
    path = tmp_path / "sensor-ingest.toml"
    path.write_text(f"""
[[webhooks]]
name = "pager"
url = "http://127.0.0.1:9000/am"
secret_env = "SENSOR_INGEST_TEST_AM_SECRET"
body = "{body}"

[[rules]]
name = "level-high"
metric = "level"
above = 5.0
webhooks = ["pager"]
{labels}
""", encoding="utf-8")
    return path


def test_a_config_file_with_the_alertmanager_body_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_TEST_AM_SECRET", SECRET)
    settings = load_settings(_config(tmp_path, "alertmanager", 'labels = { team = "hydro" }'))
    _, hooks = settings.compiled_alerts()
    assert hooks["pager"].body == "alertmanager"


def test_a_config_file_names_the_key_of_a_bad_body_or_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_TEST_AM_SECRET", SECRET)
    with pytest.raises(ConfigError) as info:
        load_settings(_config(tmp_path, "slack"))
    (problem,) = info.value.problems
    assert problem.key == "webhooks[0].body"
    assert "'slack' is not a body this service sends" in problem.message
    with pytest.raises(ConfigError) as info:
        load_settings(_config(tmp_path, "alertmanager", 'labels = { "team-name" = "hydro" }'))
    text = " ".join(str(p) for p in info.value.problems)
    assert "rules[0] (level-high).labels: 'team-name' is not a Prometheus label name" in text
    assert "team_name" in text
