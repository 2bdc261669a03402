"""Quarantine: `sensor-ingest rejected` reads rejected_messages back, `sensor-ingest replay` re-runs them.

Every message that was not stored as readings is a rejected_messages row with its exact bytes. Once
the cause is fixed (a [[sources]] entry added, a mapping or a unit corrected, a device registered),
`replay` sends the rows through the current configuration, as live ingest would have with it: the
same Processor (route, decode, validate, catalog) at the row's own received_at (so the same time rules:
receive time substituted, time_policy, max_future), the same Writer (ids, calibrations, deduplication).
Replayed history raises no alerts (the writer gets no alert stage): it is old news, and a threshold
crossed last week must not page anyone now.

Replay itself (claimed batches, each row once, resumable) is ingest.replay; here are the filters both
commands share, the listing and the parsers.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.clikit import cell, client_settings, fail, json_value, like, positive, since, table
from ingest.logs import mask_secrets
from ingest.reasons import REASONS

if TYPE_CHECKING:

    pass

__all__ = ["Filters", "add_quarantine_parsers", "as_text", "cmd_rejected", "cmd_replay", "hexdump", "replay_status"]

_ENV = ("Environment (overrides the file):\n"
        "  SENSOR_INGEST_DATABASE_URL        database.url\n"
        "  SENSOR_INGEST_DATABASE_PASSWORD   the database password (only from the environment)")
_DETAIL_SHOWN = 80  # characters of a detail in the listing

REJECTED_DESCRIPTION = """\
The rejected messages (rejected_messages): every message, or part of one, that was not stored as
readings, with its exact bytes, its reason and what replay made of it. Read-only.

  sensor-ingest rejected [filters]          counts by reason and by replay outcome, then the rows,
                                            newest first
  sensor-ingest rejected show ID [--hex]    one row in full: its details and its payload, as text
                                            or as a hex dump

Replay outcome: "not replayed"; "stored at T" (its readings are stored now); "skipped at T" (the
current configuration skips the message, e.g. its topic is now excluded: nothing to store); "still
rejected: R" (replayed at T and still, or partly, refused, reason R). Exit 0; `show` exits 1 for an
unknown id; 2 when the database cannot be read.
"""

REPLAY_DESCRIPTION = """\
Re-run the rejected messages that match the filters and were never replayed through the current
configuration (-c FILE: the fixed one): route, decode, validate, catalog and store, exactly as live
ingest would with that configuration, at each row's own receive time (so the same time rules). Each
row then records its outcome (replayed_at; replay_reason and replay_detail when still refused, NULL
when stored): `sensor-ingest rejected` shows it. Replayed readings raise no alerts.

Batches of --batch rows, each one transaction (claim, write, mark, commit): a row is never replayed
twice, a concurrent replay takes other rows, and an interruption (Ctrl-C, kill, a database failure)
loses only the batch in progress: run the same command again to resume. Ctrl-C stops after the batch
in progress commits (a second Ctrl-C stops at once, rolling that batch back).

Rows of reason too_large are not replayable (only the first ingest.max_message_bytes of the message
were kept): they are counted and left as they are. Readings already stored (a message partly stored
the first time, a redelivered copy) are counted as duplicates, never stored twice.

