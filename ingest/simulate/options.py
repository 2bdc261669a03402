"""The `simulate` subcommand's options: parsed and checked here, run by ingest.simulate.run.

Kept apart from run.py so that building the CLI parser imports neither paho nor rich.
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime

from ingest.alerts.model import parse_duration
from ingest.errors import ConfigError, ConfigProblem
from ingest.routing import compile_template
from ingest.simulate.faults import FAULTS, FaultConfig, parse_faults
from ingest.simulate.fleet import DEFAULT_DEVICES, KINDS
from ingest.simulate.gaps import GapSpec, Window, parse_gap, parse_time
from ingest.simulate.patterns import HANOI

__all__ = ["add_simulate_parser", "cmd_simulate"]

DESCRIPTION = f"""\
Publish a simulated Hanoi sensor fleet to an MQTT broker, for demos and load tests: air-quality
stations, noise meters, water-level (flood) and rain gauges, traffic counters, smart meters and
street lights ({len(KINDS)} kinds, device ids like hn-aq-0001), spread over ten districts. Each
device speaks one payload family on its own topic:

  <prefix>/<district>/<device>/up      native (this project's JSON)
  <prefix>/<district>/<device>/senml   senml (RFC 8428)

Values follow a Hanoi day on the fleet clock (rush-hour traffic, noise and NO2, PM2.5 at the
morning rush and at night, lights from dusk to dawn, rain in afternoon bursts). Faults can be
switched on to watch what the service rejects (with a reason) and stores. Progress is shown live
when standard output is a terminal; a summary is printed at the end (--json for scripts).

The service must have sources for these topics. deploy/sensor-ingest.example.toml has them for
the default prefix "city"; --print-sources prints them for any prefix. A working demo:

  sensor-ingest migrate
  sensor-ingest run --config deploy/sensor-ingest.example.toml &
  sensor-ingest simulate --duration 60 --faults all --seed 7

or, under a prefix of your own, with a Hanoi day passing every two minutes:

  {{ cat deploy/sensor-ingest.example.toml; sensor-ingest simulate --print-sources --prefix demo; }} > demo.toml
  sensor-ingest run --config demo.toml &
  sensor-ingest simulate --prefix demo --rate 50 --speed 720

Timestamps: a message is timed when it is sent (wall clock, milliseconds, never twice the same
for one device). Only the daily pattern follows the fleet clock (--start, --speed): the service
rejects readings more than ingest.max_future (600 s) ahead or before ingest.earliest_time, which
a sped-up fleet clock would soon cross.

Backfill and scripted losses, for data-quality checks: --backfill 2h --interval 60 publishes the
past two hours instead, as fast as --rate allows, and exits. The window [end - 2h, end) (--end,
default now, floored to a multiple of the interval since the Unix epoch) is cut into 60 s buckets,
and each device sends exactly one message per bucket, at its own fixed phase (whole milliseconds,
1 ms to half an interval into the bucket, from --seed), valued by the daily pattern at its time.
--gap silences a device for a window and --drop loses a share of all messages; the summary then
counts per device what was published, skipped by a gap and dropped:

  sensor-ingest simulate --backfill 2h --interval 60 --rate 2000 --json \\
      --gap hn-aq-0001:10m-40m --gap hn-noise-0002:2026-11-25T07:00+07:00..2026-11-25T07:30+07:00 --drop 0.05

Exit status: 0 when the broker answered every message, 1 when it did not or could not be
reached, 2 for invalid options.
"""

EPILOG = """\
Environment:
  SENSOR_INGEST_MQTT_URL       the broker, when --mqtt-url is not given
  SENSOR_INGEST_MQTT_USERNAME  the user name, when neither the URL nor --username has one
  SENSOR_INGEST_MQTT_PASSWORD  the password (only ever from the environment; never logged)
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a number above 0")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more seconds")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: must be a probability between 0 and 1")
    return value


