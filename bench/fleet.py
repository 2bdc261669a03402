"""What the fleet-data work costs the database: `python -m bench.fleet` (part of `make bench`).

Two operations of issue #15 run against a database that holds a day of a city's readings:

- the data-quality computation (`sensor-ingest quality`, and the service's fleet gauges every
  quality.every seconds), over a 24 h window of DEVICES x METRICS series, one reading a minute;
- a calibration rewrite (`sensor-ingest devices calibrate` for a past time): each bounded transaction
  holds the calibration lock exclusively and so pauses every writer's commit while it runs; its time
  is what an operator's `--batch` choice costs live ingest.

A private PostgreSQL + TimescaleDB (durable, like bench.run's) is started on a free port, migrated
and filled with COPY; nothing else runs beside the measured statements.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench.run import BenchPostgres
from ingest.quality import fleet_quality, read_report
from ingest.settings import QualitySettings
from ingest.store.calibration import rewrite_step, set_calibration
from ingest.store.migrate import migrate

__all__ = ["main"]

AT = datetime(2026, 11, 25, 0, 0, tzinfo=UTC)  # the end of the day of readings


async def _fill(conn: asyncpg.Connection[asyncpg.Record], devices: int, metrics: int, rewrite_rows: int) -> int:
    dev = [await conn.fetchval("INSERT INTO devices (uid, source, attributes) VALUES ($1, 'bench', $2) RETURNING id",
                               f"hn-b-{i:04d}", json.dumps({"district": f"d{i % 10}"})) for i in range(devices)]
    met = [await conn.fetchval("INSERT INTO metrics (name, unit) VALUES ($1, 'ug/m3') RETURNING id", f"m{j}")
           for j in range(metrics)]
    start = AT - timedelta(days=1)
    total = 0
    for d in dev:
        rows = [(start + timedelta(minutes=k, seconds=(d % 50)), d, m, float(k % 97), 0)
                for m in met for k in range(1440) if (k + d) % 50]  # every 50th minute missing
        await conn.copy_records_to_table("readings", records=rows,
                                         columns=("time", "device_id", "metric_id", "value", "flags"))
        total += len(rows)
    # One long series to recalibrate: a reading a second.
    d, m = dev[0], await conn.fetchval("INSERT INTO metrics (name, unit) VALUES ('distance', 'm') RETURNING id")
    rows = [(AT - timedelta(seconds=rewrite_rows - k), d, m, 1.0 + k * 1e-4, 0) for k in range(rewrite_rows)]
    await conn.copy_records_to_table("readings", records=rows,
                                     columns=("time", "device_id", "metric_id", "value", "flags"))
    await conn.execute("ANALYZE")
    return total


async def _run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        t0 = time.perf_counter()
        readings = await _fill(conn, args.devices, args.metrics, args.rewrite_rows)
        fill_s = time.perf_counter() - t0
        quality = QualitySettings()
        report_s, fleet_s = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            report = await read_report(conn, at=AT, window=quality.window, stale_after=quality.stale_after,
                                       below=quality.below, learn_from=quality.learn_from, source_intervals={})
            report_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fleet = await fleet_quality(conn, quality, {}, AT)
            fleet_s.append(time.perf_counter() - t0)
        d = await conn.fetchval("SELECT id FROM devices WHERE uid = 'hn-b-0000'")
        m = await conn.fetchval("SELECT id FROM metrics WHERE name = 'distance'")
        cal, _, _ = await set_calibration(conn, d, m, AT - timedelta(seconds=args.rewrite_rows), -1.0, 4.2)
        steps: list[float] = []
        rewritten = 0
        done = False
        while not done:
            t0 = time.perf_counter()
            n, done = await rewrite_step(conn, cal.id, args.batch)
            steps.append(time.perf_counter() - t0)
            rewritten += n
    finally:
        await conn.close()
    return {
        "series": len(report.series), "readings_in_window": readings, "fill_seconds": fill_s,
        "quality_report_seconds": {"median": statistics.median(report_s), "max": max(report_s)},
        "fleet_gauges_seconds": {"median": statistics.median(fleet_s), "max": max(fleet_s)},
        "fleet": {"devices_reporting": fleet.devices_reporting, "devices_stale": fleet.devices_stale,
                  "devices_incomplete": fleet.devices_incomplete},
        "rewrite": {"readings": rewritten, "batch": args.batch, "steps": len(steps),
                    "step_ms_median": statistics.median(steps) * 1000, "step_ms_max": max(steps) * 1000,
                    "total_seconds": sum(steps)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=200, help="devices of the day of readings (default 200)")
    ap.add_argument("--metrics", type=int, default=5, help="metrics per device (default 5)")
    ap.add_argument("--rewrite-rows", type=int, default=200_000, help="readings of the recalibrated series")
    ap.add_argument("--batch", type=int, default=5000, help="readings per rewrite transaction (default 5000, "
                    "the command's default)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each quality computation (default 3)")
    ap.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = ap.parse_args(argv)
    pg = BenchPostgres()
    try:
        pg.init()
        pg.start()
        url = pg.url(pg.create_database("template0"))
        migrate(url)
        result = asyncio.run(_run(url, args))
    finally:
        pg.cleanup()
    result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    q, f, r = result["quality_report_seconds"], result["fleet_gauges_seconds"], result["rewrite"]
    print(f"fleet data: {result['series']} series, {result['readings_in_window']:,} readings in the 24 h window")
    print(f"  sensor-ingest quality (report)  median {q['median']:.2f} s, max {q['max']:.2f} s "
          f"({args.repeat} runs)")
    print(f"  fleet gauges (fleet_quality)    median {f['median']:.2f} s, max {f['max']:.2f} s")
    print(f"  recalibration of {r['readings']:,} readings in {r['steps']} steps of {r['batch']}: step median "
          f"{r['step_ms_median']:.0f} ms, max {r['step_ms_max']:.0f} ms (each pauses the writers' commits), "
          f"total {r['total_seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
