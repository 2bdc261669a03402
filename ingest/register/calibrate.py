"""`sensor-ingest devices calibrate | calibrations | recalibrate`: calibrations from the command line.

The rule, the lock and the bounded rewrite are ingest.store.calibration; this module looks the names
up, drives the rewrite loop (with a progress bar on a terminal) and stops between two steps on Ctrl-C
or SIGTERM: what is committed stays, and running the command again resumes where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import signal
import sys
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.clikit import (
    DatabaseUnavailable,
    async_connect,
    cell,
    client_settings,
    fail,
    json_value,
    like,
    positive,
    rfc3339,
)
from ingest.clikit import table as print_table

if TYPE_CHECKING:
    from ingest.store.calibration import Conn

__all__ = ["add_calibration_actions", "cmd_calibration"]

_ENV = ("  SENSOR_INGEST_DATABASE_URL        database.url\n"
        "  SENSOR_INGEST_DATABASE_PASSWORD   the database password (only from the environment)")
_BATCH_HELP = ("readings rewritten per transaction (default: %(default)s). Each transaction holds the calibration "
               "lock exclusively, which pauses every ingest worker's commit while it runs: keep it short")
_STOPPED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def _scale(text: str) -> float:
    v = _number(text)
    if v == 0:
        raise argparse.ArgumentTypeError("a scale of 0 would store every reading as the offset")
    return v


def _effective(text: str) -> datetime:
    if text.strip().lower() == "now":
        return datetime.now(UTC)
    return rfc3339(text, " such as 2026-11-25T03:00:00Z (or 'now')")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = f"Environment (overrides the file):\n{_ENV}"
    p.add_argument("--config", "-c", metavar="FILE", type=Path,
                   help="the service's TOML config file, for its [database] (optional: the environment may be "
                   "enough)")


def add_calibration_actions(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = actions.add_parser(
        "calibrate", help="add or correct a calibration (scale, offset from a time) and rewrite the readings concerned",
        description=_wrap(
            "Add the calibration of DEVICE's METRIC from time T on, or correct the one from exactly T: the "
            "service stores each numeric reading at or after T as value * S + O (after the catalog's unit "
            "conversion; its range checks judge the value as measured), up to the next calibration of the "
            "series. A water level measured as mount height H minus a distance is --scale -1 --offset H.")
        + "\n\n" + _wrap(
            "Correcting the calibration from exactly T, a parameter not given keeps its value (--offset 4.35 "
            "alone keeps the scale), and the first line shows the change: `corrected: ... scale -1 offset 4.2 "
            "-> scale -1 offset 4.35`. There is no delete: correct a calibration to the scale and offset of the "
            "previous one (1 and 0 for the first), which gives the same stored values.")
        + "\n\n" + _wrap(
            "When stored readings of that span carry another calibration (or none), they are then rewritten "
            "from it to the new one, in transactions of --batch readings, each reading exactly once, also "
            "while the service keeps ingesting. Ctrl-C or SIGTERM stops after the current transaction; "
            "`sensor-ingest devices recalibrate DEVICE METRIC` (or this command again) resumes. Alerts are "
            "not evaluated again for the rewritten history.")
        + "\n\n" + _wrap(
            "Refused while a calibration of the series is still being rewritten (finish it with recalibrate; "
            "the one from T can still be corrected while nothing of its span is rewritten yet), when the new "
            "factor would take a stored reading of the span past the largest double, and for metrics whose "
            "readings are not numbers. Exit 0 when done (also when "
            "nothing changed), 1 when refused or DEVICE or METRIC is unknown, 2 on a usage error or when the "
            "database cannot be reached, 130 after Ctrl-C, 143 after SIGTERM."),
    )
    _client_args(p)
    p.add_argument("device", metavar="DEVICE", help="the device id, as stored (devices.uid)")
    p.add_argument("metric", metavar="METRIC", help="the metric name, as stored (metrics.name)")
    p.add_argument("--scale", type=_scale, metavar="S",
                   help="the factor (default: 1 for a new calibration, the stored one when correcting)")
    p.add_argument("--offset", type=_number, metavar="O",
                   help="added after the factor (default: 0 for a new calibration, the stored one when correcting)")
    p.add_argument("--from", dest="effective_from", type=_effective, required=True, metavar="T",
                   help="the first reading time it applies to: RFC 3339 with an offset (2026-11-25T03:00:00Z) "
                   "or 'now'")
    p.add_argument("--comment", metavar="C", help="why, e.g. 'mount height 4.20 m, surveyed 2026-11-20'")
    p.add_argument("--batch", type=positive, default=5000, metavar="N", help=_BATCH_HELP)
    p.add_argument("--no-rewrite", action="store_true",
                   help="only record the calibration; rewrite the stored readings later with recalibrate")

    p = actions.add_parser(
        "recalibrate", help="rewrite the stored readings of a series that a calibration does not cover yet",
        description=_wrap(
            "Finish applying the calibrations of DEVICE's METRIC to its stored readings: for each one whose "
            "rewrite is pending (added or corrected with --no-rewrite, or interrupted), in effective-time "
            "order, rewrite the readings still stored with the previous calibration, in transactions of "
            "--batch readings, each reading exactly once, also while the service keeps ingesting. Shows a "
            "progress bar on a terminal and ends with the count (0 when nothing was pending: running it "
            "again changes nothing). Ctrl-C or SIGTERM stops after the current transaction; run it again to "
            "resume. Exit 0 when done, 1 when DEVICE or METRIC is unknown or a stored reading cannot be "
            "rewritten (the calibration would take it past the largest double: the message names it and says "
            "what to do), 2 when the database cannot be reached, 130 after Ctrl-C, 143 after SIGTERM."),
    )
    _client_args(p)
    p.add_argument("device", metavar="DEVICE", help="the device id, as stored (devices.uid)")
    p.add_argument("metric", metavar="METRIC", help="the metric name, as stored (metrics.name)")
    p.add_argument("--batch", type=positive, default=5000, metavar="N", help=_BATCH_HELP)

    p = actions.add_parser(
        "calibrations", help="the calibrations and how far each is applied to the stored readings",
        description=_wrap(
            "The calibrations, by device, metric and effective time: scale and offset, the span's end (the "
            "next calibration of the series), the comment, the state (applied: every stored reading of the "
            "span carries it; rewriting from T: those at or after T still carry the previous calibration, "
            "`devices recalibrate` finishes), how many readings were rewritten to it, and when it was last "
            "changed. Exit 0, 2 when the database cannot be read."),
    )
    _client_args(p)
    p.add_argument("device", metavar="DEVICE", nargs="?", help="only this device; * and ? are wildcards")
    p.add_argument("--metric", metavar="M", help="only this metric; * and ? are wildcards")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_calibration(args: argparse.Namespace) -> int:
    command: str = args.devices_command
    if command == "calibrations":
        return asyncio.run(_list(args))
    if command == "calibrate":
        if args.scale is None and args.offset is None:
            fail("devices calibrate: give --scale, --offset or both (correcting the calibration from exactly T, the "
                 "other keeps its value; for a new one it is 1 or 0)")
            return 2
        return asyncio.run(_session(args, _calibrate))
    return asyncio.run(_session(args, _recalibrate))


def _num(v: float) -> str:
    """A float as short as it reads back the same: -1 not -1.0, 4.2 not 4.2000000000000002."""
    short = f"{v:.15g}"
    return short if float(short) == v else repr(v)


def _factor(scale: float, offset: float) -> str:
    return f"scale {_num(scale)} offset {_num(offset)}"


def _named(exc: Exception, args: argparse.Namespace) -> str:
    """The store's message with the commands it suggests spelled for this series (it writes them with
    DEVICE METRIC: it knows ids, not names)."""
    return str(exc).replace("DEVICE METRIC", f"{shlex.quote(args.device)} {shlex.quote(args.metric)}")


def _when(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


class _Unknown(Exception):
    """DEVICE or METRIC is not stored; the message says where to look."""


async def _series(conn: Conn, device: str, metric: str) -> tuple[int, int]:
    device_id = await conn.fetchval("SELECT id FROM devices WHERE uid = $1", device)
    if device_id is None:
        raise _Unknown(f"no device {device!r} in the register: `sensor-ingest devices list` lists them (the id as "
                       "stored: verbatim as captured, with its source's prefix if any)")
    metric_id = await conn.fetchval("SELECT id FROM metrics WHERE name = $1", metric)
    if metric_id is None:
        raise _Unknown(f"no metric {metric!r}: `sensor-ingest devices show {shlex.quote(device)}` lists the metrics "
                       "of that device (the name as stored, after any rename)")
    return int(device_id), int(metric_id)


@dataclass
class _Run:
    """How far a rewrite loop got."""

    rewritten: int = 0
    stopped_by: int | None = None  # the signal that stopped it between two steps


class _Stop:
    """Ctrl-C and SIGTERM while a command runs: the first asks the rewrite to stop after the current
    step's commit; a second one cancels that step too (its transaction rolls back: nothing is lost)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._task: asyncio.Task[Any] | None = None
        self._installed: list[int] = []

    def __enter__(self) -> _Stop:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for sig in _STOPPED:
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (RuntimeError, ValueError):  # not the main thread: Python's default handling stays
                continue
            self._installed.append(sig)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self.signal is None:
            self.signal = sig
            print("stopping after the current transaction (once more: at once)...", file=sys.stderr, flush=True)
        elif self._task is not None:
            self._task.cancel()


