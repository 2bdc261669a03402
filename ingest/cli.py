"""The `sensor-ingest` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ingest import __version__
from ingest.alerts.cli import add_alerts_parsers, cmd_alerts, cmd_rules
from ingest.alerts.silence_cli import add_silences_parser, cmd_silences
from ingest.clikit import DatabaseUnavailable, rfc3339
from ingest.errors import ConfigError, DecodeError, MigrationError
from ingest.logs import is_secret_name, mask_secrets, setup_logging
from ingest.model import RawMessage
from ingest.quality import add_quality_parser, cmd_quality
from ingest.quarantine import add_quarantine_parsers, cmd_rejected, cmd_replay
from ingest.register.cli import add_devices_parsers, cmd_devices
from ingest.settings import ENV_SHORT_NAMES, Settings, SourceSettings, load_settings, mask_url
from ingest.simulate.options import add_simulate_parser, cmd_simulate
from ingest.supervisor import BACKOFF_FIRST, BACKOFF_MAX, MAX_CLIENT_ID, MAX_WORKERS, STEADY_AFTER, STOP_TIMEOUT

__all__ = ["main"]

log = logging.getLogger("ingest")

_ENV_HELP = "\n".join(f"  {name:34s} {section}.{key}" for name, (section, key) in ENV_SHORT_NAMES.items())

DESCRIPTION = f"""\
sensor-ingest collects a city's sensor readings from MQTT gateways of any make, keeps only data that
is correct, complete and clean, and writes it to TimescaleDB. A message is acknowledged to the broker
only after the transaction holding its readings (or its rejection) has committed.

Configuration: one TOML file (--config; deploy/sensor-ingest.example.toml documents every key),
overridden by the environment. These variables are enough on their own:
{_ENV_HELP}
Any other key: SENSOR_INGEST_<SECTION>__<KEY>, e.g. SENSOR_INGEST_MQTT__CLIENT_ID=ingest-2.
Passwords are read only from the environment, never from the file.
"""


RUN_DESCRIPTION = f"""\
Run the ingest service until SIGTERM or SIGINT, then flush, commit, acknowledge and disconnect (the
broker keeps the session). Serves /healthz, /readyz and /metrics on SENSOR_INGEST_HTTP_ADDR. The
database must be migrated first (sensor-ingest migrate).

