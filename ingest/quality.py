"""Data quality per device: `sensor-ingest quality` and the fleet gauges.

Every figure is computed by SQL over readings, devices and rejected_messages (time_bucket), in one
snapshot; nothing keeps a second copy of the data. The definitions, for a window that ends at ``at`` and
lasts ``window`` seconds:

- The lookback: readings are read in [at - lookback, at) only, so that TimescaleDB opens only the chunks
  of that span whatever the age of the hypertable (every bound is a constant of the statement, planned for
  its values). lookback() is the longest of LOOKBACK (7 days), twice the window, the window plus the
  longest declared interval (of a device or a source) and stale_after x that interval: every bucket whose
  centre is in the window lies inside it, and a series with no reading in it would be stale with any
  declared interval.
- The series: every (device, metric) of the selected devices with a numeric reading in the lookback:
  those with readings in the window, and those silent all window (completeness 0, and stale). They are
  found by a loose index scan of readings_key (device_id, metric_id, time), a recursive query that
  probes once per series. DISTINCT ON (device_id, metric_id) would need TimescaleDB's SkipScan, which the
  Apache-licensed build lacks; without it, it sorts every reading of the span.
- Silent devices: a device of the register with no series in the lookback whose devices.last_seen is
  NULL (never reported: imported, or every message rejected) or older than the lookback is reported once,
  with no metric, last reading devices.last_seen, stale, and, when an interval is declared for it,
  expected = floor(window / interval) and received 0. (A device seen within the lookback but with no
  numeric reading in it, e.g. text states only, or only after an ``at`` in the past, is not reported.)
- The expected interval of a series: the device's (devices.expected_interval, the register), else its
  source's (the expected_interval of the [[sources]] entry named by devices.source), else learned: the
  median of the gaps between its last ``learn_from`` readings of the lookback, rounded to a whole second
  (at least 1 s). Fewer than 3 readings and nothing declared: unknown, and then neither completeness
  nor staleness is computed.
- Buckets of a series with interval i follow the series' own phase, taken from its last reading L before
  ``at``: time_bucket(i, time, origin => L - i/2), so that the centres of the buckets are L + k*i and a
  reading up to i/2 early or late stays in its slot's bucket (buckets aligned to the clock would split a
  device that reports near their boundary with a little jitter into pairs and holes). Expected: the
  buckets whose centre lies in [at - window, at), exactly window / i of them when the window is a
  multiple of i. Received: those of them holding at least one reading. Completeness = received /
  expected (never above 1; none when no centre falls in the window).
- Readings: the plain count of the series' readings in [at - window, at); suspect: those with flag 1.
- Stale: at - (last reading) > stale_after * i; a silent device always.
- Rejected by reason: rejected_messages rows received in the window whose device_uid is the device,
  per reason, as a ratio to the device's expected messages (the expected buckets of its series with
  the shortest interval, or a silent device's floor(window / declared interval)). Rows with no device,
  or a device that is not in the register, are counted per reason for the whole fleet.
- Fleet: the devices reported (with a series, or silent); reporting (a reading in the window), stale (a
  stale series, or silent), incomplete (a series less complete than ``below`` percent). The gauges
  (fleet_quality) are computed by every service process that has quality.every > 0, on a connection of
  its writer's pool, each statement limited to gauges_timeout(quality.every).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from ingest.clikit import cell, client_settings, fail, json_value, like, since, table

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    from ingest.settings import QualitySettings, Settings

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = ["LOOKBACK", "FleetQuality", "QualityReport", "Rejected", "SeriesQuality", "add_quality_parser",
           "as_json", "cmd_quality", "expected_messages", "fleet_of", "fleet_quality", "gauges_timeout",
           "lookback", "read_report", "series_quality", "source_intervals"]

LOOKBACK = 7 * 86400.0  # seconds: the shortest span searched for a device's series before `at`

# $1 at, $2 window (s), $3 stale_after, $4 learn_from, $5/$6 source names / intervals, $7 district, $8 uid LIKE,
# $9 the start of the lookback. Every scan of readings is bounded by [$9, $1): TimescaleDB then excludes
# the chunks outside (a probe with no lower bound descends the index of every chunk ever kept).
SERIES_SQL = """
WITH RECURSIVE dev AS (
    SELECT d.id, d.uid, d.attributes ->> 'district' AS district, d.last_seen, d.expected_interval AS own,
           s.every AS of_source
    FROM devices d
    LEFT JOIN unnest($5::text[], $6::float8[]) AS s(name, every) ON s.name = d.source
    WHERE ($7::text IS NULL OR d.attributes ->> 'district' = $7) AND ($8::text IS NULL OR d.uid LIKE $8)
),
keys AS (  -- the metrics of each device: a loose index scan of readings_key, one probe per series
    SELECT dev.id AS device_id,
           (SELECT min(r.metric_id) FROM readings r
            WHERE r.device_id = dev.id AND r.time >= $9::timestamptz AND r.time < $1::timestamptz) AS metric_id
    FROM dev
    UNION ALL
    SELECT k.device_id,
           (SELECT min(r.metric_id) FROM readings r
            WHERE r.device_id = k.device_id AND r.metric_id > k.metric_id
              AND r.time >= $9::timestamptz AND r.time < $1::timestamptz)
    FROM keys k
    WHERE k.metric_id IS NOT NULL
),
last AS MATERIALIZED (
    SELECT k.device_id, k.metric_id,
           (SELECT max(r.time) FROM readings r
            WHERE r.device_id = k.device_id AND r.metric_id = k.metric_id
              AND r.time >= $9::timestamptz AND r.time < $1::timestamptz) AS last_time
    FROM keys k
    WHERE k.metric_id IS NOT NULL
),
series AS (
    SELECT l.device_id, l.metric_id, l.last_time, dev.uid, dev.district,
           COALESCE(dev.own, dev.of_source, learned.gap) AS every,
           CASE WHEN dev.own IS NOT NULL THEN 'device' WHEN dev.of_source IS NOT NULL THEN 'source'
                WHEN learned.gap IS NOT NULL THEN 'learned' END AS every_from
    FROM last l
    JOIN dev ON dev.id = l.device_id
    LEFT JOIN LATERAL (
        SELECT greatest(1, round(percentile_cont(0.5) WITHIN GROUP (ORDER BY g.gap))) AS gap
        FROM (SELECT extract(epoch FROM t.time - lag(t.time) OVER (ORDER BY t.time))::float8 AS gap
              FROM (SELECT x.time FROM readings x
                    WHERE x.device_id = l.device_id AND x.metric_id = l.metric_id
                      AND x.time >= $9 AND x.time < $1
                      AND dev.own IS NULL AND dev.of_source IS NULL
                    ORDER BY x.time DESC LIMIT $4) t) g
        HAVING count(g.gap) >= 2
    ) learned ON true
),
-- Materialized: inlined, its expressions would be evaluated again for every reading counted (measured: 3 times
-- slower over a day of 1,000 series).
phased AS MATERIALIZED (  -- buckets of the series' own phase: centred on last_time + k * iv, k <= 0
    SELECT s.*, b.iv, b.half, b.first, b.last,
           -- the bucket of the first centre in the window: the scan for received starts there
           s.last_time - b.half + b.iv * b.first::float8 AS first_start
    FROM series s
    CROSS JOIN LATERAL (
        SELECT make_interval(secs => s.every) AS iv, make_interval(secs => s.every) / 2 AS half,
               extract(epoch FROM $1 - s.last_time) AS since_last
    ) v
    CROSS JOIN LATERAL (  -- the centres in [at - window, at): k from `first` to `last` (numeric: exact)
        SELECT v.*, ceil((v.since_last - $2::float8::numeric) / extract(epoch FROM v.iv)) AS first,
               ceil(v.since_last / extract(epoch FROM v.iv)) - 1 AS last
    ) b
)
SELECT p.uid AS device, p.district, m.name AS metric, p.every AS interval, p.every_from AS interval_from,
       (p.last - p.first + 1)::bigint AS expected,
       CASE WHEN p.iv IS NOT NULL THEN c.received END AS received,
       c.readings, c.suspect, p.last_time AS last_reading,
       p.every IS NOT NULL AND extract(epoch FROM $1 - p.last_time)::float8 > $3 * p.every AS stale
