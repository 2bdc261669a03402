"""`make bench` end to end, at a tiny size: the four scenarios run, verify and report; so do issue
#17's drain targets (--targets) and the live latency's breakdown.

The figures themselves belong in BENCHMARKS.md, not here: this only proves the harness works on a
clean machine, that each scenario's stored set was checked against the acknowledged one, that every
alert event of ingest-alerts reached the bench's webhook receiver once, signed, that the target
drains' rules raised exactly the events their messages must, and that the ratios to the baseline
are computed from the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.errors import VerificationError
from bench.latency import bucket_stats, histograms, summed
from bench.loadgen import LoadResult, device_uid
from bench.shapes import SHAPES, message_key
from bench.targets import MessageGroups, group, verify_messages
from ingest.model import RawMessage
from ingest.process import Processor
from ingest.settings import load_settings
from tests.services import REPO


def test_bench_runs_all_scenarios_verifies_them_and_reports_the_baseline_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # ingest-alerts at 1,500 msg/s for 3 s: each of its 4 devices gets 4 or 5 messages, a whole cycle of
    # its temperature (tests/unit/test_bench.py), so rules fire and resolve after the warm-up.
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--drain-messages", "3000", "--baseline-messages", "300",
         "--live-rate", "300", "--live-seconds", "2", "--warmup-seconds", "1", "--alerts-rate", "1500",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = {r["name"]: r for r in report["results"]}
    assert set(results) == {"ingest-drain", "ingest-live", "baseline-drain", "ingest-alerts"}
    assert results["ingest-drain"]["messages"] == 3000
    assert results["baseline-drain"]["messages"] == 300
    assert results["ingest-live"]["messages"] > 0
    for r in results.values():
        assert r["verified"].startswith(f"ok: {r['messages']} acknowledged, {r['messages']} stored once each")
        assert r["messages_per_s"] > 0
        assert r["usage"]["consumer"]["hwm_mb"] > 0
        assert set(r["usage"]) == {"consumer", "broker", "database"}
    assert results["ingest-live"]["latency_ms"]["n"] > 0
    assert report["ratio_vs_baseline"] == results["ingest-drain"]["messages_per_s"] / results["baseline-drain"][
        "messages_per_s"]
    assert {"postgresql", "timescaledb", "mosquitto", "cpu", "memory"} <= set(report["machine"])
    assert "the straightforward approach" in proc.stdout

    alerts = results["ingest-alerts"]
    x = alerts["extra"]
    assert (report["plan"]["alerts_rate"], x["offered_per_s"], x["rules"], x["alert_devices"]) == (1500, 1500, 20, 4)
    assert x["firing"] > 0
    assert x["resolved"] > 0
    assert x["events_delivered"] == x["firing"] + x["resolved"]
    assert x["alerts_verified"] == (f"ok: {x['events_delivered']} events notified, {x['events_delivered']} delivered "
                                    "once each (by webhook-id, signature verified), 0 recorded not notified; the "
                                    f"{x['events_delivered']} events the stored readings give, each recorded once")
    assert x["readings_late"] == 0
    parts = x["alert_parts_ms"]
    for lat in (alerts["latency_ms"], x["webhook_latency_ms"], parts["event_to_recorded"],
                parts["recorded_to_delivered"]):
        assert lat["n"] > 0
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    # Every delivered event after the warm-up is in both parts; an event is recorded after the lateness.
    assert parts["event_to_recorded"]["n"] == parts["recorded_to_delivered"]["n"] == x["webhook_latency_ms"]["n"]
    assert parts["event_to_recorded"]["p50"] >= 1000 * x["lateness_s"]
    assert "publish-to-webhook" in proc.stdout
    assert "the event's commit to delivered" in proc.stdout

    # The breakdown of publish-to-commit (bench.latency), in both live scenarios.
    for r in (results["ingest-live"], alerts):
        b = r["extra"]["latency_breakdown"]
        pub = b["publisher"]
        # The headline latency is publish() to commit, per message, after the warm-up.
        assert pub["publish_to_commit"]["n"] == r["latency_ms"]["n"]
        assert pub["publish_to_commit"]["p50"] == r["latency_ms"]["p50"]
        for part in ("behind_schedule", "window_wait", "publish_to_puback", "puback_to_commit", "want_to_commit"):
            assert pub[part]["n"] == r["latency_ms"]["n"], part
        assert pub["window_wait"]["p50"] >= 0
        assert pub["want_to_commit"]["mean"] >= pub["publish_to_commit"]["mean"]
        assert pub["publish_to_puback"]["max"] > 0
        assert pub["publish_to_puback"]["p50"] <= pub["publish_to_commit"]["p50"]
        service = b["service"]
        # The service's histograms over the measured window: about the messages after the warm-up.
        assert 0 < service["receive_to_commit"]["n"] <= r["messages"]
        assert service["receive_to_commit"]["p50_lo"] < service["receive_to_commit"]["p50"]
        # Both per batch; a batch may be between the two observations when /metrics is read.
        assert service["flush"]["n"] > 0
        assert abs(service["flush"]["n"] - service["batch_messages"]["n"]) <= 1
        rest = b["broker_and_network"]
        assert rest["mean"] == round(pub["publish_to_commit"]["mean"] - service["receive_to_commit"]["mean"], 1)
        assert rest["mean_high"] == round(rest["mean"] + service["flush"]["mean"], 1)
        assert rest["p50_lo"] < rest["p50_hi"]
    assert "where publish-to-commit goes" in proc.stdout


def test_bench_fault_run_blackholes_the_database_under_a_backlog_and_verifies(tmp_path: Path) -> None:
    """`make bench-faults` at a tiny size. The blackhole (12 s) outlasts 2 x command_timeout + 2 s,
    so the service's own timeouts must fire during it and /readyz must say so."""
    from bench.faults import main

    out = tmp_path / "faults.json"
    rc = main(["--messages", "2000", "--payload-bytes", "1024", "--outage", "12", "--receive-maximum", "500",
               "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report["failures"]
    assert report["ok"]
    r, p = report["results"], report["parameters"]
    assert (p["messages"], p["receive_maximum"], p["outage"]) == (2000, 500, 12)
    assert r["messages_acked"] == 2000
    assert r["verified"].startswith("ok: 2000 acknowledged, 2000 stored once each")
    assert r["peak_unacked"] is not None
    assert 0 < r["peak_unacked"] <= 500
    assert r["readyz_503_during_blackhole"]
    assert r["blackhole_seconds"] >= 12
    assert r["drain_seconds"] is not None
    assert 0 < r["peak_vmhwm_mb"] <= 300
    assert r["service_exited"] is None
    assert r["payload_bytes_avg"] >= 1024
    assert {"postgresql", "timescaledb", "mosquitto", "cpu", "memory"} <= set(report["machine"])
    assert report["command"].startswith("python -m bench.faults --messages 2000")


def test_bench_fleet_times_quality_and_a_whole_rewrite_on_a_small_fleet(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--devices", "3", "--metrics", "2", "--rewrite-rows", "500",
         "--batch", "100", "--repeat", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    # 3 devices x 2 metrics, and the long series to recalibrate.
    assert result["series"] == 7
    # Every 50th minute of the day is missing for each device (its own phase): 1440 - 29 or 28 per series.
    assert result["readings_in_window"] == sum(sum(1 for k in range(1440) if (k + d) % 50) for d in (1, 2, 3)) * 2
    assert result["rewrite"]["readings"] == 500
    assert result["rewrite"]["steps"] == 5  # four of 100, and the last takes what is left
    assert result["fleet"]["devices_reporting"] == 3
    assert "recalibration of 500 readings in 5 steps of 100" in proc.stdout


# --- issue #17: the drain targets and the latency breakdown -------------------------------------------


def test_bench_batch_sql_times_each_statement_of_a_batch_with_rules() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.batch_sql", "--devices", "20", "--metrics", "2", "--batches", "5",
         "--warmup", "1", "--fillfactor", "50"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "batch of 20 devices x 2 readings, 20 alert series, fillfactor 50, 4 batches measured" in proc.stdout
    for step in ("begin", "lock", "copy", "save", "commit"):
        assert f"  {step} " in proc.stdout
    assert "alert_state updates: 100," in proc.stdout  # the save updates every series, every batch


def test_bench_target_drains_verify_each_shape_its_alert_events_and_report_a_ratio_per_shape(tmp_path: Path) -> None:
    """--targets at a tiny size: every shape drained through the service (catalog on, 20 rules on every
    device) and through the baseline, each stored set checked message by message, the alert events
    the messages must raise recorded exactly, and a readings/s ratio per shape from the same run."""
    out = tmp_path / "targets.json"
    # More than one batch each (1,000 messages or 20,000 readings a batch), so that each has a span.
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--targets", "--senml1-messages", "1500", "--json5-messages", "1500",
         "--senml50-messages", "500", "--target-baseline-readings", "300", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == ["drain-senml1", "baseline-senml1", "drain-json5", "baseline-json5", "drain-senml50",
                             "baseline-senml50"]
    sizes = {"drain-senml1": (1500, 1), "drain-json5": (1500, 5), "drain-senml50": (500, 50),
             "baseline-senml1": (300, 1), "baseline-json5": (60, 5), "baseline-senml50": (6, 50)}
    for name, (messages, per) in sizes.items():
        r = results[name]
        assert (r["messages"], r["readings"], r["extra"]["readings_per_message"]) == (messages, messages * per, per)
        assert r["verified"] == (f"ok: {messages} acknowledged, {messages} stored once each ({per} readings each), "
                                 "0 stored unacked")
        assert set(r["usage"]) == {"consumer", "broker", "database"}
        assert r["usage"]["consumer"]["hwm_mb"] > 0
    for shape in ("senml1", "json5", "senml50"):
        x = results[f"drain-{shape}"]["extra"]
        assert (x["rules"], x["rule_scope"], x["thresholds_degc"]) == (20, "fleet", [30.0, 49.0])
        assert x["format"] == ("native" if shape == "json5" else "senml")
        # seq 0 of each of the 2 processes is a spike: 20 rules fire on its device (and more spikes later).
        assert x["alert_events"] == x["alert_events_expected"]
        assert x["alert_events"]["firing"] >= 40
        assert results[f"drain-{shape}"]["readings_per_s"] > 0
        ratio = report["target_ratios_readings"][shape]
        assert ratio == round(results[f"drain-{shape}"]["readings_per_s"]
                              / results[f"baseline-{shape}"]["readings_per_s"], 2)
    # senml50's spike is resolved by the next sample of the same pack.
    assert results["drain-senml50"]["extra"]["alert_events"]["resolved"] == results["drain-senml50"]["extra"][
        "alert_events"]["firing"]
    assert "drain-senml50 / baseline-senml50" in proc.stdout
    assert "firing and" in proc.stdout


def _senml_groups(shape: str, base: float, acked: list[list[int]], run: str, tmp_path: Path) -> MessageGroups:
    """What groups_sql finds for these messages, from the readings the real service's Processor decodes
    (catalog on) out of each SenML payload: the stored readings' device and time, as the query keys them."""
    config = tmp_path / "senml.toml"
    config.write_text('[database]\nurl = "postgresql://bench@127.0.0.1:9/bench"\n'
                      '[[sources]]\nname = "bench"\ntopic = "bench/r/{device}/senml"\nformat = "senml"\n')
    processor = Processor.from_settings(load_settings(config))
    rows: dict[tuple[str, int], int] = {}
    for proc, seqs in enumerate(acked):
        for seq in seqs:
            uid = device_uid(run, proc, seq % 500)
            out = processor.process(RawMessage(f"bench/r/{uid}/senml", SHAPES[shape].payload(uid, seq, base),
                                               datetime.now(UTC)))
            assert out.rejection is None
            for reading in out.readings:
                key = (reading.device, message_key(base, reading.time.timestamp()))
                rows[key] = rows.get(key, 0) + 1
    return group([(uid, seq, n) for (uid, seq), n in rows.items()], run)


def test_the_senml_verification_fails_on_a_missing_message_and_on_a_partly_stored_pack(tmp_path: Path) -> None:
    run, base = "td1234", 1_764_000_000.0
    acked = [[0, 1, 2, 500], [0, 7]]
    for shape, per in (("senml1", 1), ("senml50", 50)):
        groups = _senml_groups(shape, base, acked, run, tmp_path)
        assert verify_messages(groups, LoadResult(acked=acked), run, per, 500) == (
            f"ok: 6 acknowledged, 6 stored once each ({per} readings each), 0 stored unacked")
        missing = dict(groups)
        del missing[(1, 7)]
        with pytest.raises(VerificationError, match=r"^td1234: 1 acknowledged messages missing \(e.g. \[\(1, 7\)\]\)"):
            verify_messages(missing, LoadResult(acked=acked), run, per, 500)
    partial = _senml_groups("senml50", base, acked, run, tmp_path)
    partial[(0, 500)] = (49, 0)
    with pytest.raises(VerificationError, match=r"1 stored with fewer than 50 readings \(e.g. \[\(\(0, 500\), 49\)\]"):
        verify_messages(partial, LoadResult(acked=acked), run, 50, 500)
    moved = _senml_groups("senml1", base, acked, run, tmp_path)
    moved[(0, 2)] = (1, 3)
    with pytest.raises(VerificationError, match=r"1 stored under another device"):
        verify_messages(moved, LoadResult(acked=acked), run, 1, 500)


def test_histogram_percentiles_are_the_bounds_of_the_buckets_holding_them() -> None:
    def text(counts: tuple[int, int, int], total: float) -> str:
        return ("# TYPE x_seconds histogram\n"
                f'x_seconds_bucket{{le="0.1"}} {counts[0]}\nx_seconds_bucket{{le="0.25"}} {counts[1]}\n'
                f'x_seconds_bucket{{le="+Inf"}} {counts[2]}\nx_seconds_count {counts[2]}\nx_seconds_sum {total}\n')

    before = histograms(text((10, 10, 10), 0.5))["x_seconds"]
    after = histograms(text((20, 109, 110), 20.5))["x_seconds"]
    # The window: 10 in (0, 0.1], 89 in (0.1, 0.25], 1 above; 100 in all, 20 s.
    s = bucket_stats(after - before, 1000.0)
    assert (s["n"], s["mean"]) == (100, 200.0)
    assert (s["p50_lo"], s["p50"], s["p95"], s["p99"]) == (100.0, 250.0, 250.0, 250.0)
    assert bucket_stats(histograms(text((0, 0, 4), 40.0))["x_seconds"], 1000.0)["p99"] == float("inf")
    two = summed([text((1, 2, 3), 1.0), text((1, 1, 1), 0.1)])["x_seconds"]
    assert (two.buckets, two.count, two.sum) == (((0.1, 2), (0.25, 3), (float("inf"), 4)), 4, 1.1)


def test_the_alert_script_verification_names_an_event_missing_or_extra(database_url: str) -> None:
    """bench.run.verify_alert_script on the real database: the events of the 20 rules on a device's
    stored temperatures, worked out again; one event not recorded (a last reading not judged) and
    one recorded that the readings do not give each fail it by name."""
    import psycopg

    from bench.run import verify_alert_script

    run = "al1234"
    values = [10.0, 15.6, 21.2, 26.8, 10.0, 32.4]  # up through 15 thresholds, down below all, up past all 20
    with psycopg.connect(database_url, autocommit=True) as c:
        device = c.execute("INSERT INTO devices (uid) VALUES (%s) RETURNING id", (f"{run}-p0-d0000",)).fetchone()[0]
        c.execute("INSERT INTO devices (uid) VALUES (%s)", (f"{run}-p0-d0200",))  # not a rule's device
        metric = c.execute("INSERT INTO metrics (name) VALUES ('temperature') RETURNING id").fetchone()[0]
        times = [datetime(2026, 12, 3, 7, 0, i, tzinfo=UTC) for i in range(len(values))]
        for t, v in zip(times, values, strict=True):
            c.execute("INSERT INTO readings (time, device_id, metric_id, value) VALUES (%s, %s, %s, %s)",
                      (t, device, metric, v))

        def record(rule: float, status: str, t: datetime) -> None:
            c.execute("INSERT INTO alert_events (rule, device_id, metric_id, status, event_time, starts_at, value, "
                      "threshold, severity, notified) VALUES (%s, %s, %s, %s, %s, %s, 0, %s, 'warning', true)",
                      (f"temperature-above-{rule:g}", device, metric, status, t, t, rule))

        for rule in range(11, 31):
            fired = next(t for t, v in zip(times, values, strict=True) if v > rule)
            if fired < times[4]:  # rules 11 to 26: fired, resolved by 10.0, fired again by the last reading
                record(rule, "firing", fired)
                record(rule, "resolved", times[4])
                record(rule, "firing", times[5])
            elif rule != 30:  # 27 to 30 fire on the last reading only: rule 30's is left out
                record(rule, "firing", times[5])
    with pytest.raises(VerificationError, match=r"1 were not recorded \(temperature-above-30 device \d+ firing at "
                                                r"2026-12-03T07:00:05\+00:00 \(its last reading\)\) and 0 recorded"):
        verify_alert_script(database_url, run, 1)
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("INSERT INTO alert_events (rule, device_id, metric_id, status, event_time, starts_at, value, "
                  "threshold, severity, notified) VALUES ('temperature-above-30', %s, %s, 'firing', %s, %s, 0, 30, "
                  "'warning', true)", (device, metric, times[5], times[5]))
    assert verify_alert_script(database_url, run, 1) == "the 52 events the stored readings give, each recorded once"
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("INSERT INTO alert_events (rule, device_id, metric_id, status, event_time, starts_at, value, "
                  "threshold, severity, notified) VALUES ('temperature-above-11', %s, %s, 'resolved', %s, %s, 0, 11, "
                  "'warning', true)", (device, metric, times[4], times[4]))
    with pytest.raises(VerificationError, match=r"0 were not recorded \(\) and 1 recorded are not among them "
                                                r"\(temperature-above-11 device \d+ resolved"):
        verify_alert_script(database_url, run, 1)