Several workers on one machine: --workers N (or ingest.workers = N), N from 2 to {MAX_WORKERS}. A supervisor
process starts N worker processes, each the whole service, sharing the load through the
MQTT shared subscription $share/<mqtt.shared_group>/<filter>. mqtt.shared_group is required: without
it every worker would get every message, so the supervisor refuses to start (exit 2). Worker k gets:
  client id  worker 1 mqtt.client_id itself (it keeps a single service's session), worker k >= 2
             <mqtt.client_id>-k; stable, so a restarted worker finds its session and what is queued
             there (ids past {MAX_CLIENT_ID} characters are refused)
  HTTP       the port of http.addr + k - 1 on the same host (each worker its own /metrics, /readyz);
             port 0: an ephemeral port each; a last port past 65535 is refused
  logs       one stderr; "[wk]" before each text line, "worker": k in each JSON line
Signals go to the supervisor (its pid; each worker has a process group of its own):
  SIGTERM, SIGINT  SIGTERM to every worker, which flushes, commits, acknowledges and disconnects;
                   one still running after {STOP_TIMEOUT:.0f} s is killed (the broker redelivers what it had
                   not acknowledged). Exit 0 when every worker stopped cleanly.
  SIGHUP           forwarded to every worker: each reloads its alert rules from the config file.
                   (`sensor-ingest rules reload` asks worker 1's HTTP port only.)
A worker that dies is started again after {BACKOFF_FIRST:.0f} s, the wait doubling each time up to {BACKOFF_MAX:.0f} s
({BACKOFF_FIRST:.0f} s again after a run of {STEADY_AFTER:.0f} s). A worker that exits with code 2 (a configuration or
database schema problem) stops them all, and the supervisor exits 2. Lowering N leaves the
dropped workers' sessions at the broker: it goes on queueing their share of the group's messages
there until mqtt.session_expiry, and those are stored only if a worker with that client id comes
back before then.
"""


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of workers") from None
    if not 1 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{n} workers: give 1 to {MAX_WORKERS}")
    return n


def _worker_index(text: str) -> int:
    return _workers(text)


def _config_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = f"Environment (overrides the file):\n{_ENV_HELP}\nPasswords only from the environment."
    p.add_argument(
        "--config", "-c", metavar="FILE", type=Path, required=required,
        help="TOML config file" + ("" if required else " (optional: the environment may be enough)"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sensor-ingest", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sensor-ingest {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "run", help="run the service: subscribe, decode, validate, store, acknowledge",
        description=RUN_DESCRIPTION,
    )
    _config_arg(p)
    p.add_argument(
        "--workers", metavar="N", type=_workers,
        help=f"run N worker processes under a supervisor, sharing the load (1 to {MAX_WORKERS}; overrides "
        "ingest.workers; default: ingest.workers, 1). N > 1 needs mqtt.shared_group: see above",
    )
    # How the supervisor starts worker k (ingest.supervisor.worker_command); not for people.
    p.add_argument("--worker-index", metavar="K", type=_worker_index, help=argparse.SUPPRESS)
    p.add_argument("--supervisor-pid", metavar="PID", type=int, help=argparse.SUPPRESS)

    p = sub.add_parser(
        "migrate", help="create or update the database schema (safe to run again, and concurrently)",
        description="Apply pending schemas/migrations/*.sql in order, each in its own transaction. "
        "Creates the timescaledb extension first and says what to do when it cannot.",
    )
    _config_arg(p)

    p = sub.add_parser(
        "check-config", help="validate a config file and report every problem with its key and fix",
        description="Validate FILE together with the SENSOR_INGEST_* environment, without any network "
        "call. Exit 0 when valid, 2 when not.",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--show", action="store_true", help="print the effective settings (passwords masked)")

    p = sub.add_parser(
        "decode", help="dry run: decode one payload through a source and print the readings",
        description="Decode a payload the way the service would, and print the readings and any "
        "rejection as JSON. Touches neither the broker nor the database. With no --format and no "
        "--source, the source whose template matches --topic decodes it (configured sources first, "
        "then the presets); when none does, the auto format tells the family from the payload, and "
        "the device is the topic's second level after a known first level (tele/<device>/...), else "
        "the whole topic.",
    )
    _config_arg(p)
    p.add_argument("--source", help="source name from the config or a preset part (default: the source matching "
                   "--topic)")
    p.add_argument("--format", help="decode with this format instead of a configured source: "
                   "native, senml, json, lorawan, line, value or auto (a configured source's mapping is kept)")
    p.add_argument("--received-at", metavar="TIME", type=_aware_time,
                   help="the receive time to assume, RFC 3339 with an offset (default: now); the time of "
                   "readings whose payload has none")
    p.add_argument("--topic", required=True, help="the topic the payload arrived on")
    p.add_argument("--template", metavar="TEMPLATE",
                   help="with --format and no matching source: the topic template, e.g. 'tele/{device}/SENSOR' "
                   "(its {device} and other captures apply as in a source)")
    p.add_argument("--device", help="with --format and no matching source: the device of a payload that names "
                   "none, when the template has no {device} (default: the whole topic)")
    p.add_argument("payload", nargs="?", type=Path, help="payload file (default: standard input)")

    p = sub.add_parser(
        "presets", help="list the built-in sources for common firmware, with their filters and mappings",
        description="List the presets (built-in sources, each on unless [presets] <name> = false, or replaced "
        "by a [[sources]] entry of the same name): for each, its parts with topic template, subscription "
        "filter, format, options, excluded topics and mapping, and whether the config leaves it on.",
    )
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "catalog", help="list the metric catalog: quantities, units, ranges and their sources; or how a metric binds",
        description="List the quantities of the metric catalog (built in, with the config's [[metrics]] applied): "
        "stored unit, kind, possible range (outside: rejected, out_of_range), plausible range (outside: stored "
        "as suspect), aliases and where the ranges come from. With --metric, which quantity a stored metric "
        "name binds to; with --unit too, how a value in that unit is converted.",
    )
    _config_arg(p)
    p.add_argument("--metric", help="a stored metric name, e.g. AM2301.Temperature: the quantity it binds to")
    p.add_argument("--unit", help="with --metric: a unit the readings state, e.g. F, ppb, µg/m³")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    add_simulate_parser(sub)
    add_alerts_parsers(sub)
    add_silences_parser(sub)
    add_devices_parsers(sub)
    add_quarantine_parsers(sub)
    add_quality_parser(sub)
    return parser


def _aware_time(text: str) -> datetime:
    return rfc3339(text)


def _settings(path: Path | None) -> Settings:
    return load_settings(path)


def _masked(value: Any, key: str = "") -> Any:
    """The dumped settings with every secret masked: SecretStr fields are already "**********";
    here the passwords inside strings (URLs, key=value) and the values of secret-named keys (format
    options such as api_token) are."""
    if isinstance(value, dict):
        return {k: _masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, key) for v in value]
    if isinstance(value, str):
        return "***" if is_secret_name(key) and value else mask_url(value)
    return value


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.file)
    presets = settings.preset_sources()
    print(f"{args.file}: OK ({len(settings.sources)} source(s), {len(presets)} preset source(s) of "
          f"{len({name for name, _ in presets})} preset(s))")
    if args.show:
        print(json.dumps(_masked(settings.model_dump(mode="json")), indent=2, ensure_ascii=False))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from ingest.store.migrate import migrate

    settings = _settings(args.config)
    url = settings.database.url
    if settings.database.password is not None:
        from ingest.store.pool import with_password

        url = with_password(url, settings.database.password.get_secret_value())
    applied = migrate(url, connect_timeout=settings.database.connect_timeout)
    if applied:
        print(f"applied {len(applied)} migration(s) to {mask_url(settings.database.url)}")
    else:
        print(f"schema of {mask_url(settings.database.url)} is up to date")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    if args.worker_index is not None:
        from ingest.supervisor import run_worker

        return run_worker(settings, args.config, args.worker_index, args.supervisor_pid, args.workers)
    workers = args.workers if args.workers is not None else settings.ingest.workers
    if workers > 1:
        from ingest.supervisor import supervise

        asked = f"--workers {workers}" if args.workers is not None else f"ingest.workers = {workers}"
        return supervise(settings, args.config, workers, asked=asked)
    # One worker: the service in this process, as it has always run (same client id, same address).
    from ingest.service import run_service

    setup_logging(settings.log.level, settings.log.format)
    return asyncio.run(run_service(settings, args.config))


def cmd_decode(args: argparse.Namespace) -> int:
    from ingest.process import Processor

    settings = _settings(args.config)
    payload = args.payload.read_bytes() if args.payload else sys.stdin.buffer.read()
    if (args.template or args.device) and not args.format:
        _error("--template and --device go with --format")
        return 2
    processor = Processor.from_settings(settings, override_format=args.format, source=args.source,
                                        template=args.template, device=args.device, fallback=True)
    if args.source is not None and not processor.sources:
        known = ", ".join(s.name for s in settings.all_sources()) or "none"
        _error(f"no source named {args.source!r}; sources and preset parts: {known}")
        return 2
    received = args.received_at or datetime.now(UTC)
    result = processor.process(RawMessage(args.topic, payload, received))
    out = result.as_json()
    if result.source in processor.sources:
        out = {"topic": out.pop("topic"), "source": out.pop("source"),
               "format": processor.sources[result.source].settings.format, **out}
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0 if not result.rejections else 1


def cmd_presets(args: argparse.Namespace) -> int:
    from ingest.presets import PRESETS
    from ingest.routing import compile_template

    settings = _settings(args.config)
    active = set(settings.presets.active())
    configured = {s.name for s in settings.sources}
    listing: list[dict[str, Any]] = []
    for name, preset in PRESETS.items():
        parts: list[dict[str, Any]] = []
        for part in preset.parts(settings.presets.timezone):
            source = SourceSettings(**part)
            keys = {k: v for k, v in source.model_dump(exclude_defaults=True).items()
                    if k not in ("name", "topic", "format", "exclude", "options")}
            parts.append({"source": source.name, "topic": source.topic,
                          "filter": compile_template(source.topic).filter, "format": source.format,
                          "options": source.options, "exclude": source.exclude, "mapping": keys,
                          "replaced": source.name in configured})
        state = ("replaced by [[sources]] " + name if name in configured else "on") if name in active else "off"
        listing.append({"name": name, "title": preset.title, "doc": preset.doc, "state": state, "parts": parts})
    if args.json:
        print(json.dumps(listing, indent=2, ensure_ascii=False))
        return 0
    for p in listing:
        print(f"{p['name']}  ({p['title']}; {p['state']})  {p['doc']}")
        for part in p["parts"]:
            note = "  [replaced by a configured source]" if part["replaced"] else ""
            print(f"  {part['source']}: {part['topic']}  ->  subscribes {part['filter']}  "
                  f"format {part['format']}{note}")
            if part["options"]:
                print(f"    options: {json.dumps(part['options'], ensure_ascii=False)}")
            if part["exclude"]:
                print(f"    exclude: {', '.join(part['exclude'])}")
            for key, value in part["mapping"].items():
                print(f"    {key}: {json.dumps(value, ensure_ascii=False)}")
    if not settings.presets.timezone:
        print("\n[presets] timezone is unset: Tasmota's Time (a local time) is not read; readings take the "
              "receive time. Set it, e.g. SENSOR_INGEST_PRESETS__TIMEZONE=Asia/Ho_Chi_Minh.")
    return 0


def _span(r: tuple[float | None, float | None] | None) -> str:
    if r is None:
        return "any"
    lo, hi = r
    return f"{'-inf' if lo is None else f'{lo:g}'}..{'inf' if hi is None else f'{hi:g}'}"


def cmd_catalog(args: argparse.Namespace) -> int:
    from ingest.catalog.units import conversion

    settings = _settings(args.config)
    catalog = settings.build_catalog()
    if catalog is None:
        print("[catalog] enabled = false: readings are stored as decoded, without binding, units or ranges")
        return 0
    if args.unit and not args.metric:
        print("sensor-ingest catalog: --unit needs --metric", file=sys.stderr)
        return 2
    if args.metric:
        q = catalog.quantity_of(args.metric)
        out: dict[str, Any] = {"metric": args.metric, "quantity": None if q is None else q.name}
        if q is not None:
            out.update(unit=q.unit, possible=q.possible, plausible=q.plausible)
            if args.unit:
                conv = conversion(args.unit, q, catalog.gas)
                out["conversion"] = ({"error": conv} if isinstance(conv, str)
                                     else {"from": args.unit, "scale": conv.scale, "offset": conv.offset})
        if args.json:
            print(json.dumps(out, indent=2, ensure_ascii=False))
        elif q is None:
            print(f"{args.metric}: unbound (stored as it comes, no unit or range check); bind it with a [[metrics]] "
                  "alias")
        else:
            print(f"{args.metric}: {q.name} ({q.title}), stored in {q.unit}, possible {_span(q.possible)}, "
                  f"plausible {_span(q.plausible)}")
            shown: dict[str, Any] | None = out.get("conversion")
            if shown is not None:
                print(f"  {shown['error']}" if "error" in shown else
                      f"  {args.unit} -> {q.unit}: value * {shown['scale']:.12g} + {shown['offset']:.12g}")
        return 0 if q is not None and "error" not in out.get("conversion", {}) else 1
    rows: list[dict[str, Any]] = [
        {"name": q.name, "title": q.title, "unit": q.unit, "kind": q.kind, "possible": q.possible,
         "plausible": q.plausible, "aliases": list(q.aliases), "molar_mass": q.molar_mass, "source": q.source}
        for q in catalog.quantities.values()]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    for r in rows:
        gas = f", {r['molar_mass']:g} g/mol" if r["molar_mass"] else ""
        print(f"{r['name']}  ({r['title']}) {r['kind']} in {r['unit']}{gas}: possible {_span(r['possible'])}, "
              f"plausible {_span(r['plausible'])}")
        print(f"    aliases: {', '.join(r['aliases'])}")
        print(f"    ranges: {r['source']}")
    g = catalog.gas
    print(f"\nppm/ppb to mass concentration at {g.temperature:g} degC and {g.pressure:g} hPa "
          f"(molar volume {g.molar_volume * 1000:.3f} L/mol; [catalog] reference_temperature, reference_pressure)")
    return 0


COMMANDS = {
    "run": cmd_run,
    "migrate": cmd_migrate,
    "check-config": cmd_check_config,
    "decode": cmd_decode,
    "simulate": cmd_simulate,
    "presets": cmd_presets,
    "catalog": cmd_catalog,
    "rules": cmd_rules,
    "alerts": cmd_alerts,
    "silences": cmd_silences,
    "devices": cmd_devices,
    "rejected": cmd_rejected,
    "replay": cmd_replay,
    "quality": cmd_quality,
}


def _error(text: str, prog: str = "sensor-ingest") -> None:
    # Masked once more: a driver's message (in MigrationError) may quote the connection string.
    print(f"{prog}: {mask_secrets(text)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    worker: int | None = getattr(args, "worker_index", None)
    prog = "sensor-ingest" if worker is None else f"sensor-ingest [w{worker}]"
    if worker is not None:
        # A worker the supervisor started: until the service puts its SIGHUP handler in place, a
        # forwarded SIGHUP (a rule reload) must not end it; the file it is about to read is the new one.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # `run` sets up logging again with the configured level and format; until then, and for the
    # other commands, an unexpected error is logged (masked) here rather than printed raw by Python.
    setup_logging("info", "text", worker=worker)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        _error(f"invalid configuration: {exc}", prog)
        return 2
    except DatabaseUnavailable as exc:
        _error(str(exc), prog)
        return 2
    except MigrationError as exc:
        _error(f"migrate failed: {exc}", prog)
        return 1
    except DecodeError as exc:
        _error(str(exc), prog)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sensor-ingest presets | head`
        sys.stderr.close()
        return 0
    except Exception:
        # Python's own traceback print would bypass the masking filter; a logged one does not.
        log.critical("sensor-ingest %s failed", args.command, exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
