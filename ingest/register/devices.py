"""The device register from the command line: `devices import` (CSV, all or nothing), `list`, `show`.

The CSV is read and checked by pure functions (ingest.register.csvfile) before any
database is touched, so that every problem of a file is reported at once, by line, and a file with
one bad row writes nothing. The import itself is one transaction: the rows it changes are locked in
id order (the order in which the service's writer locks devices), then one upsert writes them.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from ingest.clikit import cell, client_settings, connect, fail, json_value, like, positive, table
from ingest.register.csvfile import FIELDS, Plan, Stored, parse_register, plan_import

__all__ = ["ACTIONS", "add_register_actions", "cmd_register"]

ACTIONS = frozenset({"import", "list", "show"})

# -- the commands -------------------------------------------------------------------------------------------

_DB_ENV = ("Environment (overrides the file):\n"
           "  SENSOR_INGEST_DATABASE_URL        database.url\n"
           "  SENSOR_INGEST_DATABASE_PASSWORD   the database password (only from the environment)")

IMPORT_DESCRIPTION = """\
Add devices to the register, or update them, from a CSV file (UTF-8; Excel's "CSV UTF-8" with its
BOM is fine). The first line names the columns (case-insensitive; spaces around names and cells are
ignored); one must be `device` (or `uid`): the device id as stored, including any device_prefix of
its source. The other columns:

  make, model                    text
  source                         the [[sources]] name that writes the device
  expected_interval              how often it reports: seconds (300) or a duration (90s, 5m, 1h)
  lat, lon                       degrees, -90..90 and -180..180 (a decimal point, not a comma)
  installation_height            metres, a number
  district, any other column     an attribute of that name (lat, lon, installation_height: numbers)

An empty cell leaves that field or attribute as it is: a new device gets nothing for it, an existing
one keeps what it has. Attributes are merged into the device's, never removed. A device that is not
in the register yet is added as never seen (last seen empty) until its first reading. Rows whose
cells are all empty are skipped.

