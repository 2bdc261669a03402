"""`sensor-ingest silences add|list|expire` and `sensor-ingest alerts ack`: silences and
acknowledgements, written to the database (psycopg) for every worker of the service to see.

What a silence matches and what it holds back is ingest.alerts.silence's docstring; an ack is a
note on the current episode of a firing series (alert_acks), shown by `alerts list`, and changes no
delivery.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ingest.alerts.cli import _DB_ENV, _client_args, _wrap
from ingest.clikit import cell, client_settings, connect, fail, json_value, positive, rfc3339, table

if TYPE_CHECKING:
    from ingest.settings import Settings

__all__ = ["add_ack_parser", "add_silences_parser", "cmd_ack", "cmd_silences"]

SILENCES_DESCRIPTION = """\
A silence holds back the notifications of the alerts it matches while it is active, for every
worker of the service (it is stored in the database). The events are still recorded (`alerts
history` shows which silence held each back). When the silence ends (--until passes, or `silences
expire`) while an alert it held back still fires, that alert's firing notification is sent once,
within a few seconds; an alert that resolved meanwhile sends nothing, neither firing nor resolved.

  sensor-ingest silences add --rule R --device GLOB --label k=v --until T --comment C
  sensor-ingest silences list [--all]            active silences (--all: ended ones too)
  sensor-ingest silences expire ID               end a silence now