Exit 0 when done (rows still rejected are in the summary), 130 when interrupted, 2 for an invalid
configuration or a database that cannot be reached.
"""


# -- filters ----------------------------------------------------------------------------------------------


def _reason(text: str) -> str:
    if text not in REASONS:
        raise argparse.ArgumentTypeError(f"unknown reason {text!r}; reasons: {', '.join(REASONS)}")
    return text


@dataclass(frozen=True, slots=True)
class Filters:
    """Which rows of rejected_messages a command reads (every given filter must hold)."""

    reasons: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    since: datetime | None = None
    device: str | None = None  # a glob on device_uid
    replayed: bool | None = None  # True: only replayed rows; False: only rows not replayed

    @classmethod
    def of(cls, args: argparse.Namespace) -> Filters:
        replayed = True if getattr(args, "replayed", False) else False if getattr(args, "not_replayed", False) else None
        return cls(tuple(args.reason or ()), tuple(args.source or ()), args.since, args.device, replayed)

    def conditions(self, numbered: bool, first: int = 1) -> tuple[list[str], list[Any]]:
        """SQL conditions and their parameters: ``$n`` placeholders from ``first`` (asyncpg) when
        ``numbered``, else ``%s`` (psycopg). No value is ever part of the SQL text."""
        sql: list[str] = []
        params: list[Any] = []

        def mark(value: Any) -> str:
            params.append(value)
            return f"${first + len(params) - 1}" if numbered else "%s"

        if self.reasons:
            sql.append(f"reason = ANY({mark(list(self.reasons))}::text[])")
        if self.sources:
            sql.append(f"source = ANY({mark(list(self.sources))}::text[])")
        if self.since is not None:
            sql.append(f"received_at >= {mark(self.since)}")
        if self.device is not None:
            sql.append(f"device_uid LIKE {mark(like(self.device))}")
        if self.replayed is not None:
            sql.append("replayed_at IS NOT NULL" if self.replayed else "replayed_at IS NULL")
        return sql, params

    def shown(self) -> str:
        parts = [f"reason {', '.join(self.reasons)}"] if self.reasons else []
        parts += [f"source {', '.join(self.sources)}"] if self.sources else []
        parts += [f"since {cell(self.since, 'since')}"] if self.since else []
        parts += [f"device {self.device}"] if self.device else []
        parts += [] if self.replayed is None else ["replayed" if self.replayed else "not replayed"]
        return f" ({'; '.join(parts)})" if parts else ""


def _where(conditions: list[str]) -> str:
    return f" WHERE {' AND '.join(conditions)}" if conditions else ""


# -- payloads ---------------------------------------------------------------------------------------------

# Control characters (C0, DEL, C1) other than newline, carriage return and tab: such a payload is not
# shown as text, where they would be invisible or move the terminal's cursor.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def as_text(payload: bytes) -> str | None:
    """The payload as text when it is valid UTF-8 without control characters other than \\n \\r \\t."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if _CONTROL.search(text) else text