_Body = Callable[["Conn", argparse.Namespace, _Stop, _Run], Awaitable[int]]


async def _session(args: argparse.Namespace, body: _Body) -> int:
    """Run ``body`` on a connection of its own, with the stop signals caught and the failures a user
    can act on turned into messages (the readings rewritten so far are committed either way)."""
    from ingest.store.calibration import CalibrationError
    from ingest.store.classify import describe, is_connection_failure

    conn = await async_connect(client_settings(args.config))
    run = _Run()
    stop = _Stop()
    resume = (f"Run `sensor-ingest devices recalibrate {shlex.quote(args.device)} {shlex.quote(args.metric)}` "
              "to resume.")
    try:
        with stop:
            return await body(conn, args, stop, run)
    except asyncio.CancelledError:
        if stop.signal is None:
            raise
        conn.terminate()
        print(f"stopped at once: {run.rewritten} readings rewritten (committed); the transaction under way rolled "
              f"back. {resume}")
        return _STOPPED[signal.Signals(stop.signal)]
    except CalibrationError as exc:
        # A step refused (its transaction rolled back): a stored reading the factor takes past the
        # largest double. The message says which one and the way out.
        fail(f"{args.device} {args.metric}: {_named(exc, args)} ({run.rewritten} readings were rewritten before)")
        return 1
    except Exception as exc:
        if is_connection_failure(exc):
            raise DatabaseUnavailable(f"lost the database: {describe(exc)}; {run.rewritten} readings were rewritten "
                                      f"and committed before. {resume}") from exc
        raise
    finally:
        if not conn.is_closed():
            await conn.close()


