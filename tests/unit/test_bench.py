"""The benchmark's own checks: a missing or doubled message, or an alert event not delivered exactly
once, must fail the run, loudly."""

from __future__ import annotations

import base64
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from pathlib import Path

import httpx
import pytest

from bench.loadgen import LoadResult, _payload, device_uid, readings_per_message
from bench.run import (
    ALERT_SECRET_ENV,
    Delivery,
    Receiver,
    Services,
    VerificationError,
    _latency,
    _webhook_latency,
    alert_config,
    alert_devices,
    drained_over,
    ingest_consumer,
    profile_summary,
    verify,
    verify_alerts,
)
from ingest.alerts.body import Annotations, StandardBody
from ingest.alerts.evaluate import State, evaluate
from ingest.alerts.model import decode_secret
from ingest.alerts.sign import headers as sign_headers
from ingest.model import RawMessage
from ingest.process import Processor
from ingest.settings import Settings, load_settings

T0 = datetime(2026, 11, 25, tzinfo=UTC)
RUN = "dr1234"


def _row(proc: int, seq: int, latency_ms: float = 10.0) -> tuple[str, float, datetime, datetime]:
    t = T0 + timedelta(milliseconds=seq)
    return device_uid(RUN, proc, seq % 7), float(seq), t + timedelta(milliseconds=latency_ms), t


def test_verify_accepts_each_acknowledged_message_stored_once() -> None:
    load = LoadResult(acked=[[0, 1, 2], [0, 1]])
    rows = [_row(0, 0), _row(0, 1), _row(0, 2), _row(1, 0), _row(1, 1)]
    assert verify(rows, load, RUN).startswith("ok: 5 acknowledged, 5 stored once each, 0 stored unacked")


def test_verify_fails_on_a_missing_message() -> None:
    load = LoadResult(acked=[[0, 1, 2], [0, 1]])
    rows = [_row(0, 0), _row(0, 2), _row(1, 0), _row(1, 1)]
    with pytest.raises(VerificationError, match=r"1 acknowledged messages missing \(e.g. \[\(0, 1\)\]\)"):
        verify(rows, load, RUN)


def test_verify_fails_on_a_doubled_message() -> None:
    load = LoadResult(acked=[[0, 1]])
    rows = [_row(0, 0), _row(0, 1), _row(0, 1)]
    with pytest.raises(VerificationError, match=r"1 stored more than once"):
        verify(rows, load, RUN)


def test_verify_reports_a_stored_message_whose_puback_was_lost() -> None:
    load = LoadResult(acked=[[0]])
    assert verify([_row(0, 0), _row(0, 1)], load, RUN).endswith("1 stored unacked")


def test_latency_percentiles_leave_out_the_warm_up() -> None:
    rows = [_row(0, s, latency_ms=1000.0 if s < 10 else float(s)) for s in range(110)]
    lat = _latency(rows, after=T0 + timedelta(milliseconds=10))
    assert lat["n"] == 100
    assert lat["p50"] == 60.0
    assert lat["max"] == 109.0


def test_payload_is_native_and_padding_adds_readings() -> None:
    plain = _payload("d", T0, 5, 0)
    assert plain == (b'{"device":"d","time":"2026-11-25T00:00:00+00:00","readings":{"seq":5,'
                     b'"temperature":{"value":50.5,"unit":"degF"}}}')
    assert len(_payload("d", T0, 5, 1024)) >= 1024
    assert readings_per_message(0) == 2
    assert readings_per_message(1024) > 2