def hexdump(data: bytes) -> str:
    """`hexdump -C` style: offset, 16 bytes in two groups of 8, the printable ASCII; then the length."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset:offset + 16]
        left = " ".join(f"{b:02x}" for b in chunk[:8])
        right = " ".join(f"{b:02x}" for b in chunk[8:])
        printable = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{offset:08x}  {left:<23}  {right:<23}  |{printable}|")
    lines.append(f"{len(data):08x}")
    return "\n".join(lines)


# -- replay outcome of a row ------------------------------------------------------------------------------


def replay_status(replayed_at: datetime | None, reason: str | None, detail: str | None) -> str:
    """One of "not_replayed", "stored", "skipped", "still_rejected" (see REJECTED_DESCRIPTION)."""
    if replayed_at is None:
        return "not_replayed"
    if reason is not None:
        return "still_rejected"
    return "skipped" if detail is not None else "stored"


def _replay_text(row: dict[str, Any], full: bool = False) -> str:
    status = replay_status(row["replayed_at"], row["replay_reason"], row["replay_detail"])
    when = cell(row["replayed_at"], "replayed_at")
    if status == "not_replayed":
        return "not replayed"
    if status == "stored":
        return f"stored at {when}"
    detail = mask_secrets(row["replay_detail"] or "")
    if status == "skipped":
        return f"skipped at {when}: {detail}" if full else f"skipped at {when}"
    text = f"still rejected: {row['replay_reason']}"
    return f"{text} (replayed at {when}): {detail}" if full else text


# -- `sensor-ingest rejected` -----------------------------------------------------------------------------


def _config_arg(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    default = argparse.SUPPRESS if suppress else None  # a subcommand's own default must not hide the parent's
    p.add_argument("--config", "-c", metavar="FILE", type=Path, default=default,
                   help="the service's TOML config file (optional: the environment may be enough)")


def _filter_args(p: argparse.ArgumentParser, replayed: bool) -> None:
    p.add_argument("--reason", metavar="R", type=_reason, action="append",
                   help="only rows of this reason (repeat for several), e.g. no_source")
    p.add_argument("--source", metavar="S", action="append", help="only rows of this source (repeat for several)")
    p.add_argument("--since", metavar="T", type=since,
                   help="only rows received at or after T: RFC 3339 with an offset (2026-11-25T03:00:00Z) or a "
                   "duration back from now (30m, 2h, 7d)")
    p.add_argument("--device", metavar="GLOB",
                   help="only rows of these devices (device_uid; * and ? are wildcards, e.g. 'hn-aq-*'); a row "
                   "no source matched names no device")
    if replayed:
        which = p.add_mutually_exclusive_group()
        which.add_argument("--replayed", action="store_true", help="only rows already replayed")
        which.add_argument("--not-replayed", action="store_true", help="only rows not yet replayed")


def add_quarantine_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("rejected", help="list the rejected messages with counts by reason; show one in full",
                       usage="sensor-ingest rejected [-c FILE] [filters] [--limit N] [--json]\n"
                       "       sensor-ingest rejected show ID [-c FILE] [--hex] [--json]",
                       description=REJECTED_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_ENV)
    _config_arg(p)
    _filter_args(p, replayed=True)
    p.add_argument("--limit", type=positive, default=50, metavar="N", help="at most N rows (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    actions = p.add_subparsers(dest="rejected_command", metavar="ACTION")
    show = actions.add_parser(
        "show", help="one rejected message in full: details, replay outcome and payload",
        description="Everything about one row of rejected_messages: when it was received, source, topic, "
        "device, reason and detail, each refused reading, the replay outcome, and the payload: as text when "
        "it is UTF-8 without control characters (other than newline, carriage return, tab), else as a hex dump. "
        "Exit 0; 1 when there is no row ID; 2 when the database cannot be read.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_ENV)
    show.add_argument("id", type=int, metavar="ID", help="the row's id (the first column of `sensor-ingest rejected`)")
    show.add_argument("--hex", action="store_true", help="a hex dump of the payload even when it is text")
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="print JSON (the payload as payload_hex, and as payload_text when it is text)")
    _config_arg(show, suppress=True)

    p = sub.add_parser("replay", help="re-run rejected messages through the current configuration (resumable)",
                       description=REPLAY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_ENV)
    _config_arg(p)
    _filter_args(p, replayed=False)
    p.add_argument("--batch", type=positive, default=500, metavar="N",
                   help="rows per transaction (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="decode and validate only, and print what a replay would do; writes nothing")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (and no progress bar)")


_ROW_COLUMNS = ("id, received_at, source, topic, reason, detail, device_uid, length(payload) AS size, replayed_at, "
                "replay_reason, replay_detail")
_STATUS_SQL = ("CASE WHEN replayed_at IS NULL THEN 'not_replayed' WHEN replay_reason IS NOT NULL THEN 'still_rejected'"
               " WHEN replay_detail IS NOT NULL THEN 'skipped' ELSE 'stored' END")
_STATUSES = ("not_replayed", "stored", "skipped", "still_rejected")


def cmd_rejected(args: argparse.Namespace) -> int:
    from ingest.clikit import connect, database_errors

    settings = client_settings(args.config)
    with database_errors(settings, "has no replay columns", doing="read"), \
            connect(settings, read_only=True) as conn:
        if args.rejected_command == "show":
            return _show(conn, args)
        return _list(conn, args)


def _rows(cursor: Any) -> list[dict[str, Any]]:
    names = [d.name for d in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _list(conn: Any, args: argparse.Namespace) -> int:
    filters = Filters.of(args)
    conditions, params = filters.conditions(numbered=False)
    where = _where(conditions)
    counts = _rows(conn.execute(
        f"SELECT reason, {_STATUS_SQL} AS status, replay_reason, count(*) AS n FROM rejected_messages{where}"
        " GROUP BY 1, 2, 3", params))
    rows = _rows(conn.execute(
        f"SELECT {_ROW_COLUMNS} FROM rejected_messages{where} ORDER BY received_at DESC, id DESC LIMIT %s",
        [*params, args.limit]))
    by_reason: dict[str, Counter[str]] = {}
    still: Counter[str] = Counter()
    for c in counts:
        by_reason.setdefault(c["reason"], Counter())[c["status"]] += c["n"]
        if c["replay_reason"] is not None:
            still[c["replay_reason"]] += c["n"]
    ordered = sorted(by_reason.items(), key=lambda kv: (-kv[1].total(), kv[0]))
    total = sum(c.total() for c in by_reason.values())
    if args.json:
        out = {
            "total": total,
            "by_reason": [{"reason": r, "rows": c.total(), **{s: c[s] for s in _STATUSES}} for r, c in ordered],
            "still_rejected_by_new_reason": dict(still.most_common()),
            "rows": [_row_json(r) for r in rows],
        }
        print(json.dumps(out, indent=2, ensure_ascii=False, default=json_value))
        return 0
    if not total:
        print(f"no rejected messages{filters.shown()}")
        return 0
    table(f"{total} rejected message(s){filters.shown()}, by reason",
           ["reason", "rows", "not replayed", "stored", "skipped", "still rejected"],
           [[r, str(c.total()), *(str(c[s]) for s in _STATUSES)] for r, c in ordered])
    if still:
        print("still rejected after replay, by new reason: " + ", ".join(f"{r} {n}" for r, n in still.most_common()))
    table("newest first", ["id", "received", "source", "topic", "reason", "detail", "device", "replay"],
           [[str(r["id"]), cell(r["received_at"], ""), cell(r["source"], ""), r["topic"], r["reason"],
             _short(mask_secrets(r["detail"])), cell(r["device_uid"], ""), _replay_text(r)] for r in rows])
    if len(rows) < total:
        print(f"(the newest {len(rows)} of {total}; --limit N shows more, `rejected show ID` one in full)")
    return 0


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_SHOWN else text[:_DETAIL_SHOWN - 1] + "…"


def _row_json(r: dict[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "received_at": r["received_at"], "source": r["source"], "topic": r["topic"],
            "reason": r["reason"], "detail": mask_secrets(r["detail"]), "device": r["device_uid"], "size": r["size"],
            "replay": {"status": replay_status(r["replayed_at"], r["replay_reason"], r["replay_detail"]),
                       "at": r["replayed_at"], "reason": r["replay_reason"],
                       "detail": None if r["replay_detail"] is None else mask_secrets(r["replay_detail"])}}


def _show(conn: Any, args: argparse.Namespace) -> int:
    found = _rows(conn.execute(f"SELECT {_ROW_COLUMNS}, details, payload FROM rejected_messages WHERE id = %s",
                               [args.id]))
    if not found:
        fail(f"no rejected message with id {args.id} (`sensor-ingest rejected` lists them; retention drops "
             "rows older than [retention] rejected_messages)")
        return 1
    r = found[0]
    payload = bytes(r["payload"])
    text = as_text(payload)
    truncated = r["reason"] == "too_large"
    details = [{"reason": d.get("reason"), "detail": mask_secrets(str(d.get("detail", ""))), "device": d.get("device")}
               for d in (r["details"] or [])]
    if getattr(args, "json", False):
        out = {**_row_json(r), "details": details, "truncated": truncated, "payload_hex": payload.hex(),
               "payload_text": text}
        print(json.dumps(out, indent=2, ensure_ascii=False, default=json_value))
        return 0
    known = REASONS.get(r["reason"])
    lines = [f"rejected message {r['id']}",
             f"  received  {cell(r['received_at'], '')}",
             f"  source    {cell(r['source'], '')}",
             f"  topic     {r['topic']}",
             f"  device    {cell(r['device_uid'], '')}",
             f"  reason    {r['reason']}: {mask_secrets(r['detail'])}"]
    if known is not None:
        lines.append(f"  fix       {known.fix}")
    if details:
        lines.append(f"  refused   {len(details)} reading(s) or part(s):")
        lines += [f"    - {d['reason']}" + (f" ({d['device']})" if d["device"] else "") + f": {d['detail']}"
                  for d in details]
    lines.append(f"  replay    {_replay_text(r, full=True)}")
    size = f"{len(payload)} byte(s)"
    if truncated:
        size += (f"; only the first {len(payload)} bytes of the message were kept (it was larger than "
                 "ingest.max_message_bytes), so the row is not replayable")
    if text is not None and not args.hex:
        lines += [f"payload: {size}, UTF-8 text:", text]
    else:
        kind = "UTF-8 text" if text is not None else "binary or not UTF-8 text"
        lines += [f"payload: {size}, {kind}, as a hex dump:", hexdump(payload)]
    print("\n".join(lines))  # plain print: a payload is not rich markup
    return 0


# -- replay -----------------------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from ingest.replay import run

    return run(args)