async def _rewrite_series(conn: Conn, device_id: int, metric_id: int, batch: int, stop: _Stop, run: _Run) -> None:
    """The rewrite loop of calibrate and recalibrate: every pending calibration of the series, in
    effective-time order, step by step until done or stopped (``run`` counts as it goes)."""
    from ingest.store.calibration import pending_readings, rewrite_step, series_calibrations

    pending = [c for c in await series_calibrations(conn, device_id, metric_id) if c.rewrite_cursor is not None]
    if not pending:
        return
    progress = None
    if sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        from ingest.clikit import console

        total = 0
        for c in pending:
            total += await pending_readings(conn, c)  # once, at the start: live ingest may add some
        progress = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console(), transient=True)
        task = progress.add_task("rewriting", total=total)
        progress.start()
    try:
        for c in pending:
            done = False
            while not done:
                if stop.signal is not None:
                    run.stopped_by = stop.signal
                    return
                n, done = await rewrite_step(conn, c.id, batch)
                run.rewritten += n
                if progress is not None:
                    progress.advance(task, n)
    finally:
        if progress is not None:
            progress.stop()


async def _stopped(conn: Conn, args: argparse.Namespace, device_id: int, metric_id: int, run: _Run) -> int:
    from ingest.store.calibration import pending_readings, series_calibrations

    assert run.stopped_by is not None
    where = ""
    for c in await series_calibrations(conn, device_id, metric_id):
        if c.rewrite_cursor is not None:
            where = (f"; the calibration from {_when(c.effective_from)} has {await pending_readings(conn, c)} "
                     f"stored reading(s) left from {_when(c.rewrite_cursor)} on, still with "
                     f"{_factor(c.from_scale, c.from_offset)}")
            break
    print(f"stopped: {run.rewritten} readings rewritten{where}. Run `sensor-ingest devices recalibrate "
          f"{shlex.quote(args.device)} {shlex.quote(args.metric)}` to resume.")
    return _STOPPED[signal.Signals(run.stopped_by)]