def _faults(text: str) -> frozenset[str]:
    try:
        return parse_faults(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _prefix(text: str) -> str:
    try:
        compile_template(f"{text}/{{district}}/{{device}}/up")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} cannot start a topic: {exc}") from exc
    if text.endswith("/") or "{" in text or "+" in text:
        raise argparse.ArgumentTypeError(f"{text!r}: use plain topic levels, e.g. city or demo/hanoi")
    return text


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be above 0, e.g. 2h")
    return value


def _interval(text: str) -> float:
    value = _duration(text)
    if value < 1 or abs(round(value * 1000) - value * 1000) > 1e-6:
        raise argparse.ArgumentTypeError(f"{text}: use 1 second or more, in whole milliseconds, e.g. 60")
    return value


def _end(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _gap(text: str) -> GapSpec:
    try:
        return parse_gap(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _start(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text}: not an ISO 8601 date and time, e.g. 2026-11-25T07:00") from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=HANOI)


def add_simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "simulate", help="publish a simulated city fleet over MQTT (demos, load), with faults on demand",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mqtt-url", metavar="URL",
                   help="broker to publish to, mqtt://[user@]host:port or mqtts:// for TLS (default: "
                   "$SENSOR_INGEST_MQTT_URL, else mqtt://127.0.0.1:1883); a password here is refused: "
                   "set SENSOR_INGEST_MQTT_PASSWORD")
    p.add_argument("--username", metavar="NAME",
                   help="MQTT user name (default: the URL's, else $SENSOR_INGEST_MQTT_USERNAME); the password "
                   "comes only from $SENSOR_INGEST_MQTT_PASSWORD")
    p.add_argument("--devices", type=_positive_int, default=DEFAULT_DEVICES, metavar="N",
                   help="fleet size; the kinds take turns, and within a kind the payload families, so "
                   f"{2 * len(KINDS)} or more devices have every kind in both families (default: %(default)s, "
                   "10 of each kind)")
    p.add_argument("--rate", type=_positive_float, default=20.0, metavar="MSG_PER_S",
                   help="messages per second from the whole fleet, evenly spread: each device publishes every "
                   "devices/rate seconds (default: %(default)s)")
    p.add_argument("--duration", type=_seconds, metavar="SECONDS",
                   help="stop after this many seconds; 0 runs until Ctrl-C or SIGTERM, which stop publishing, "
                   "wait up to 5 s for the broker's acks and print the summary (default: 0; not with --backfill)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the fleet (districts, device constants), the order of its messages, their "
                   "values and faults: the same seed (with the same --start, --rate and --speed) repeats a run, "
                   "up to the few milliseconds by which sending times differ (default: %(default)s)")
    p.add_argument("--prefix", type=_prefix, default="city", metavar="TOPIC",
                   help="first topic level(s) of every message; the service needs sources for it, see "
                   "--print-sources (default: %(default)s)")
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=1,
                   help="MQTT QoS of the messages; at 1 and 2 only what the broker acknowledged counts as "
                   "acked (default: %(default)s)")
    p.add_argument("--faults", type=_faults, default=frozenset(), metavar="LIST",
                   help=f"comma list of faults to inject, or all: {', '.join(FAULTS)}. bad-payload: truncated "
                   "JSON, NaN/Infinity, numbers as strings, a payload over 64 KiB (sent at QoS 0: brokers drop "
                   "it); silent: some devices stop after a few messages; spike: a valid value over an alert "
                   "threshold (PM2.5 > 300, water above flood level, ...); bad-clock: timestamps from 1970 or "
                   "a year ahead (default: none)")
    p.add_argument("--fault-rate", type=_probability, default=0.02, metavar="P",
                   help="probability of each enabled fault per message (at most one per message), and the "
                   "share of devices that go silent (at least one) (default: %(default)s)")
    p.add_argument("--start", type=_start, metavar="ISO8601",
                   help="fleet clock at the start, e.g. 2026-11-25T06:30 (Hanoi time unless it has an offset); "
                   "it drives the daily pattern only, not the timestamps (default: now; not with --backfill)")
    p.add_argument("--speed", type=_positive_float, metavar="X",
                   help="fleet clock speed: 720 lives a Hanoi day in 2 minutes. Timestamps stay wall-clock "
                   "time, so the service does not reject them as future (default: 1; not with --backfill)")
    p.add_argument("--backfill", type=_duration, metavar="DURATION",
                   help="publish the fleet's messages of this past window (e.g. 2h) ending at --end, one per "
                   "device every --interval, as fast as --rate allows, then exit; the summary gives each "
                   "device's expected count. Excludes --duration, --speed and --start")
    p.add_argument("--interval", type=_interval, metavar="SECONDS",
                   help="with --backfill (and required by it): seconds between two messages of a device, also "
                   "the bucket size (60 or 1m; at least 1, whole milliseconds)")
    p.add_argument("--end", type=_end, metavar="RFC3339",
                   help="with --backfill: end of the window, with its offset, e.g. 2026-11-25T09:00:00+07:00; "
                   "floored to a multiple of --interval since the epoch (default: now)")
    p.add_argument("--gap", type=_gap, action="append", default=[], metavar="DEVICE:FROM-TO",
                   help="repeatable: the device publishes nothing timed in [FROM, TO). FROM and TO are durations "
                   "from the start of the run (live: its first message; backfill: the window start), e.g. "
                   "hn-aq-0001:10m-40m, or RFC 3339 times, then separated by '..': "
                   "hn-aq-0001:2026-11-25T07:00+07:00..2026-11-25T07:30+07:00 (both forms take '..')")
    p.add_argument("--drop", type=_probability, default=0.0, metavar="P",
                   help="probability (0 to 1) that each message is lost, from a random stream of its own "
                   "(--seed): the values and faults of the other messages stay as they were (default: 0)")
    p.add_argument("--print-sources", action="store_true",
                   help="print the [[sources]] TOML the service needs for --prefix, and exit")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no live progress display (it is shown only when standard output is a terminal)")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object: published, acked, refused, counts per family, "
                   "kind and fault, and the devices of each family; with --backfill, --gap or --drop also "
                   "per_device (published, acked, gap, dropped, silent; with --backfill expected, start, end, "
                   "interval) and the totals gap and dropped")
    return p


