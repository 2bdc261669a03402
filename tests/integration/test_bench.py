"""`make bench` end to end, at a tiny size: the four scenarios run, verify and report.

The figures themselves belong in BENCHMARKS.md, not here: this only proves the harness works on a
clean machine, that each scenario's stored set was checked against the acknowledged one, that every
alert event of ingest-alerts reached the bench's webhook receiver once, signed, and that the ratio
to the baseline is computed from the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
                                    "once each (by webhook-id, signature verified), 0 recorded not notified")
    for lat in (alerts["latency_ms"], x["webhook_latency_ms"]):
        assert lat["n"] > 0
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert "publish-to-webhook" in proc.stdout


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