async def _calibrate(conn: Conn, args: argparse.Namespace, stop: _Stop, run: _Run) -> int:
    from ingest.store.calibration import CalibrationError, pending_readings, set_calibration

    try:
        device_id, metric_id = await _series(conn, args.device, args.metric)
        c, change, old = await set_calibration(conn, device_id, metric_id, args.effective_from, args.scale,
                                               args.offset, args.comment)
    except _Unknown as exc:
        fail(str(exc))
        return 1
    except CalibrationError as exc:
        if exc.pending is None:
            fail(f"{args.device} {args.metric}: {_named(exc, args)}")
        else:
            busy = exc.pending
            cursor = "" if busy.rewrite_cursor is None else f" (from {_when(busy.rewrite_cursor)} on)"
            fail(f"{args.device} {args.metric}: the calibration from {_when(busy.effective_from)} is still being "
                 f"applied to the stored readings{cursor}: finish it first "
                 f"with `sensor-ingest devices recalibrate {shlex.quote(args.device)} {shlex.quote(args.metric)}`, "
                 "then calibrate again")
        return 1
    was = f"{_factor(*old)} -> " if change == "corrected" and old is not None else ""
    print(f"{change}: {args.device} {args.metric} from {_when(c.effective_from)}: {was}{_factor(c.scale, c.offset)}"
          + (f" ({c.comment})" if c.comment else ""))
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM readings WHERE device_id = $1 AND metric_id = $2)",
                               device_id, metric_id):
        print(f"note: {args.device} has no stored reading of {args.metric} yet")
    if c.rewrite_cursor is None:
        print("no stored reading needed rewriting")
        return 0
    if args.no_rewrite:
        print(f"{await pending_readings(conn, c)} stored reading(s) from {_when(c.rewrite_cursor)} on still carry "
              f"{_factor(c.from_scale, c.from_offset)}: run `sensor-ingest devices recalibrate "
              f"{shlex.quote(args.device)} {shlex.quote(args.metric)}` to rewrite them")
        return 0
    await _rewrite_series(conn, device_id, metric_id, args.batch, stop, run)
    if run.stopped_by is not None:
        return await _stopped(conn, args, device_id, metric_id, run)
    print(f"{run.rewritten} readings rewritten from {_factor(c.from_scale, c.from_offset)} to "
          f"{_factor(c.scale, c.offset)}")
    return 0


async def _recalibrate(conn: Conn, args: argparse.Namespace, stop: _Stop, run: _Run) -> int:
    from ingest.store.calibration import series_calibrations

    try:
        device_id, metric_id = await _series(conn, args.device, args.metric)
    except _Unknown as exc:
        fail(str(exc))
        return 1
    pending = [c for c in await series_calibrations(conn, device_id, metric_id) if c.rewrite_cursor is not None]
    await _rewrite_series(conn, device_id, metric_id, args.batch, stop, run)
    if run.stopped_by is not None:
        return await _stopped(conn, args, device_id, metric_id, run)
    if not pending:
        print(f"0 readings rewritten: every calibration of {args.device} {args.metric} was applied already")
    else:
        print(f"{run.rewritten} readings rewritten: "
              + "; ".join(f"from {_when(c.effective_from)}, {_factor(c.from_scale, c.from_offset)} to "
                          f"{_factor(c.scale, c.offset)}" for c in pending))
    return 0


_LIST = """
SELECT d.uid AS device, m.name AS metric, c.effective_from,
       lead(c.effective_from) OVER (PARTITION BY c.device_id, c.metric_id ORDER BY c.effective_from) AS until,
       c.scale, c.offset_value, c.comment, c.rewrite_cursor, c.from_scale, c.from_offset, c.rewritten,
       c.created_at, c.updated_at
FROM calibrations c JOIN devices d ON d.id = c.device_id JOIN metrics m ON m.id = c.metric_id
"""


async def _list(args: argparse.Namespace) -> int:
    conn = await async_connect(client_settings(args.config))
    try:
        # The filters apply after the window: a span's end is the next calibration whatever is shown.
        rows = await conn.fetch(
            f"SELECT * FROM ({_LIST}) AS s WHERE ($1::text IS NULL OR device LIKE $1) "
            "AND ($2::text IS NULL OR metric LIKE $2) ORDER BY device, metric, effective_from",
            None if args.device is None else like(args.device), None if args.metric is None else like(args.metric))
    finally:
        await conn.close()
    items = [{
        "device": r["device"], "metric": r["metric"], "effective_from": r["effective_from"], "until": r["until"],
        "scale": r["scale"], "offset": r["offset_value"], "comment": r["comment"],
        "state": "applied" if r["rewrite_cursor"] is None else f"rewriting from {_when(r['rewrite_cursor'])}",
        "rewrite_cursor": r["rewrite_cursor"], "from_scale": r["from_scale"], "from_offset": r["from_offset"],
        "rewritten": r["rewritten"], "created_at": r["created_at"], "updated_at": r["updated_at"],
    } for r in rows]
    if args.json:
        print(json.dumps([{k: v if v is None or isinstance(v, int | float | str) else json_value(v)
                           for k, v in item.items()} for item in items], indent=2, ensure_ascii=False))
        return 0
    if not items:
        print("no calibrations" + ("" if args.device is None and args.metric is None else " match"))
        return 0
    columns = ["device", "metric", "from", "until", "scale", "offset", "comment", "state", "rewritten", "updated"]
    keys = ["device", "metric", "effective_from", "until", "scale", "offset", "comment", "state", "rewritten",
            "updated_at"]
    print_table(f"{len(items)} calibration(s)", columns,
                [[_num(item[k]) if isinstance(item[k], float) else cell(item[k], k) for k in keys] for item in items])
    return 0