FROM phased p
JOIN metrics m ON m.id = p.metric_id
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE r.time >= $1 - make_interval(secs => $2)) AS readings,
           count(*) FILTER (WHERE r.time >= $1 - make_interval(secs => $2) AND r.flags & 1 <> 0) AS suspect,
           -- a reading here is at or before last_time: the centre of its bucket is before at
           count(DISTINCT time_bucket(p.iv, r.time, p.last_time - p.half)) FILTER (WHERE r.time >= p.first_start)
               AS received
    FROM readings r
    WHERE r.device_id = p.device_id AND r.metric_id = p.metric_id AND r.time < $1
      AND r.time >= least(p.first_start, $1 - make_interval(secs => $2))
      AND r.time >= $9  -- the lookback, as a constant: the chunks before it are not even opened per series
) c
UNION ALL
-- The silent devices: in the register, no series in the lookback, and not seen since its start.
SELECT dev.uid, dev.district, NULL, COALESCE(dev.own, dev.of_source),
       CASE WHEN dev.own IS NOT NULL THEN 'device' WHEN dev.of_source IS NOT NULL THEN 'source' END,
       floor($2::float8::numeric / COALESCE(dev.own, dev.of_source)::numeric)::bigint,
       CASE WHEN COALESCE(dev.own, dev.of_source) IS NOT NULL THEN 0 END,
       0, 0, dev.last_seen, true