def cmd_simulate(args: argparse.Namespace) -> int:
    from ingest.simulate.families import sources_toml

    if args.print_sources:
        print(sources_toml(args.prefix), end="")
        return 0
    from ingest.simulate.run import SimulateOptions, broker_from, simulate

    options = SimulateOptions(
        broker=broker_from(args.mqtt_url, args.username, os.environ),
        devices=args.devices, rate=args.rate, duration=args.duration or 0.0, seed=args.seed, prefix=args.prefix,
        qos=args.qos, faults=FaultConfig(args.faults, args.fault_rate), start=args.start,
        speed=args.speed or 1.0, quiet=args.quiet, json=args.json, backfill=_window(args),
        gaps=tuple(args.gap), drop=args.drop,
    )
    return simulate(options)


def _window(args: argparse.Namespace) -> Window | None:
    """The backfill window, or None for a live run; ConfigError (exit 2) for options that do not go together."""
    if args.backfill is None:
        alone = [name for name, value in (("--interval", args.interval), ("--end", args.end)) if value is not None]
        if alone:
            raise ConfigError("simulate", [ConfigProblem(
                alone[0], "only applies to a backfill", "add --backfill DURATION, e.g. --backfill 2h")])
        return None
    live = [name for name, value in (("--duration", args.duration), ("--speed", args.speed),
                                     ("--start", args.start)) if value is not None]
    problems = []
    if live:
        problems.append(ConfigProblem(
            "--backfill", f"cannot be combined with {', '.join(live)}: a backfill publishes a past window "
            "timed by its own buckets, as fast as --rate allows, then exits",
            f"drop {', '.join(live)}, or --backfill for a live run"))
    if args.interval is None:
        problems.append(ConfigProblem("--interval", "is required with --backfill", "add e.g. --interval 60"))
    if problems:
        raise ConfigError("simulate", problems)
    return Window.ending(args.end or datetime.now(HANOI), args.backfill, args.interval)
