"""Quarantine: `sensor-ingest rejected` reads rejected_messages back, `sensor-ingest replay` re-runs them.

Every message that was not stored as readings is a rejected_messages row with its exact bytes. Once
the cause is fixed (a [[sources]] entry added, a mapping or a unit corrected, a device registered),
`replay` sends the rows through the current configuration, as live ingest would have with it: the
same Processor (route, decode, validate, catalog) at the row's own received_at (so the same time rules:
receive time substituted, time_policy, max_future), the same Writer (ids, calibrations, deduplication).
Replayed history raises no alerts (the writer gets no alert stage): it is old news, and a threshold
crossed last week must not page anyone now.

Replay works in batches, each one transaction: claim the oldest rows not yet replayed
(FOR UPDATE SKIP LOCKED: a concurrent replay takes other rows), process them, write their readings
in the same transaction (``Writer.write_in``, no new rejection rows), set each row's replayed_at and
its replay_reason / replay_detail (NULL when all of it is stored now), commit. A row is thus replayed
at most once, and an interrupted replay loses only its uncommitted batch, which the next run takes
again. too_large rows hold only the first ingest.max_message_bytes of their message: they are not
replayable, are counted as such and stay as they are (replayed_at NULL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.clikit import DatabaseUnavailable, cell, client_settings, fail, json_value, like, positive, since, table
from ingest.logs import mask_secrets
from ingest.reasons import REASONS

if TYPE_CHECKING:
    import asyncpg

    from ingest.process import Outcome, Processor
    from ingest.settings import Settings
    from ingest.store.writer import Conn, Writer

__all__ = ["Filters", "ReplayTally", "Replayer", "add_quarantine_parsers", "as_text", "cmd_rejected", "cmd_replay",
           "hexdump", "replay_status"]

_ENV = ("Environment (overrides the file):\n"
        "  SENSOR_INGEST_DATABASE_URL        database.url\n"
        "  SENSOR_INGEST_DATABASE_PASSWORD   the database password (only from the environment)")
_UNBOUNDED = 1 << 62  # new ids per minute for a replay: an operator's replay is not a flood
_DETAIL_SHOWN = 80  # characters of a detail in the listing
_RETRIES = 5  # a batch that deadlocks with a concurrent writer (40P01, 40001) is taken again this often

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

_MAX_ID = "SELECT coalesce(max(id), 0) FROM rejected_messages"
_COUNT = ("SELECT count(*) FILTER (WHERE reason <> 'too_large'), count(*) FILTER (WHERE reason = 'too_large')"
          " FROM rejected_messages WHERE replayed_at IS NULL AND id <= $1")
# The oldest rows first, so that a series' readings go in in time order; SKIP LOCKED: rows a concurrent
# replay holds are left to it.
_CLAIM = ("SELECT received_at, id, topic, payload FROM rejected_messages"
          " WHERE replayed_at IS NULL AND reason <> 'too_large' AND id <= $1{filters}"
          " ORDER BY received_at, id LIMIT $2 FOR UPDATE SKIP LOCKED")
# --dry-run reads without locking, page after page (keyset on the same order).
_PAGE = ("SELECT received_at, id, topic, payload FROM rejected_messages"
         " WHERE replayed_at IS NULL AND reason <> 'too_large' AND id <= $1"
         " AND ($3::timestamptz IS NULL OR (received_at, id) > ($3, $4)){filters}"
         " ORDER BY received_at, id LIMIT $2")
_MARK = """
UPDATE rejected_messages AS r SET replayed_at = now(), replay_reason = u.reason, replay_detail = u.detail
FROM unnest($1::timestamptz[], $2::bigint[], $3::text[], $4::text[]) AS u(received_at, id, reason, detail)
WHERE r.received_at = u.received_at AND r.id = u.id
"""


@dataclass(slots=True)
class ReplayTally:
    """What a replay did (or, dry, would do); only committed batches count."""

    dry_run: bool = False
    matching: int = 0  # replayable rows matching the filters, not yet replayed, at the start
    not_replayable: int = 0  # too_large rows among the matching ones: left as they are
    replayed: int = 0  # rows marked replayed
    batches: int = 0
    stored: int = 0  # new readings (and text states); dry run: valid readings, duplicates not known
    duplicates: int = 0  # readings already stored
    rows_stored: int = 0  # rows whose every reading is stored now
    skipped: Counter[str] = field(default_factory=Counter)  # rows with nothing to store, by why
    still: Counter[str] = field(default_factory=Counter)  # rows still (partly) refused, by the new reason
    partly: int = 0  # of those, rows that stored some readings
    interrupted: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "matching": self.matching, "not_replayable": self.not_replayable,
                "rows_replayed": self.replayed, "batches": self.batches,
                ("readings_valid" if self.dry_run else "readings_stored"): self.stored,
                **({} if self.dry_run else {"duplicates": self.duplicates}),
                "rows_stored": self.rows_stored, "rows_skipped": dict(self.skipped.most_common()),
                "rows_still_rejected": dict(self.still.most_common()), "rows_partly_stored": self.partly,
                "interrupted": self.interrupted}


def _skip_detail(o: Outcome) -> str:
    return (f"nothing to store: the current configuration skips this message ({o.skipped}"
            f"{f', source {o.source}' if o.source else ''})")


def _narrowed(o: Outcome, exc: BaseException) -> Outcome:
    """``o`` refused whole, as the pipeline does for a message whose data the database refuses."""
    from dataclasses import replace

    from ingest.model import Rejection
    from ingest.store.classify import classify, describe

    text = describe(exc)[:500]
    if classify(exc) == "data":
        state = getattr(exc, "sqlstate", None) or "none: refused by the driver"
        problem = Rejection("db_rejected", f"the database refused this message's data (SQLSTATE {state}): {text}")
    else:
        problem = Rejection("write_error", f"writing this message failed unexpectedly ({text}); report it")
    return replace(o, readings=[], rejection=problem, problems=[problem])


class Replayer:
    """The replay loop over one pool, one Processor and the selection ``filters``.

    ``run`` and ``dry_run`` take ``stop`` (asked before each batch: the `replay` command's Ctrl-C, a
    test's interruption) and ``on_batch`` (called after each commit with the tally so far)."""

    def __init__(self, pool: asyncpg.Pool, processor: Processor, settings: Settings, filters: Filters,
                 *, batch: int = 500) -> None:
        self.pool = pool
        self.processor = processor
        self.filters = filters
        self.batch = batch
        self.known_only = [s.name for s in settings.all_sources() if s.device_policy == "known"]
        self.upto = 0  # rows of higher id arrived after the start: not this run's (live ingest goes on)
        self.tally = ReplayTally()
        self.writer = self._writer()

    def _writer(self) -> Writer:
        from ingest.store.writer import Writer

        return Writer(self.pool, catalog=self.processor.catalog, known_only=self.known_only, alerts=None,
                      new_devices_per_minute=_UNBOUNDED, new_metrics_per_minute=_UNBOUNDED)

    async def count(self) -> ReplayTally:
        """Fix the selection (the rows there now) and count it: the progress bar's total."""
        conditions, params = self.filters.conditions(numbered=True, first=2)
        async with self.pool.acquire() as conn:
            self.upto = int(await conn.fetchval(_MAX_ID))
            counted = await conn.fetchrow(_COUNT + "".join(f" AND {c}" for c in conditions), self.upto, *params)
        assert counted is not None  # an aggregate has a row
        self.tally.matching, self.tally.not_replayable = int(counted[0]), int(counted[1])
        return self.tally

    async def bind_units(self, *, write: bool) -> None:
        """As the service at start-up: a stored series keeps its unit (Catalog.pin); ``write``: the
        metrics rows' bindings are brought up to the catalog too (ingest.store.ids.sync_bindings)."""
        from ingest.store.ids import sync_bindings

        catalog = self.processor.catalog
        if catalog is None:
            return
        async with self.pool.acquire() as conn:
            if write:
                await sync_bindings(conn, catalog)
            else:
                for name, unit in await conn.fetch("SELECT name, unit FROM metrics"):
                    catalog.pin(name, unit)

    async def run(self, *, stop: Callable[[], bool] = lambda: False,
                  on_batch: Callable[[ReplayTally], None] | None = None) -> ReplayTally:
        while not stop():
            if not await self._batch_with_retries():
                return self.tally
            if on_batch is not None:
                on_batch(self.tally)
        self.tally.interrupted = True
        return self.tally

    async def _batch_with_retries(self) -> bool:
        """A batch that deadlocked with a concurrent writer (another replay, live ingest on the same
        keys) was rolled back whole: it is taken again, a few times."""
        import asyncpg

        attempt = 0
        while True:
            try:
                return await self._batch()
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                attempt += 1
                if attempt > _RETRIES:
                    raise

    async def _batch(self) -> bool:
        """One transaction: claim, process, write, mark, commit. False when no row was left."""
        from ingest.model import RawMessage
        from ingest.validate import escape

        conditions, params = self.filters.conditions(numbered=True, first=3)
        sql = _CLAIM.format(filters="".join(f" AND {c}" for c in conditions))
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(sql, self.upto, self.batch, *params)
                if not rows:
                    return False
                outcomes = [self.processor.process(RawMessage(r["topic"], bytes(r["payload"]), r["received_at"]))
                            for r in rows]
                final, stored, duplicates = await self._write(conn, outcomes)
                marks = [(None, None) if o.rejection is None and o.skipped is None else
                         (None, escape(_skip_detail(o))) if o.rejection is None else
                         (o.rejection.reason, escape(o.rejection.detail)) for o in final]
                await conn.execute(_MARK, [r["received_at"] for r in rows], [r["id"] for r in rows],
                                   [m[0] for m in marks], [m[1] for m in marks])
        except BaseException:
            # The rolled-back transaction may have created devices or metrics the writer cached: a new
            # writer looks them up again.
            self.writer = self._writer()
            raise
        self._count(final, stored, duplicates)
        await self.writer.touch_devices()
        return True

    async def _write(self, conn: Conn, outcomes: Sequence[Outcome]) -> tuple[list[Outcome], int, int]:
        """The outcomes as written, new readings, duplicates. A batch the database refuses for its data
        is narrowed to the message at fault, which is then refused whole (db_rejected, write_error),
        inside the same transaction: one such row cannot stop every replay at the same batch."""
        from ingest.store.classify import classify

        try:
            async with conn.transaction():  # a savepoint: the claim survives a refused write
                result = await self.writer.write_in(conn, outcomes, record_rejections=False)
            return list(result.outcomes), result.readings + result.states, result.duplicates
        except Exception as exc:
            if classify(exc) == "retry":
                raise
            if len(outcomes) == 1:
                return [_narrowed(outcomes[0], exc)], 0, 0
        final: list[Outcome] = []
        stored = duplicates = 0
        half = len(outcomes) // 2
        for part in (outcomes[:half], outcomes[half:]):
            f, s, d = await self._write(conn, part)
            final += f
            stored += s
            duplicates += d
        return final, stored, duplicates

    def _count(self, final: Sequence[Outcome], stored: int, duplicates: int) -> None:
        t = self.tally
        t.batches += 1
        t.replayed += len(final)
        t.stored += stored
        t.duplicates += duplicates
        for o in final:
            if o.rejection is not None:
                t.still[o.rejection.reason] += 1
                t.partly += bool(o.readings)
            elif o.skipped is not None:
                t.skipped[o.skipped] += 1
            else:
                t.rows_stored += 1

    async def dry_run(self, *, stop: Callable[[], bool] = lambda: False,
                      on_batch: Callable[[ReplayTally], None] | None = None) -> ReplayTally:
        """Decode and validate the selection, page after page, without writing or locking anything."""
        from ingest.model import RawMessage

        self.tally.dry_run = True
        conditions, params = self.filters.conditions(numbered=True, first=5)
        sql = _PAGE.format(filters="".join(f" AND {c}" for c in conditions))
        after: tuple[datetime | None, int] = (None, 0)
        while not stop():
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(sql, self.upto, self.batch, *after, *params)
            if not rows:
                return self.tally
            after = (rows[-1]["received_at"], rows[-1]["id"])
            outcomes = [self.processor.process(RawMessage(r["topic"], bytes(r["payload"]), r["received_at"]))
                        for r in rows]
            self._count(outcomes, sum(len(o.readings) for o in outcomes), 0)
            if on_batch is not None:
                on_batch(self.tally)
        self.tally.interrupted = True
        return self.tally


async def open_pool(settings: Settings) -> asyncpg.Pool:
    """The replay's pool (two connections: the batches', and the last_seen update after each commit)."""
    import asyncpg

    from ingest.settings import mask_url
    from ingest.store.pool import create_pool

    try:
        return await create_pool(settings.database.model_copy(update={"pool_size": 2}), "sensor-ingest-replay")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot reach the database at {mask_url(settings.database.url)}: "
                                  f"{mask_secrets(str(exc) or type(exc).__name__)}") from None