def test_profile_summary_ranks_functions_by_own_samples(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("main (a.py:1);work (a.py:5) 3\nmain (a.py:1);idle (b.py:9) 1\n")
    out = profile_summary(raw)
    assert out.splitlines()[2].split() == ["75.0", "75.0", "work", "a.py:5"]
    assert "100.0  main a.py:1" not in out  # main has no samples of its own



def test_fault_run_judgement_names_every_broken_limit() -> None:
    from bench.faults import judge

    ok = "ok: 10 acknowledged, 10 stored once each, 0 stored unacked"
    assert judge(hwm_mb=299.9, max_rss_mb=300, peak_unacked=4096, receive_maximum=4096, verified=ok,
                 service_exited=None) == []
    failures = judge(hwm_mb=300.5, max_rss_mb=300, peak_unacked=4097, receive_maximum=4096,
                     verified="FAILED: 1 acknowledged messages missing", service_exited="exit code 1")
    assert len(failures) == 4
    assert "300.5 MB is above the 300 MB limit" in failures[0]
    assert "reached 4097, above receive_maximum = 4096" in failures[1]
    assert judge(hwm_mb=1, max_rss_mb=300, peak_unacked=None, receive_maximum=4096, verified=ok,
                 service_exited=None) == ["sensor_ingest_messages_unacked was never read from /metrics"]
    assert judge(hwm_mb=1, max_rss_mb=300, peak_unacked=1, receive_maximum=4096, verified=ok, service_exited=None,
                 stop_exit_code=1) == ["the graceful stop after recovery exited 1, not 0"]


COUNT_BOUND = {"json, nested, max leaves, time_field", "json, gateway array of records",
               "preset shelly rpc, NotifyStatus of max leaves", "preset homeassistant (auto), flat JSON of max leaves",
               "lorawan, decoded payload of max leaves"}


def test_the_worst_case_payloads_fit_the_limit_and_meet_the_outcome_they_are_built_for() -> None:
    from bench.worst import _processor, cases
    from ingest.model import RawMessage

    limit, most = 65536, 2000
    processor = _processor(limit)
    outcomes = {}
    for name, (topic, payload) in cases(limit, most).items():
        assert len(payload) <= limit, name
        # Near the size limit, unless the count limit binds first (the leaf count is then at the limit).
        assert len(payload) > limit * 0.9 or name in COUNT_BOUND, f"{name}: a worst case should be near a limit"
        out = processor.process(RawMessage(topic, payload, datetime.now(UTC)))
        outcomes[name] = (out.rejection.reason if out.rejection and not out.readings else "stored", len(out.readings))
    assert outcomes["native map, max readings"] == ("stored", most)
    assert outcomes["over max readings (rejected)"][0] == "too_many_readings"
    assert outcomes["64 KiB of '[' (rejected, too_deep)"][0] == "too_deep"
    assert outcomes["64 KiB of binary (rejected, malformed)"][0] == "malformed"
    assert all(v[0] == "stored" for k, v in outcomes.items() if "rejected" not in k)
    assert outcomes["line, max lines, every one bad (rejected)"][0] == "malformed"
    assert outcomes["senml pack, a different unknown unit per record (rejected, bad_unit)"] == ("bad_unit", 0)
    assert outcomes["json, nested, max leaves, time_field"] == ("stored", 1990)
    assert outcomes["lorawan, decoded payload of max leaves"] == ("stored", 2000)


# --- ingest-alerts ------------------------------------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(b"bench-unit-test-key-32-bytes-long").decode()


def _services() -> Services:
    return Services("postgresql://bench@127.0.0.1:9/bench", "mqtt://127.0.0.1:9", None, None, {})


def _alert_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_process: int = 2) -> Settings:
    """The config ingest-alerts starts the service with, read as the service reads it."""
    monkeypatch.setenv(ALERT_SECRET_ENV, SECRET)
    ingest_consumer(tmp_path, _services(), "ingest-alerts",
                    extra=alert_config(RUN, "http://127.0.0.1:9/hook", per_process), env={ALERT_SECRET_ENV: SECRET})
    return load_settings(tmp_path / "ingest-alerts.toml")


def test_the_alert_config_holds_one_webhook_and_20_threshold_rules_inside_the_loadgens_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules, hooks = _alert_settings(tmp_path, monkeypatch).compiled_alerts()
    assert list(hooks) == ["bench"]
    assert hooks["bench"].url == "http://127.0.0.1:9/hook"
    assert len(rules) == 20
    assert [r.threshold for r in rules] == [float(t) for t in range(11, 31)]
    low, high = 10.0, (50 + 399 / 10 - 32) * 5 / 9  # the loadgen's temperature, in degC
    for r in rules:
        assert (r.metric, r.kind, r.webhooks) == ("temperature", "above", ("bench",))
        assert r.clear == r.threshold - 0.5
        assert low < r.clear < r.threshold < high