FROM dev
WHERE (dev.last_seen IS NULL OR dev.last_seen < $9)
  AND NOT EXISTS (SELECT 1 FROM last l WHERE l.device_id = dev.id)
ORDER BY device, metric NULLS FIRST
"""

# The series query's cost estimate (a subquery per series) is high enough for PostgreSQL to compile it (JIT),
# which takes longer than running it. And a plan for the values of its parameters, every time: the generic
# plan that a prepared statement gets after five runs keeps every chunk of readings in its probes (measured
# on 300 series over 365 daily chunks: 0.03 s with the lookback's chunks only, 0.54 to 0.71 s generic).
_PLANNING = "SET LOCAL jit = off; SET LOCAL plan_cache_mode = force_custom_plan"
_TIMEOUT = "SELECT set_config('statement_timeout', $1, true)"  # SET LOCAL, parameterised

# The longest interval declared for a device; those of the sources come from the configuration.
_LONGEST_DECLARED = "SELECT max(expected_interval) FROM devices"

# $1 at, $2 window (s), $3 district, $4 uid LIKE.
REJECTED_SQL = """
SELECT d.uid AS device, r.reason, count(*) AS count
FROM rejected_messages r
JOIN devices d ON d.uid = r.device_uid
WHERE r.received_at >= $1::timestamptz - make_interval(secs => $2::float8) AND r.received_at < $1
  AND ($3::text IS NULL OR d.attributes ->> 'district' = $3) AND ($4::text IS NULL OR d.uid LIKE $4)
GROUP BY d.uid, r.reason
ORDER BY d.uid, r.reason
"""

# $1 at, $2 window (s).
UNATTRIBUTED_SQL = """
SELECT r.reason, count(*) AS count
FROM rejected_messages r
WHERE r.received_at >= $1::timestamptz - make_interval(secs => $2::float8) AND r.received_at < $1
  AND (r.device_uid IS NULL OR NOT EXISTS (SELECT 1 FROM devices d WHERE d.uid = r.device_uid))