All or nothing: the file is checked whole first, and every bad row is reported with its line number
(the row's first line, where a quoted cell spans lines) and the fix; then nothing is imported. A
good file is written in one transaction.

Example:
  device,make,model,source,expected_interval,district,lat,lon
  hn-aq-001,Sensirion,SPS30,hanoi-air,5m,Hoan Kiem,21.0285,105.8542

Exit status: 0 imported (or checked, with --dry-run); 1 a problem in the file (nothing imported);
2 the file or the database cannot be read.
"""

LIST_DESCRIPTION = """\
The devices of the register, by device id: make, model, source, district, expected interval, when
first and last seen (never seen: imported, no reading yet), and their other attributes. Filters
combine with AND.

  sensor-ingest devices list --where district='Hoan Kiem' --never-seen

Exit status: 0; 2 the database cannot be read.
"""

SHOW_DESCRIPTION = """\
One device: its fields and attributes; its series, each metric with its unit and its last reading
(time, value); its calibrations, and whether the stored readings are rewritten to each yet; its
rejected messages of the last 24 hours, by reason.

Exit status: 0; 1 no such device (`devices list --device 'pattern*'` finds it); 2 the database
cannot be read.
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def _delimiter(text: str) -> str:
    named = {"tab": "\t", "\\t": "\t", "semicolon": ";", "comma": ","}.get(text.lower(), text)
    if len(named) != 1 or named in "\"\r\n" or named.isalnum():
        raise argparse.ArgumentTypeError(f"{text!r} is not a delimiter: give one character such as ';' or '|', or "
                                         "'tab'")
    return named


def _where(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=VALUE, e.g. district='Hoan Kiem'")
    return key.strip(), value


def add_register_actions(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def client(p: argparse.ArgumentParser) -> None:
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.epilog = _DB_ENV
        p.add_argument("--config", "-c", metavar="FILE", type=Path,
                       help="the service's TOML config file, for [database] (optional: the environment may be enough)")

    p = actions.add_parser("import", help="add or update devices from a CSV file (all or nothing)",
                           description=IMPORT_DESCRIPTION)
    client(p)
    p.add_argument("file", type=Path, metavar="FILE.csv")
    p.add_argument("--dry-run", action="store_true",
                   help="check the file and print what would change, without writing anything")
    p.add_argument("--delimiter", type=_delimiter, default=",", metavar="C",
                   help="the character between cells: ',' (the default), ';', '|' or 'tab'")

    p = actions.add_parser("list", help="the devices, filtered on id, source, make, attributes",
                           description=LIST_DESCRIPTION)
    client(p)
    p.add_argument("--device", metavar="GLOB", help="device ids matching GLOB; * and ? are wildcards, e.g. 'hn-aq-*'")
    p.add_argument("--where", type=_where, action="append", default=[], metavar="KEY=VALUE",
                   help="an attribute equal to VALUE, compared as text (lat=21.0285, district='Hoan Kiem'); "
                   "repeat for more (all must hold)")
    p.add_argument("--source", metavar="S", help="only devices of source S (exact)")
    p.add_argument("--make", metavar="M", help="only devices of make M (exact)")
    p.add_argument("--never-seen", action="store_true", help="only devices without any reading yet")
    p.add_argument("--limit", type=positive, default=1000, metavar="N", help="at most N devices (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = actions.add_parser("show", help="one device: fields, attributes, series, calibrations, rejections",
                           description=SHOW_DESCRIPTION)
    client(p)
    p.add_argument("device", metavar="DEVICE", help="the device id, exactly as stored")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def cmd_register(args: argparse.Namespace) -> int:
    from ingest.clikit import database_errors

    settings = client_settings(args.config)
    command = {"import": _import, "list": _list, "show": _show}[args.devices_command]
    with database_errors(settings, "has no device register",
                         after="; nothing imported" if args.devices_command == "import" else ""):
        return command(args, settings)


# -- import -------------------------------------------------------------------------------------------------

_SELECT_STORED = """
SELECT uid, make, model, source, expected_interval, attributes FROM devices
WHERE uid = ANY(%s::text[]) ORDER BY id
"""
_UPSERT = """
INSERT INTO devices (uid, make, model, source, expected_interval, attributes)
SELECT u, mk, md, s, e, a::jsonb
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::float8[], %s::text[]) AS t(u, mk, md, s, e, a)
ORDER BY u
ON CONFLICT (uid) DO UPDATE SET
    make = COALESCE(EXCLUDED.make, devices.make),
    model = COALESCE(EXCLUDED.model, devices.model),
    source = COALESCE(EXCLUDED.source, devices.source),
    expected_interval = COALESCE(EXCLUDED.expected_interval, devices.expected_interval),
    attributes = devices.attributes || EXCLUDED.attributes
RETURNING xmax = 0
"""


def _read(path: Path) -> str | int:
    """The file's text, or the exit status after saying why there is none."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        fail(f"{path}: cannot read the file: {exc.strerror or exc}")
        return 2
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        fail(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); nothing imported. Save the file as "
             "UTF-8 (in Excel: CSV UTF-8)")
        return 1


def _import(args: argparse.Namespace, settings: Any) -> int:
    text = _read(args.file)
    if isinstance(text, int):
        return text
    entries, problems = parse_register(text, args.delimiter)
    if problems:
        shown = problems[:100]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        fail(f"{args.file}: {len(problems)} problem(s); nothing imported:" + "".join(f"\n  {p}" for p in shown) + more)
        return 1
    uids = [e.uid for e in entries]
    with connect(settings, read_only=args.dry_run) as conn, conn.transaction():
        # FOR NO KEY UPDATE: a concurrent import waits, so that the plan stays true until commit; the key
        # share locks of calibrations' foreign keys (taken under the calibration lock) do not.
        rows = conn.execute(_SELECT_STORED + ("" if args.dry_run else " FOR NO KEY UPDATE"), (uids,)).fetchall()
        plan = plan_import(entries, {r[0]: Stored(*r[1:]) for r in rows})
        if args.dry_run:
            _print_plan(plan)
            print(f"dry run: {len(plan.added)} devices would be added, {len(plan.updated)} updated, "
                  f"{plan.unchanged} unchanged; nothing written")
            return 0
        write = plan.added + [e for e, _ in plan.updated]
        added = 0
        if write:
            columns = [[e.uid for e in write], [e.make for e in write], [e.model for e in write],
                       [e.source for e in write], [e.expected_interval for e in write],
                       [json.dumps(dict(e.attributes), ensure_ascii=False) for e in write]]
            cursor = conn.execute(_UPSERT, columns)
            # A device the service created since the SELECT is updated, not added: count what happened.
            added = sum(1 for (inserted,) in cursor.fetchall() if inserted)
    print(f"{added} devices added, {len(write) - added} updated" +
          (f", {plan.unchanged} unchanged" if plan.unchanged else ""))
    return 0


def _print_plan(plan: Plan) -> None:
    def value(name: str, v: Any) -> str:
        return _duration(v) if name == "expected_interval" and v is not None else _attribute(v)

    for e in plan.added:
        fields = [f"{n}={value(n, getattr(e, n))}" for n in FIELDS if getattr(e, n) is not None]
        fields += [f"{k}={_attribute(v)}" for k, v in e.attributes.items()]
        print(f"+ {e.uid} (line {e.line}, new)" + (": " + ", ".join(fields) if fields else ""))
    for e, changes in plan.updated:
        print(f"~ {e.uid} (line {e.line}): " + ", ".join(f"{k} {value(k, old)} -> {value(k, new)}"
                                                         for k, (old, new) in changes.items()))


# -- list ---------------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:.12g}s"


def _attribute(v: Any) -> str:
    """An attribute's value as --where compares it (a JSON number or true as its JSON text)."""
    return "-" if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _device_json(row: dict[str, Any]) -> dict[str, Any]:
    """A device as list --json and show --json print it; first_seen is null until the first reading
    (the column holds the time the device was registered)."""
    return {"device": row["uid"], "make": row["make"], "model": row["model"], "source": row["source"],
            "expected_interval": row["expected_interval"], "attributes": row["attributes"],
            "first_seen": row["first_seen"] if row["last_seen"] is not None else None, "last_seen": row["last_seen"]}


_DEVICE_COLUMNS = "uid, make, model, source, expected_interval, attributes, first_seen, last_seen"


def _list(args: argparse.Namespace, settings: Any) -> int:
    where: list[str] = []
    params: list[Any] = []
    if args.device:
        where.append("uid LIKE %s")
        params.append(like(args.device))
    for key, value in args.where:
        # The key matched without regard to case: imported columns are lowercased, topic captures keep
        # theirs ({District}).
        where.append("EXISTS (SELECT 1 FROM jsonb_each_text(attributes) AS a(k, v) WHERE lower(a.k) = lower(%s) "
                     "AND a.v = %s)")
        params += [key, value]
    for column in ("source", "make"):
        if getattr(args, column) is not None:
            where.append(f"{column} = %s")
            params.append(getattr(args, column))
    if args.never_seen:
        where.append("last_seen IS NULL")
    query = (f"SELECT {_DEVICE_COLUMNS} FROM devices" + (" WHERE " + " AND ".join(where) if where else "")
             + " ORDER BY uid LIMIT %s")
    with connect(settings, read_only=True) as conn:
        cursor = conn.execute(query, [*params, args.limit])
        names = [d.name for d in cursor.description or ()]
        rows = [_device_json(dict(zip(names, r, strict=True))) for r in cursor.fetchall()]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False, default=json_value))
        return 0
    if not rows:
        print("no devices" + (" match" if where else " in the register"))
        return 0
    table(f"devices ({len(rows)})", ["device", "make", "model", "source", "district", "expected interval",
                                     "first seen", "last seen", "other attributes"],
          [[r["device"], cell(r["make"], ""), cell(r["model"], ""), cell(r["source"], ""),
            _attribute(r["attributes"].get("district")),
            _duration(r["expected_interval"]) if r["expected_interval"] else "-",
            cell(r["first_seen"], ""), cell(r["last_seen"], "") if r["last_seen"] else "never",
            ", ".join(f"{k}={_attribute(v)}" for k, v in sorted(r["attributes"].items()) if k != "district")]
           for r in rows])
    if len(rows) == args.limit:
        print(f"(the first {args.limit}; --limit N shows more)")
    return 0


# -- show ---------------------------------------------------------------------------------------------------

# The device's metrics come from the (device_id, metric_id, time) index, one probe per metric (a loose index
# scan: TimescaleDB's SkipScan is not in every build), and the last reading of each from the same index,
# newest chunk first: no count, no scan of the series.
_SERIES = """
WITH RECURSIVE s(metric_id) AS (
    (SELECT metric_id FROM {table} WHERE device_id = %(id)s ORDER BY metric_id LIMIT 1)
    UNION ALL
    SELECT (SELECT r.metric_id FROM {table} r WHERE r.device_id = %(id)s AND r.metric_id > s.metric_id
            ORDER BY r.metric_id LIMIT 1)
    FROM s WHERE s.metric_id IS NOT NULL
)
SELECT m.name AS metric, m.unit, m.kind, last.time AS last_time, last.value AS last_value, last.flags
FROM s JOIN metrics m ON m.id = s.metric_id
CROSS JOIN LATERAL (SELECT time, value, flags FROM {table} r WHERE r.device_id = %(id)s AND r.metric_id = s.metric_id
                    ORDER BY time DESC LIMIT 1) last
"""
_CALIBRATIONS = """
SELECT m.name AS metric, c.effective_from, c.scale, c.offset_value, c.comment, c.rewrite_cursor, c.rewritten
FROM calibrations c JOIN metrics m ON m.id = c.metric_id
WHERE c.device_id = %(id)s ORDER BY m.name, c.effective_from
"""
_REJECTIONS = """
SELECT reason, count(*) AS count, max(received_at) AS last
FROM rejected_messages WHERE device_uid = %(uid)s AND received_at >= now() - interval '24 hours'
GROUP BY reason ORDER BY count(*) DESC, reason
"""


def _fetch(conn: Any, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    cursor = conn.execute(query, params)
    names = [d.name for d in cursor.description or ()]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


def _show(args: argparse.Namespace, settings: Any) -> int:
    with connect(settings, read_only=True) as conn:
        found = _fetch(conn, f"SELECT id, {_DEVICE_COLUMNS} FROM devices WHERE uid = %(uid)s", {"uid": args.device})
        if not found:
            near = [r["uid"] for r in _fetch(conn, "SELECT uid FROM devices WHERE uid ILIKE %(p)s ORDER BY uid LIMIT 5",
                                             {"p": f"%{like(args.device)}%"})]
            fail(f"no device {args.device!r} in the register" +
                 (f" (did you mean {', '.join(map(repr, near))}?)" if near else "") +
                 f"; find it with `sensor-ingest devices list --device '{args.device[:6]}*'`")
            return 1
        params = {"id": found[0]["id"], "uid": args.device}
        series = sorted(_fetch(conn, _SERIES.format(table="readings"), params)
                        + _fetch(conn, _SERIES.format(table="states"), params), key=lambda s: str(s["metric"]))
        calibrations = _fetch(conn, _CALIBRATIONS, params)
        rejections = _fetch(conn, _REJECTIONS, params)
    device = _device_json(found[0])
    if args.json:
        print(json.dumps({**device, "series": series, "calibrations": calibrations, "rejections_24h": rejections},
                         indent=2, ensure_ascii=False, default=json_value))
        return 0
    _print_device(device)
    if series:
        table("series", ["metric", "unit", "kind", "last reading", "value", "flags"],
              [[s["metric"], cell(s["unit"], ""), s["kind"], cell(s["last_time"], ""),
                s["last_value"] if isinstance(s["last_value"], str) else f"{s['last_value']!r}", _flags(s["flags"])]
               for s in series])
    else:
        print("series: none (no reading stored)")
    if calibrations:
        # rewrite_cursor NULL: every stored reading of the calibration's span carries it.
        table("calibrations", ["metric", "effective from", "scale", "offset", "status", "readings rewritten",
                               "comment"],
              [[c["metric"], cell(c["effective_from"], ""), repr(c["scale"]), repr(c["offset_value"]),
                "applied" if c["rewrite_cursor"] is None else
                f"readings from {cell(c['rewrite_cursor'], '')} on not yet rewritten: run `sensor-ingest devices "
                f"recalibrate {args.device} {c['metric']}`", str(c["rewritten"]), cell(c["comment"], "")]
               for c in calibrations])
    else:
        print("calibrations: none")
    if rejections:
        table("rejections in the last 24 h", ["reason", "messages", "last"],
              [[r["reason"], str(r["count"]), cell(r["last"], "")] for r in rejections])
    else:
        print("rejections in the last 24 h: none")
    return 0


def _flags(flags: int) -> str:
    from ingest.model import FLAG_RECEIVE_TIME, FLAG_SUSPECT

    words = [w for bit, w in ((FLAG_SUSPECT, "suspect"), (FLAG_RECEIVE_TIME, "receive time")) if flags & bit]
    return ", ".join(words) or "-"


def _print_device(device: dict[str, Any]) -> None:
    interval = device["expected_interval"]
    lines = [("device", device["device"]), ("make", cell(device["make"], "")), ("model", cell(device["model"], "")),
             ("source", cell(device["source"], "")),
             ("expected interval", _duration(interval) if interval else "- (the source's, else learned)"),
             ("first seen", cell(device["first_seen"], "")),
             ("last seen", cell(device["last_seen"], "") if device["last_seen"] else "never (no reading yet)")]
    lines += [(f"  {k}", _attribute(v)) for k, v in sorted(device["attributes"].items())]
    if not device["attributes"]:
        lines.append(("attributes", "none"))
    else:
        lines.insert(len(lines) - len(device["attributes"]), ("attributes", ""))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}".rstrip())
