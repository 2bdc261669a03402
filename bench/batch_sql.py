"""The database side of one batch with alert rules, statement by statement: `python -m bench.batch_sql`.

A worker writes one batch at a time, and with rules on every device each batch locks and saves the
alert_state row of every device it touches (ingest.alerts.stage). This times the batch's statements
apart on a private durable PostgreSQL + TimescaleDB (as `make bench` starts it): BEGIN, the alert
lock (the stage's own statement), the COPY of the readings, the alert save (the stage's own
statement, series not judged: while a worker catches up, or not due yet) and COMMIT, for --batches
batches of --devices devices x --metrics readings each, the first --warmup left out. It prints the
median and p90 of each, and how many of alert_state's updates were heap-only (HOT).
``--fillfactor N`` sets alert_state's fillfactor first (the experiment of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.run import BenchPostgres
from ingest.alerts import stage as st
from ingest.alerts.model import VALUES
from ingest.store.migrate import migrate

__all__ = ["main"]

T0 = datetime(2026, 12, 4, tzinfo=UTC)
STEPS = ("begin", "lock", "copy", "save", "commit")


async def _run(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    conn = await asyncpg.connect(url)
    try:
        if args.fillfactor:
            await conn.execute(f"ALTER TABLE alert_state SET (fillfactor = {int(args.fillfactor)})")
        await conn.execute("INSERT INTO devices (uid) SELECT 'd' || g FROM generate_series(1, $1::int) g",
                           args.devices)
        await conn.execute("INSERT INTO metrics (name, kind) SELECT 'm' || g, 'number' "
                           "FROM generate_series(1, $1::int) g", args.metrics)
        dev = [r[0] for r in await conn.fetch("SELECT id FROM devices ORDER BY id")]
        met = [r[0] for r in await conn.fetch("SELECT id FROM metrics ORDER BY id")]
        keys = sorted((VALUES, d, met[0]) for d in dev)  # one series a device, as the targets' rules
        cols = [list(c) for c in zip(*keys, strict=True)]
        await conn.execute(st._ENSURE, *cols, ["ok"] * len(keys))
        times: dict[str, list[float]] = {k: [] for k in STEPS}
        for b in range(args.batches):
            base = T0 + timedelta(seconds=b)
            rows = [(base + timedelta(microseconds=i), d, m, 20.0, 0) for i, d in enumerate(dev) for m in met]
            marks = [time.perf_counter()]
            tr = conn.transaction()
            await tr.start()
            marks.append(time.perf_counter())
            await conn.fetch(st._LOCK, *cols)
            marks.append(time.perf_counter())
            await conn.copy_records_to_table("readings", records=rows,
                                             columns=("time", "device_id", "metric_id", "value", "flags"))
            marks.append(time.perf_counter())
            touched = [(*k, datetime.now(UTC), T0, base) for k in keys]
            await conn.execute(st._SAVE, *st._columns([], 12), *st._columns(touched, 6))
            marks.append(time.perf_counter())
            await tr.commit()
            marks.append(time.perf_counter())
            for step, a, z in zip(STEPS, marks, marks[1:], strict=False):
                times[step].append((z - a) * 1000)
        await conn.execute("SELECT pg_stat_force_next_flush()")  # this session's counts, now
        hot: Any = await conn.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'alert_state'")
        return {k: v[args.warmup:] for k, v in times.items()} | {"_hot": [hot[0], hot[1]]}
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.batch_sql", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000, help="devices (alert series) a batch touches (1000)")
    ap.add_argument("--metrics", type=int, default=5, help="readings a device in a batch (5: json5's)")
    ap.add_argument("--batches", type=int, default=60, help="batches written (60)")
    ap.add_argument("--warmup", type=int, default=10, help="first batches left out (10)")
    ap.add_argument("--fillfactor", type=int, help="alert_state's fillfactor (default: PostgreSQL's, 100)")
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
    upd, hot = result.pop("_hot")
    print(f"batch of {args.devices} devices x {args.metrics} readings, {args.devices} alert series, "
          f"fillfactor {args.fillfactor or 100}, {len(result['lock'])} batches measured (ms):")
    for step, v in result.items():
        print(f"  {step:7s} median {statistics.median(v):6.1f}  p90 {sorted(v)[int(0.9 * len(v))]:6.1f}")
    print(f"  alert_state updates: {upd:,}, of which heap-only {hot:,} ({100 * hot / max(upd, 1):.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