GROUP BY r.reason
ORDER BY r.reason
"""


@dataclass(frozen=True)
class SeriesQuality:
    """One (device, metric) over the window. ``interval`` None: unknown, and so are expected and received.

    ``metric`` None: a silent device (no series in the lookback; never seen, or not since its start),
    with ``last_reading`` its devices.last_seen (None: never seen)."""

    device: str
    district: str | None
    metric: str | None
    interval: float | None
    interval_from: str | None  # device, source or learned
    expected: int | None
    received: int | None
    readings: int
    suspect: int
    last_reading: datetime | None
    stale: bool

    @property
    def completeness(self) -> float | None:
        """received / expected; None when the interval is unknown or no bucket centre falls in the window."""
        if not self.expected or self.received is None:
            return None
        return self.received / self.expected

    def below(self, percent: float) -> bool:
        """Less complete than ``percent`` (exact: no division); False when completeness is not computed."""
        if not self.expected or self.received is None:
            return False
        return 100 * self.received < percent * self.expected


@dataclass(frozen=True)
class Rejected:
    """The rejections of one device for one reason over the window."""

    device: str
    reason: str
    count: int
    expected_messages: int | None  # see expected_messages()

    @property
    def ratio(self) -> float | None:
        return self.count / self.expected_messages if self.expected_messages else None


@dataclass(frozen=True)
class FleetQuality:
    """Device counts over the series of the selected devices (the gauges: over every device)."""

    devices: int  # devices reported: with a series, or silent
    devices_reporting: int  # with a reading in the window
    devices_stale: int  # with a stale series, or silent
    devices_incomplete: int  # with a series less complete than `below` percent


@dataclass(frozen=True)
class QualityReport:
    at: datetime
    window: float
    stale_after: float
    below: float
    series: list[SeriesQuality]
    rejected: list[Rejected]
    unattributed: dict[str, int]  # reason -> rejections with no device, or one not in the register
    fleet: FleetQuality


def source_intervals(settings: Settings) -> dict[str, float]:
    """Source name -> its declared expected_interval, for the sources (and presets) that declare one."""
    return {s.name: s.expected_interval for s in settings.all_sources() if s.expected_interval is not None}


def fleet_of(series: list[SeriesQuality], below: float) -> FleetQuality:
    devices = {s.device for s in series}
    return FleetQuality(
        devices=len(devices),
        devices_reporting=len({s.device for s in series if s.readings > 0}),
        devices_stale=len({s.device for s in series if s.stale}),
        devices_incomplete=len({s.device for s in series if s.below(below)}),
    )


def expected_messages(series: list[SeriesQuality]) -> dict[str, int]:
    """Device -> the expected buckets of its series with the shortest known interval (a silent device's
    one row: floor(window / its declared interval))."""
    shortest: dict[str, SeriesQuality] = {}
    for s in series:
        if s.interval is not None and s.expected is not None:
            best = shortest.get(s.device)
            if best is None or s.interval < (best.interval or 0):
                shortest[s.device] = s
    return {device: s.expected or 0 for device, s in shortest.items()}


def lookback(window: float, stale_after: float, longest_declared: float | None) -> float:
    """Seconds before ``at`` from which readings are read: the longest of LOOKBACK; twice the window and the
    window plus the longest declared interval (every bucket whose centre is in the window lies after its
    start: half a declared interval, and half a learned one, about a quarter of the lookback at most since it is
    learned from readings inside it); and stale_after x the longest declared interval (a series with no
    reading in the lookback would be stale whatever its declared interval)."""
    declared = longest_declared or 0.0
    return max(LOOKBACK, 2 * window, window + declared, stale_after * declared)


def gauges_timeout(every: float) -> float:
    """Seconds each statement of the gauges' read may take: a tenth of quality.every, within [5 s, 20 s]: it
    holds a connection of the writer's pool, whose command_timeout (30 s by default) is the hard limit."""
    return min(20.0, max(5.0, every / 10))


async def series_quality(conn: Conn, *, at: datetime, window: float, stale_after: float, learn_from: int,
                         source_intervals: dict[str, float], district: str | None = None,
                         device: str | None = None) -> list[SeriesQuality]:
    """The series of the devices selected by ``district`` and ``device`` (a LIKE pattern), by device and metric,
    and their silent devices (one row each)."""
    names = sorted(source_intervals)
    longest = max([await conn.fetchval(_LONGEST_DECLARED) or 0.0, *source_intervals.values()])
    start = at - timedelta(seconds=lookback(window, stale_after, longest))
    rows = await conn.fetch(SERIES_SQL, at, window, stale_after, learn_from, names,
                            [source_intervals[n] for n in names], district, device, start)
    return [SeriesQuality(**dict(row)) for row in rows]


async def fleet_quality(conn: Conn, quality: QualitySettings, source_intervals: dict[str, float],
                        now: datetime) -> FleetQuality:
    """The fleet gauges' figures as of ``now``, over quality.window, for every device. Every worker runs it
    on its writer pool's connection: each statement is limited to gauges_timeout(quality.every)."""
    async with conn.transaction(readonly=True):
        await conn.execute(_PLANNING)
        await conn.execute(_TIMEOUT, f"{round(gauges_timeout(quality.every) * 1000)}ms")
        series = await series_quality(conn, at=now, window=quality.window, stale_after=quality.stale_after,
                                      learn_from=quality.learn_from, source_intervals=source_intervals)
    return fleet_of(series, quality.below)