def test_the_rules_select_devices_a_step_apart_of_every_publisher_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules, _ = _alert_settings(tmp_path, monkeypatch, per_process=2).compiled_alerts()
    uids = [device_uid(RUN, p, d) for p in range(3) for d in range(500)]
    chosen = {uid for uid in uids if rules[0].selects(uid, {})}
    assert chosen == {device_uid(RUN, p, d) for p in range(3) for d in (0, 100)}
    assert all(r.devices == rules[0].devices for r in rules)
    five = alert_devices(RUN, 5)
    assert sorted(d for d in range(500) if fnmatchcase(device_uid(RUN, 0, d), five)) == [0, 100, 200, 300, 400]
    assert not fnmatchcase(device_uid("other", 0, 0), five)
    for wrong in (0, 6):
        with pytest.raises(ValueError, match="1 to 5"):
            alert_devices(RUN, wrong)


def test_each_selected_device_fires_and_resolves_16_rules_per_cycle_of_4_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event rate the scenario states: device d gets seq d + 500 k, so its temperature (through the
    real catalog: degF to degC) steps 10.0 -> 15.6 -> 21.1 -> 26.7 -> 10.0 ...: on the way up it fires
    the rules it passes, then one reading resolves them all (11 to 26 degC: 16 rules)."""
    settings = _alert_settings(tmp_path, monkeypatch)
    rules, _ = settings.compiled_alerts()
    processor = Processor.from_settings(settings)
    uid = device_uid(RUN, 0, 0)
    points = []
    for k in range(9):
        seq = 500 * k
        out = processor.process(RawMessage(f"bench/{uid}/up", _payload(uid, T0 + timedelta(seconds=k), seq, 0), T0))
        (temperature,) = [r for r in out.readings if r.metric == "temperature"]
        assert temperature.unit == "degC"
        points.append((temperature.time, float(temperature.value)))
    assert [round(v, 1) for _, v in points[:5]] == [10.0, 15.6, 21.1, 26.7, 10.0]
    events = [e for r in rules for e in evaluate(r, State(), points)[1]]
    # Two whole cycles (readings 1 to 8), each 16 firing and 16 resolved.
    assert Counter(e.status for e in events) == {"firing": 32, "resolved": 32}
    fired = {r.name for r in rules if evaluate(r, State(), points)[1]}
    assert fired == {f"temperature-above-{t}" for t in range(11, 27)}


def _delivery(msg: int, event: int, *, after_ms: float = 100.0, at: datetime = T0) -> Delivery:
    return Delivery(f"msg_{msg}", f"evt_{event}", "firing", at, at + timedelta(milliseconds=after_ms))


def test_verify_alerts_accepts_every_notified_event_delivered_once() -> None:
    events = [(1, True, 11), (2, True, 12), (3, False, None)]
    out = verify_alerts(events, [_delivery(12, 2), _delivery(11, 1)], [], RUN)
    assert out == "ok: 2 events notified, 2 delivered once each (by webhook-id, signature verified), 1 recorded not " \
        "notified"


@pytest.mark.parametrize(("events", "deliveries", "refused", "message"), [
    ([(1, True, 11), (2, True, 12)], [_delivery(11, 1)], [], r"1 of 2 deliveries never arrived \(e.g. \['msg_12'\]\)"),
    ([(1, True, 11)], [_delivery(11, 1), _delivery(11, 1)], [], r"1 arrived more than once \(e.g. \[\('msg_11', 2\)\]"),
    ([(1, True, 11)], [_delivery(11, 1), _delivery(99, 9)], [], r"1 arrived that no outbox row of this run sent"),
    ([(1, True, 11), (2, True, 12)], [_delivery(11, 2), _delivery(12, 1)], [], r"2 arrived with another event's body"),
    ([(1, True, 11)], [_delivery(11, 1)], ["msg_11: SignatureError: no_match"], r"1 requests were refused"),
    ([(1, True, None)], [], [], r"1 notified events have no outbox row \(e.g. \[1\]\)"),
    ([(1, False, None)], [], [], r"no alert event was notified, so nothing was measured"),
    ([], [], [], r"no alert event was notified"),
])
def test_verify_alerts_fails_loudly(events: list[tuple[int, bool, int | None]], deliveries: list[Delivery],
                                    refused: list[str], message: str) -> None:
    with pytest.raises(VerificationError, match=f"^{RUN} alerts: .*{message}"):
        verify_alerts(events, deliveries, refused, RUN)


def test_webhook_latency_runs_from_the_event_time_to_the_arrival_and_leaves_out_the_warm_up() -> None:
    deliveries = [_delivery(s, s, after_ms=5000.0 if s < 10 else float(s), at=T0 + timedelta(milliseconds=s))
                  for s in range(110)]
    lat = _webhook_latency(deliveries, after=T0 + timedelta(milliseconds=10))
    assert (lat["n"], lat["p50"], lat["max"]) == (100, 60.0, 109.0)


def _body(event: int, at: datetime) -> bytes:
    return StandardBody(id=f"evt_{event}", status="resolved", rule="temperature-above-11", severity="warning",
                        device="d", metric="temperature", value=10.0, unit="degC", threshold=11.0, starts_at=at,
                        ends_at=at, event_time=at, annotations=Annotations(summary="s")).model_dump_json().encode()


def test_the_receiver_verifies_each_signature_records_the_arrival_and_refuses_a_forgery() -> None:
    key = decode_secret(SECRET)
    now = datetime.now(UTC)
    with Receiver(SECRET) as receiver, httpx.Client() as client:
        body = _body(7, now)
        ok = client.post(receiver.url, content=body, headers=sign_headers(key, "msg_70", int(time.time()), body))
        forged = client.post(receiver.url, content=body,
                             headers=sign_headers(b"another-key-of-24-bytes!", "msg_71", int(time.time()), body))
        tampered = client.post(receiver.url, content=_body(8, now),
                               headers=sign_headers(key, "msg_72", int(time.time()), body))
        deliveries, refused = receiver.taken()
    assert (ok.status_code, forged.status_code, tampered.status_code) == (200, 400, 400)
    assert (ok.http_version, ok.headers.get("connection")) == ("HTTP/1.1", None)  # kept alive
    (d,) = deliveries
    assert (d.webhook_id, d.event, d.status) == ("msg_70", "evt_7", "resolved")
    assert d.event_time == now
    assert now <= d.arrived <= datetime.now(UTC)
    assert [r.split(":")[0] for r in refused] == ["msg_71", "msg_72"]
    assert all("no_match" in r for r in refused)


def test_a_profile_is_summed_into_the_parts_of_the_service_by_its_first_matching_frame(tmp_path: Path) -> None:
    from bench.run import profile_parts

    collapsed = tmp_path / "p.txt"
    collapsed.write_text(
        "run (x.py:1);MqttBridge._on_readable (ingest/mqtt.py:9);Pipeline.submit (ingest/pipeline.py:1) 7\n"
        "run (x.py:1);Pipeline.consume (ingest/pipeline.py:2);Processor.process (ingest/process.py:3);"
        "decode (ingest/decoders/native.py:4) 5\n"
        "run (x.py:1);Pipeline.consume (ingest/pipeline.py:2);Processor.process (ingest/process.py:3) 2\n"
        "run (x.py:1);EpollSelector.select (selectors.py:468) 1\n"
        "run (x.py:1);Server.serve (uvicorn/server.py:1) 3\n")
    parts = profile_parts(collapsed)
    assert parts["MQTT receive: socket reads, packet decoding, hand-over"] == 7
    assert parts["decoding (JSON, the format's decoder)"] == 5
    assert parts["the rest of processing (routing, outcome)"] == 2
    assert parts["event loop idle"] == 1
    assert parts["other (HTTP, gauges, evaluator)"] == 3
    assert sum(parts.values()) == 18


# --- --set: a default measured against its alternatives ------------------------------------------------


def test_set_gives_the_service_its_config_keys_as_environment_and_refuses_other_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.run import main

    svc = _services()
    svc.service_env = {"SENSOR_INGEST_INGEST__BATCH_MAX_AGE": "0.1", "SENSOR_INGEST_MQTT__RECEIVE_MAXIMUM": "1024"}
    consumer, _ = ingest_consumer(tmp_path, svc, "ingest-drain", env={"OTHER": "1"})
    assert consumer.env == svc.service_env | {"OTHER": "1"}
    for name, value in consumer.env.items():  # the service reads them as the keys they name
        monkeypatch.setenv(name, value)
    settings = load_settings(tmp_path / "ingest-drain.toml")
    assert (settings.ingest.batch_max_age, settings.mqtt.receive_maximum) == (0.1, 1024)
    for bad in ("batch_max_age=0.1", "ingest.batch_max_age", "ingest.=1", "a.b.c=1"):
        with pytest.raises(SystemExit) as exit_:
            main(["--set", bad])
        assert exit_.value.code == 2


def test_a_target_drain_whose_alert_events_fall_short_says_the_guarantees_do_not_hold() -> None:
    from bench.run import Result, target_line

    extra = {"readings_per_message": 1, "format": "senml", "rules": 20, "thresholds_degc": [30.0, 49.0],
             "rule_scope": "fleet", "workers": 2, "alert_events": {"firing": 700, "resolved": 660},
             "alert_events_expected": {"firing": 1040, "resolved": 1000}}
    short = target_line(Result("drain-senml1", 1, 1, 1.0, 1.0, 1.0, 1.0, None, {}, "ok", extra))
    assert "700 firing and 660 resolved events recorded [bold red]instead of the 1,040 and 1,000" in short
    assert "the alert guarantees do not hold in this run" in short
    whole = target_line(Result("drain-senml1", 1, 1, 1.0, 1.0, 1.0, 1.0, None, {}, "ok",
                               extra | {"alert_events": {"firing": 1040, "resolved": 1000}}))
    assert whole.endswith("1,040 firing and 1,000 resolved events recorded; 2 worker(s)")


def test_a_counter_is_summed_over_the_workers_and_a_worker_without_it_counts_zero() -> None:
    from bench.run import counter_total

    one = "# TYPE sensor_ingest_alert_readings_late_total counter\nsensor_ingest_alert_readings_late_total 3.0\n"
    other = "sensor_ingest_alert_readings_late_created 1.7e9\nsensor_ingest_messages_acked_total 12.0\n"
    assert counter_total([one, other, one], "alert_readings_late") == 6.0
    assert counter_total([one, other], "messages_acked") == 12.0


def test_a_drain_is_measured_over_the_messages_stored_after_its_first_commit() -> None:
    t0 = datetime(2026, 12, 4, tzinfo=UTC)
    # Five commits of 4 messages, one a second: the first commit's messages were processed before the
    # span began, so 16 messages in 4 s (20 / 4 would be a quarter too fast).
    commits = [t0 + timedelta(seconds=i // 4) for i in range(20)]
    assert drained_over(commits, commits, wall=9.0) == (4.0, 16)
    # A message split over two commits counts from its first: the span still ends at the last commit.
    firsts, lasts = [t0, t0, t0 + timedelta(seconds=1)], [t0, t0 + timedelta(seconds=2), t0 + timedelta(seconds=3)]
    assert drained_over(firsts, lasts, wall=9.0) == (3.0, 1)
    # Two workers, each committing 4 messages a second, half a second apart: each one's first batch
    # was processed before the span began, so 3 x 4 x 2 messages in 3.5 s.
    two = [t0 + timedelta(seconds=i // 4 + (0.5 if w else 0)) for w in (0, 1) for i in range(16)]
    assert drained_over(two, two, wall=9.0, workers=2) == (3.5, 24)
    # All in one commit: no span, so the wall time, every message.
    assert drained_over([t0] * 7, [t0] * 7, wall=2.5) == (2.5, 7)
    assert drained_over([], [], wall=1.0) == (1.0, 0)