def cmd_replay(args: argparse.Namespace) -> int:
    settings = client_settings(args.config)  # the rules are not needed: replay raises no alerts
    return asyncio.run(_replay(args, settings))


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    import asyncpg

    from ingest.process import Processor
    from ingest.settings import mask_url
    from ingest.store.classify import describe

    processor = Processor.from_settings(settings)
    pool = await open_pool(settings)
    replayer = Replayer(pool, processor, settings, Filters.of(args), batch=args.batch)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    asked: list[int] = []

    def on_signal(sig: int) -> None:
        if asked and task is not None:
            task.cancel()  # a second Ctrl-C: now, the batch in progress rolls back
            return
        asked.append(sig)
        fail("stopping after the batch in progress commits (Ctrl-C again to stop now and roll it back)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    clean = False
    try:
        await replayer.count()
        await replayer.bind_units(write=not args.dry_run)
        with _Progress(replayer.tally, show=sys.stdout.isatty() and not args.json) as progress:
            go = replayer.dry_run if args.dry_run else replayer.run
            await go(stop=lambda: bool(asked), on_batch=progress.update)
        clean = True
    except asyncio.CancelledError:
        replayer.tally.interrupted = True
    except (asyncpg.UndefinedColumnError, asyncpg.UndefinedTableError):
        fail(f"the database at {mask_url(settings.database.url)} has an older schema than this release: run "
             "`sensor-ingest migrate`")
        return 2
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        replayer.tally.interrupted = True
        _summary(replayer.tally, args)
        raise DatabaseUnavailable(f"replay stopped: the database at {mask_url(settings.database.url)} failed "
                                  f"({mask_secrets(describe(exc))}); the batch in progress was rolled back, the "
                                  "committed ones are kept: run the same command again to resume") from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if clean:
            await pool.close()
        else:
            pool.terminate()  # a connection may be stuck mid-statement; the server rolls its batch back
    _summary(replayer.tally, args)
    return 130 if replayer.tally.interrupted else 0


class _Progress:
    """A rich progress bar over the replayable rows counted at the start, when stdout is a terminal."""

    def __init__(self, tally: ReplayTally, show: bool) -> None:
        self._tally = tally
        self._bar: Any = None
        self._task: Any = None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("replaying" if not tally.dry_run else "checking"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("rows"), TimeRemainingColumn())

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task("rows", total=self._tally.matching)
        return self

    def update(self, tally: ReplayTally) -> None:
        if self._bar is not None:
            # Another replay may take some of the rows: the total grows with what this one found.
            self._bar.update(self._task, completed=tally.replayed, total=max(tally.matching, tally.replayed))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _summary(t: ReplayTally, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(t.as_json(), indent=2, ensure_ascii=False))
        return
    if not (t.matching or t.replayed or t.not_replayable or t.interrupted):
        print(f"nothing to replay{Filters.of(args).shown()}: no matching row is waiting for a replay "
              "(`sensor-ingest rejected` lists the rows and their replay outcomes)")
        return
    verb = "would replay" if t.dry_run else "replayed"
    lines = [f"{verb} {t.replayed} row(s) of {t.matching} not yet replayed{Filters.of(args).shown()}, "
             f"in {t.batches} batch(es)"]
    figures: list[tuple[str, str]] = []
    if t.dry_run:
        figures.append(("readings valid", f"{t.stored} (duplicates, conflicts and device_policy = \"known\" are "
                        "checked only by a replay)"))
    else:
        figures.append(("readings stored (new)", str(t.stored)))
        figures.append(("duplicates", f"{t.duplicates} (already stored: a message partly stored the first time, "
                        "or a redelivered copy)"))
    figures.append(("rows stored", f"{t.rows_stored} (all of the row's readings{' would be' if t.dry_run else ''} "
                    "stored)"))
    if t.skipped:
        figures.append(("rows skipped", f"{t.skipped.total()} (nothing to store: "
                        f"{', '.join(f'{k} {n}' for k, n in t.skipped.most_common())})"))
    if t.still:
        figures.append(("rows still rejected", f"{t.still.total()} ({t.partly} of them partly stored), by new "
                        "reason: " + ", ".join(f"{k} {n}" for k, n in t.still.most_common())))
    if t.not_replayable:
        figures.append(("not replayable", f"{t.not_replayable} row(s) of reason too_large (only the first "
                        "ingest.max_message_bytes of each message were kept), left as they are"))
    lines += [f"  {label + ':':<23}{value}" for label, value in figures]
    if t.interrupted:
        lines.append("interrupted: the committed batches are kept; run the same command again to resume")
    elif t.dry_run:
        lines.append("dry run: nothing was written")
    print("\n".join(lines))