async def read_report(conn: Conn, *, at: datetime, window: float, stale_after: float, below: float,
                      learn_from: int, source_intervals: dict[str, float], district: str | None = None,
                      device: str | None = None) -> QualityReport:
    """Every figure of `sensor-ingest quality`, from one snapshot (a read-only repeatable-read transaction)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(_PLANNING)
        series = await series_quality(conn, at=at, window=window, stale_after=stale_after, learn_from=learn_from,
                                      source_intervals=source_intervals, district=district, device=device)
        per_device = expected_messages(series)
        rejected = [Rejected(device=r["device"], reason=r["reason"], count=r["count"],
                             expected_messages=per_device.get(r["device"]))
                    for r in await conn.fetch(REJECTED_SQL, at, window, district, device)]
        unattributed = {r["reason"]: r["count"] for r in await conn.fetch(UNATTRIBUTED_SQL, at, window)}
    return QualityReport(at=at, window=window, stale_after=stale_after, below=below, series=series,
                         rejected=rejected, unattributed=unattributed, fleet=fleet_of(series, below))


# -- the command --------------------------------------------------------------------------------------------

DESCRIPTION = """\
Data quality per device and metric over a window (default: [quality] window, 24h) that ends at --at
(default: now), computed by SQL over readings, devices and rejected_messages:

  interval      the expected interval between readings, and where it comes from: device (the register's
                expected_interval), source (its [[sources]] expected_interval) or learned (the median gap of
                the series' last [quality] learn_from readings, rounded to a second); "-": unknown (fewer
                than 3 readings and nothing declared), and then no completeness and no staleness
  expected      the interval buckets whose centre lies in the window; the buckets follow the series' own
                phase: centred on its last reading before --at and every interval before it, so that a
                reading up to half an interval early or late stays in its slot (window / interval of them
                when the window is a multiple of the interval)
  received      the expected buckets that hold at least one reading
  readings      the readings in the window; complete % = received / expected; suspect % = readings stored
                with the suspect flag / readings
  stale         no reading for more than --stale-after (default: [quality] stale_after) intervals before --at