A silence matches an event when each matcher it has holds: --rule (the rule's name), --device (a glob
on the device id: * any run of characters, ? one) and every --label k=v. An event's labels are
alertname and rule (the rule's name), device, metric and severity; then the rule's labels; then the
device's attributes (district, make, ...): a name found twice has its first value. Only the firing
notification of an episode that starts while the silence is active is held back; the resolved
notification of an episode whose firing was sent is always sent.
"""

_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a rule's name (ingest.alerts.settings)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LABEL_KEY = re.compile(r"^[^\s=]{1,200}$")
MAX_TEXT = 1000  # a comment, a glob, a label value
MAX_SPAN = timedelta(days=3650)  # the longest silence: beyond it, a silence is a rule change in disguise
_SPAN_TEXT = "10 years, 3650d"


# --- argument types: each error says what to write instead ----------------------------------------


def _rule(text: str) -> str:
    if not _PLAIN.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rule name: rule names are letters, digits, '-', '_' "
                                         "and '.', as `sensor-ingest rules list` shows them")
    return text


def _glob(text: str) -> str:
    if not text or len(text) > MAX_TEXT or _CONTROL.search(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device glob: write a device id, or one with * (any run "
                                         "of characters) and ? (one character), e.g. 'hn-aq-*'")
    if set(text) <= {"*", "?"}:  # no fixed character: every device, or every one of a length
        reach = "every device" if "*" in text else f"every device whose id has {len(text)} characters"
        raise argparse.ArgumentTypeError(f"{text!r} matches {reach}: put a fixed part of the device id in it "
                                         "('hn-aq-*'), or leave --device out and name a --rule or a --label instead")
    return text


def _label(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not _LABEL_KEY.match(key) or not value or len(value) > MAX_TEXT or _CONTROL.search(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a label matcher: write k=v, e.g. district=hoan-kiem or "
                                         "team=hydro (no space or '=' in k; v not empty)")
    return key, value


def _until(text: str) -> datetime | float:
    """RFC 3339 with an offset (a time), or a duration from now (seconds, added to the database's
    clock by `silences add`, the clock of starts_at); in the future, at most MAX_SPAN ahead. A time
    is checked here against this machine's clock, and again against the database's."""
    from ingest.alerts.model import parse_duration

    now = datetime.now(UTC)
    try:
        seconds = parse_duration(text)
    except ValueError:
        when = rfc3339(text, " (2026-11-25T18:00:00+07:00) nor a duration from now (30m, 2h, 7d)")
    else:
        if seconds <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is no time at all: give a duration such as 2h")
        if seconds > MAX_SPAN.total_seconds():
            raise argparse.ArgumentTypeError(f"{text!r} is longer than a silence may last ({_SPAN_TEXT}): give a "
                                             "shorter duration, and expire or add silences as plans change")
        return seconds
    if when <= now:
        raise argparse.ArgumentTypeError(f"{text!r} is in the past ({cell(when, '')}): a silence ends in the future")
    if when - now > MAX_SPAN:
        raise argparse.ArgumentTypeError(f"{text!r} is further ahead than a silence may last ({_SPAN_TEXT}): give an "
                                         "earlier time")
    return when


def _comment(text: str) -> str:
    if not text.strip() or len(text) > MAX_TEXT:
        raise argparse.ArgumentTypeError(f"a comment says why, in 1 to {MAX_TEXT} characters, e.g. "
                                         "'flood sensor maintenance, ticket 4711'")
    return text


def _name(text: str) -> str:
    if not text.strip() or len(text) > 200 or _CONTROL.search(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a name: write who you are, e.g. alice or 'ops on call'")
    return text


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in a bare container
        return "unknown"


def _writer_args(p: argparse.ArgumentParser) -> None:
    _client_args(p, _DB_ENV, json_flag=False)
    p.add_argument("--json", action="store_true", help="print the row written as JSON instead of a sentence")


# --- the parsers ----------------------------------------------------------------------------------


def add_silences_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    silences = sub.add_parser(
        "silences", help="silences: hold back the notifications of matching alerts for a while",
        description=SILENCES_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Environment (overrides the file):\n{_DB_ENV}",
    )
    actions = silences.add_subparsers(dest="silences_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "add", help="add a silence: name a rule, a device glob or labels, until when, and why",
        description=_wrap("Add a silence, active from now until --until, for every worker of the service. At least one "
        "of --rule, --device and --label; all given must hold for an alert to be silenced. It starts at the database's "
        "clock's now and lasts at most 10 years. A --rule that neither this configuration nor any evaluated series "
        "names is added with a warning on stderr (a typo silences nothing). Prints the silence's id "
        "(for `silences expire`). Exit 0 when added, 2 when the arguments are wrong (nothing added) or the database "
        "cannot be written."),
    )
    _writer_args(p)
    p.add_argument("--rule", metavar="R", type=_rule, help="only alerts of this rule")
    p.add_argument("--device", metavar="GLOB", type=_glob,
                   help="only alerts of devices whose id matches: * any run of characters, ? one, e.g. 'hn-lv-*'")
    p.add_argument("--label", metavar="k=v", type=_label, action="append", default=[],
                   help="only alerts whose label k is v (a device attribute, a rule label, or alertname, rule, "
                   "device, metric, severity); repeat for more, all must hold")
    p.add_argument("--until", metavar="T", type=_until, required=True,
                   help="when it ends: RFC 3339 with an offset (2026-11-25T18:00:00+07:00) or a duration from now "
                   "(30m, 2h, 7d); at most 10 years ahead")
    p.add_argument("--comment", metavar="C", type=_comment, required=True, help="why, for the other operators")
    p.add_argument("--by", metavar="NAME", type=_name, default=None,
                   help="who does it, recorded with it (default: your login name)")

    p = actions.add_parser(
        "list", help="the active silences (--all: ended and expired ones too)",
        description=_wrap("The silences active now, newest first: id, what they match, from when until when, who added "
        "them and why, how many firing alerts each holds back now (holding: their firing notification waits for the "
        "silence's end) and how many alert events, firing and resolved, it has silenced in all. --all shows ended "
        "and expired ones too, with "
        "their state. Exit 0, 2 when the database cannot be read."),
    )
    _client_args(p, _DB_ENV)
    p.add_argument("--all", action="store_true", help="ended and expired silences too")
    p.add_argument("--limit", type=positive, default=1000, metavar="N", help="at most N rows (default: %(default)s)")

    p = actions.add_parser(
        "expire", help="end a silence now",
        description=_wrap("End the silence ID now. An alert it held back that still fires, and that no other active "
        "silence matches, has its firing notification sent within a few seconds by the running service; one "
        "that resolved meanwhile sends nothing. Exit 0 when it is ended (or had ended already: nothing to do), "
        "1 when there is no silence ID, 2 when the database cannot be written."),
    )
    _writer_args(p)
    p.add_argument("id", type=positive, metavar="ID", help="the silence's id, as `silences list` shows it")


def add_ack_parser(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`alerts ack`, an action of the `alerts` command (ingest.alerts.cli)."""
    p = actions.add_parser(
        "ack", help="acknowledge a firing alert: who, when and why, shown by `alerts list`",
        description=_wrap("Acknowledge the current episode of the firing alert ALERT: your name (or --by), the time "
        "and --comment are recorded and shown by `alerts list`, so that the other operators know someone is on it. "
        "The ack ends with the episode: when the alert resolves and fires again, the new episode is not "
        "acknowledged. An ack changes no notification (a silence does). ALERT is RULE/DEVICE, as the alert column "
        "of `alerts list` shows it (RULE/DEVICE/METRIC when that names more than one series). Acknowledging an "
        "acknowledged episode again replaces the ack. Exit 0 when acknowledged, 1 when ALERT is not a firing "
        "alert, 2 when ALERT is not of that form or the database cannot be written."),
    )
    _writer_args(p)
    p.add_argument("alert", metavar="ALERT", help="RULE/DEVICE, e.g. pm25-high/hn-aq-001")
    p.add_argument("--comment", metavar="C", type=_comment, required=True, help="why, or what is being done")
    p.add_argument("--by", metavar="NAME", type=_name, default=None,
                   help="who does it, recorded with it (default: your login name)")


# --- the commands ---------------------------------------------------------------------------------


def _run(args: argparse.Namespace, action: Callable[[Any, argparse.Namespace, Settings], int]) -> int:
    from ingest.clikit import database_errors

    settings = client_settings(args.config)
    with database_errors(settings, "has no silences"), connect(settings) as conn:
        return action(conn, args, settings)


def cmd_silences(args: argparse.Namespace) -> int:
    command: str = args.silences_command
    if command == "add" and not (args.rule or args.device or args.label):
        fail("silences add: name at least one of --rule, --device and --label (a silence of everything would hide "
             "every alert)")
        return 2
    if command == "add":
        keys = [k for k, _ in args.label]
        clash = sorted({k for k in keys if len({v for kk, v in args.label if kk == k}) > 1})
        if clash:
            fail(f"silences add: --label {clash[0]} is given two values; an alert has one, so the silence would match "
                 "nothing: keep one")
            return 2
    return _run(args, {"add": _add, "list": _list, "expire": _expire}[command])


def cmd_ack(args: argparse.Namespace) -> int:
    rule, slash, rest = args.alert.partition("/")
    if not slash or not rule or not rest:
        fail(f"alerts ack: {args.alert!r} is not an alert: write RULE/DEVICE as the alert column of `sensor-ingest "
             "alerts list` shows it, e.g. pm25-high/hn-aq-001")
        return 2
    return _run(args, _ack)


def _dump(rows: list[dict[str, Any]] | dict[str, Any]) -> None:
    print(json.dumps(rows, indent=2, ensure_ascii=False, default=json_value))


def _rows(cursor: Any) -> list[dict[str, Any]]:
    names = [d.name for d in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


_COLUMNS = ("s.id, CASE WHEN s.expired_at IS NOT NULL AND s.expired_at <= now() THEN 'expired'"
            " WHEN s.ends_at <= now() THEN 'ended' WHEN s.starts_at > now() THEN 'pending' ELSE 'active' END AS state,"
            " s.rule, s.device, s.labels, s.starts_at, s.ends_at, s.expired_at, s.created_by, s.comment, s.created_at")


def _matchers(row: dict[str, Any]) -> str:
    parts = [f"rule={row['rule']}"] if row["rule"] else []
    if row["device"]:
        parts.append(f"device~{row['device']}")
    parts += [f"{k}={v}" for k, v in sorted(row["labels"].items())]
    return ", ".join(parts)


_KNOWN_RULE = "SELECT EXISTS (SELECT 1 FROM alert_state WHERE rule = %(rule)s)"


def _add(conn: Any, args: argparse.Namespace, settings: Settings) -> int:
    labels = dict(args.label)
    # starts_at and ends_at on one clock, the database's: this machine's may be off.
    now: datetime = conn.execute("SELECT now()").fetchone()[0]
    until = now + timedelta(seconds=args.until) if isinstance(args.until, float) else args.until
    if until <= now:
        fail(f"silences add: --until {cell(until, '')} is in the past by the database's clock ({cell(now, '')}): "
             "this machine's clock is ahead; give a later time or a duration")
        return 2
    if args.rule and args.rule not in {r.name for r in settings.rules} and \
            not conn.execute(_KNOWN_RULE, {"rule": args.rule}).fetchone()[0]:
        fail(f"silences add: warning: no rule {args.rule!r} is configured here and none has evaluated a series: "
             "the silence matches nothing until a rule of that name runs (see `sensor-ingest rules list`)")
    row = _rows(conn.execute(
        "INSERT INTO silences AS s (rule, device, labels, starts_at, ends_at, comment, created_by)"
        " VALUES (%(rule)s, %(device)s, %(labels)s::jsonb, %(now)s, %(until)s, %(comment)s, %(by)s)"
        " RETURNING " + _COLUMNS,
        {"rule": args.rule, "device": args.device, "labels": json.dumps(labels, ensure_ascii=False), "now": now,
         "until": until, "comment": args.comment, "by": args.by or _who()}))[0]
    if args.json:
        _dump(row)
        return 0
    print(f"silence {row['id']} added: {_matchers(row)}, until {cell(row['ends_at'], '')} "
          f"(`sensor-ingest silences expire {row['id']}` ends it sooner)")
    return 0


def _list(conn: Any, args: argparse.Namespace, settings: Settings) -> int:
    where = "" if args.all else (" WHERE s.starts_at <= now() AND s.ends_at > now()"
                                 " AND (s.expired_at IS NULL OR s.expired_at > now())")
    rows = _rows(conn.execute(
        "SELECT " + _COLUMNS + ", (SELECT count(*) FROM alert_held h WHERE h.silenced_by = s.id) AS holding,"
        " (SELECT count(*) FROM alert_events e WHERE e.silenced_by = s.id) AS events_silenced"
        " FROM silences s" + where + " ORDER BY s.id DESC LIMIT %(limit)s", {"limit": args.limit}))
    if args.json:
        _dump(rows)
        return 0
    if not rows:
        print("no silences" if args.all else "no active silences")
        return 0
    table("silences" if args.all else "active silences",
          ["id", "state", "matches", "from", "until", "by", "comment", "holding", "events silenced"],
          [[str(r["id"]), r["state"], _matchers(r), cell(r["starts_at"], ""),
            cell(r["expired_at"] if r["state"] == "expired" else r["ends_at"], ""), r["created_by"], r["comment"],
            str(r["holding"]), str(r["events_silenced"])] for r in rows])
    if len(rows) == args.limit:
        print(f"(the first {args.limit}; --limit N shows more)")
    return 0


def _expire(conn: Any, args: argparse.Namespace, settings: Settings) -> int:
    ended = _rows(conn.execute(
        "UPDATE silences s SET expired_at = now() WHERE s.id = %(id)s AND s.ends_at > now() AND s.expired_at IS NULL"
        " RETURNING " + _COLUMNS, {"id": args.id}))
    if ended:
        if args.json:
            _dump(ended[0])
        else:
            print(f"silence {args.id} expired; the firing alerts it held back, if no other silence matches them, are "
                  "notified within a few seconds by the running service")
        return 0
    was = _rows(conn.execute("SELECT " + _COLUMNS + " FROM silences s WHERE s.id = %(id)s", {"id": args.id}))
    if not was:
        fail(f"silences expire: there is no silence {args.id} (see `sensor-ingest silences list --all`)")
        return 1
    if args.json:
        _dump(was[0])
    else:
        end = was[0]["expired_at"] or was[0]["ends_at"]
        print(f"silence {args.id} had {was[0]['state']} already, at {cell(end, '')}: nothing to do")
    return 0


_SERIES = """
SELECT s.rule, s.device_id, s.metric_id, d.uid AS device, COALESCE(m.name, '*') AS metric, s.status,
       s.episode_start
FROM alert_state s JOIN devices d ON d.id = s.device_id LEFT JOIN metrics m ON m.id = s.metric_id
WHERE s.rule = %(rule)s AND (d.uid = %(rest)s OR d.uid || '/' || COALESCE(m.name, '*') = %(rest)s)
UNION ALL
-- A value rule's series whose state never left ok has no row of its own, only its series' shared row
-- (ingest.alerts.model.ValueRules): it is ok. The metric parameter: the rule's metric if the config has it as a
-- value rule, else that of the rule's other series.
SELECT %(rule)s, v.device_id, v.metric_id, d.uid, m.name, 'ok', NULL
FROM alert_state v JOIN devices d ON d.id = v.device_id JOIN metrics m ON m.id = v.metric_id
WHERE v.rule = '*value'
  AND m.name = COALESCE(%(metric)s, (SELECT x.name FROM alert_state r JOIN metrics x ON x.id = r.metric_id
                                     WHERE r.rule = %(rule)s LIMIT 1))
  AND (d.uid = %(rest)s OR d.uid || '/' || m.name = %(rest)s)
  AND NOT EXISTS (SELECT 1 FROM alert_state r WHERE r.rule = %(rule)s AND r.device_id = v.device_id
                  AND r.metric_id = v.metric_id)
ORDER BY 4, 5
"""
_ACK = """
INSERT INTO alert_acks (rule, device_id, metric_id, episode_start, acked_by, comment)
SELECT s.rule, s.device_id, s.metric_id, s.episode_start, %(by)s, %(comment)s FROM alert_state s
WHERE s.rule = %(rule)s AND s.device_id = %(device_id)s AND s.metric_id = %(metric_id)s AND s.status = 'firing'
  AND s.episode_start = %(episode_start)s
ON CONFLICT (rule, device_id, metric_id, episode_start) DO UPDATE SET
    acked_by = EXCLUDED.acked_by, comment = EXCLUDED.comment, acked_at = now()
RETURNING rule, episode_start, acked_by, comment, acked_at
"""
_EARLIER = """
SELECT acked_by, acked_at FROM alert_acks
WHERE rule = %(rule)s AND device_id = %(device_id)s AND metric_id = %(metric_id)s AND episode_start = %(episode_start)s
"""


def _ack(conn: Any, args: argparse.Namespace, settings: Settings) -> int:
    rule, _, rest = args.alert.partition("/")
    value = next((r.metric for r in settings.rules if r.name == rule and r.no_data is None and r.rate is None
                  and r.window is None), None)
    found = _rows(conn.execute(_SERIES, {"rule": rule, "rest": rest, "metric": value}))
    # RULE/DEVICE first (a device id may itself hold a '/'), then RULE/DEVICE/METRIC.
    series = [r for r in found if r["device"] == rest] or found
    if not series:
        fail(f"alerts ack: no alert {args.alert} (no series of rule {rule!r} on that device): see "
             "`sensor-ingest alerts list`")
        return 1
    if len(series) > 1:
        names = ", ".join(f"{rule}/{r['device']}/{r['metric']}" for r in series)
        fail(f"alerts ack: {args.alert} names {len(series)} series; name one: {names}")
        return 1
    target = series[0]
    if target["status"] != "firing":
        fail(f"alerts ack: {args.alert} is {target['status']}, not firing: only a firing alert's episode can be "
             "acknowledged")
        return 1
    earlier = _rows(conn.execute(_EARLIER, target))
    done = _rows(conn.execute(_ACK, {**target, "by": args.by or _who(), "comment": args.comment}))
    if not done:
        fail(f"alerts ack: {args.alert} stopped firing just now: nothing acknowledged")
        return 1
    ack = {"alert": f"{rule}/{target['device']}", "metric": target["metric"], **done[0]}
    if args.json:
        _dump(ack)
        return 0
    replaced = (f" (replacing the ack by {earlier[0]['acked_by']} at {cell(earlier[0]['acked_at'], '')})"
                if earlier else "")
    print(f"acknowledged {ack['alert']} ({target['metric']}), firing since {cell(target['episode_start'], '')}, by "
          f"{ack['acked_by']}: {ack['comment']}{replaced}")
    return 0