Every series of the selected devices that has a reading in the lookback before --at (the longest of 7
days, twice the window, the window plus the longest declared interval, and --stale-after times that
interval) is shown, including those silent all window (completeness 0). A device of the register with
no series there that was never seen, or not since the lookback's start, is shown once: metric "-", its
last reading (the register's last_seen, or "never"), stale, and with an interval declared, window /
interval expected buckets (rounded down), none received. Then the rejections of each device in the
window by reason, as a ratio to its expected messages (the expected buckets of its series with the
shortest interval, or those of its one row), and the fleet line: devices, reporting, stale, and
incomplete (a series below --below, default [quality] below, percent); rejections with no device, or
one not in the register, are counted there by reason.

Exit status: 0; 2 when the configuration is invalid or the database cannot be read.
"""


def _window(text: str) -> float:
    from ingest.alerts.model import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the window must be longer than 0")
    return seconds


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of percent, e.g. 90") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text}: a percentage above 0 and at most 100")
    return value


def _factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of intervals, e.g. 3") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: a number of intervals above 0")
    return value


def add_quality_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "quality", help="data quality per device: completeness, staleness, suspect and rejected ratios",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment (overrides the file):\n"
        "  SENSOR_INGEST_DATABASE_URL        database.url\n"
        "  SENSOR_INGEST_DATABASE_PASSWORD   the database password (only from the environment)",
    )
    p.add_argument("--config", "-c", metavar="FILE", type=Path,
                   help="the service's TOML config file: its [database], [quality] and the expected_interval of "
                   "its [[sources]] (optional: the environment may be enough)")
    p.add_argument("--window", type=_window, metavar="DURATION",
                   help="how far back from --at: 30m, 24h, 7d or seconds (default: [quality] window)")
    p.add_argument("--at", type=since, metavar="T",
                   help="the end of the window: RFC 3339 with an offset (2026-11-25T03:00:00Z) or a duration back "
                   "from now (2h) (default: now)")
    p.add_argument("--district", metavar="D", help="only the devices whose district attribute is D")
    p.add_argument("--device", metavar="GLOB", help="only these device ids; * and ? are wildcards, e.g. 'hn-aq-*'")
    p.add_argument("--below", type=_percent, metavar="PCT",
                   help="show only the series less complete than PCT percent, and the stale ones; also the "
                   "threshold of the fleet line's incomplete count (default: all series; [quality] below)")
    p.add_argument("--stale-after", type=_factor, metavar="K",
                   help="stale after K expected intervals without a reading (default: [quality] stale_after)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def cmd_quality(args: argparse.Namespace) -> int:
    settings = client_settings(args.config)
    q = settings.quality
    at: datetime = args.at or datetime.now(UTC)
    window: float = args.window or q.window
    below: float = args.below or q.below
    stale_after: float = args.stale_after or q.stale_after
    report = asyncio.run(_read(settings, at=at, window=window, stale_after=stale_after, below=below,
                               learn_from=q.learn_from, district=args.district,
                               device=like(args.device) if args.device else None))
    if report is None:
        return 2
    shown = [s for s in report.series if s.stale or s.below(args.below)] if args.below else report.series
    if args.json:
        print(json.dumps(as_json(report, shown), indent=2, ensure_ascii=False, default=json_value))
    else:
        _print(report, shown, args)
    return 0


async def _read(settings: Settings, **kwargs: Any) -> QualityReport | None:
    import asyncpg

    from ingest.clikit import async_connect
    from ingest.settings import mask_url

    conn = await async_connect(settings)
    where = mask_url(settings.database.url)
    try:
        return await read_report(conn, source_intervals=source_intervals(settings), **kwargs)
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError, asyncpg.UndefinedFunctionError) as exc:
        fail(f"the database at {where} lacks what data quality reads ({exc}): its schema is older than this "
             "release; run `sensor-ingest migrate`")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        fail(f"cannot read the database at {where}: {str(exc).strip() or type(exc).__name__}")
    finally:
        await conn.close()
    return None


def as_json(report: QualityReport, shown: list[SeriesQuality]) -> dict[str, Any]:
    def pct(part: int | None, whole: int | None) -> float | None:
        return None if part is None or not whole else 100 * part / whole

    return {
        "at": report.at,
        "from": report.at - timedelta(seconds=report.window),
        "window": report.window,
        "stale_after": report.stale_after,
        "below": report.below,
        "series": [asdict(s) | {"completeness_pct": pct(s.received, s.expected),
                                "suspect_pct": pct(s.suspect, s.readings)} for s in shown],
        "rejected": [asdict(r) | {"ratio": r.ratio} for r in report.rejected],
        "rejected_without_device": report.unattributed,
        "fleet": asdict(report.fleet),
    }


def _seconds(v: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if v >= size and v % size == 0:
            return f"{v / size:g}{unit}"
    return f"{v:g}s"


def _pct(part: int | None, whole: int | None) -> str:
    return "-" if part is None or not whole else f"{100 * part / whole:.1f}"


def _print(report: QualityReport, shown: list[SeriesQuality], args: argparse.Namespace) -> None:
    filters = [f"{k} {getattr(args, k)}" for k in ("district", "device") if getattr(args, k)]
    if args.below:
        filters.append(f"below {args.below:g} % or stale")
    scope = f"{_seconds(report.window)} to {cell(report.at, 'at')}" + (f" ({', '.join(filters)})" if filters else "")
    if not report.series:
        print(f"no series: no device selected has a reading before {cell(report.at, 'at')} in the lookback, and "
              "none is silent" +
              (f" ({', '.join(filters)})" if filters else ""))
    elif not shown:
        print(f"data quality over {scope}: every one of the {len(report.series)} series is complete and fresh")
    else:
        rows = [[s.device, s.district or "-", s.metric or "-", "-" if s.interval is None else _seconds(s.interval),
                 s.interval_from or "-", cell(s.expected, ""), cell(s.received, ""), str(s.readings),
                 _pct(s.received, s.expected), _pct(s.suspect, s.readings),
                 "never" if s.last_reading is None else cell(s.last_reading, ""), "STALE" if s.stale else ""]
                for s in shown]
        table(f"data quality over {scope}", ["device", "district", "metric", "interval", "from", "expected",
                                              "received", "readings", "complete %", "suspect %", "last reading",
                                              "stale"], rows)
    if report.rejected:
        table("rejected by reason", ["device", "reason", "count", "expected messages", "ratio %"],
              [[r.device, r.reason, str(r.count), cell(r.expected_messages, ""),
                _pct(r.count, r.expected_messages)] for r in report.rejected])
    f = report.fleet
    line = (f"fleet: {f.devices} device(s), {f.devices_reporting} reporting, {f.devices_stale} stale, "
            f"{f.devices_incomplete} incomplete (a series below {report.below:g} %)")
    if report.unattributed:
        line += "; rejected without a registered device: " + ", ".join(
            f"{reason} {n}" for reason, n in report.unattributed.items())
    print(line)
