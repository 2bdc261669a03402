"""`sensor-ingest rules ...` and `sensor-ingest alerts ...`: the operators' side of the alerts.

- rules check FILE: validates the rules and webhooks offline, as the service would read them;
- rules list, rules reload: ask the running service (GET /v1/rules, POST /-/reload on http.addr);
- alerts list, history, deliveries: read alert_state, alert_events and alert_outbox (psycopg).

The client commands need only http.addr or [database] from FILE: a file whose rules are broken (the
reason to run `rules reload`), or whose webhook secrets are only in the service's environment, is
still good enough to find the service and the database. No output shows a webhook secret.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.clikit import (
    cell,
    client_settings,
    connect,
    database_errors,
    fail,
    json_value,
    like,
    positive,
    since,
    table,
)
from ingest.logs import mask_secrets

if TYPE_CHECKING:
    pass

__all__ = ["add_alerts_parsers", "cmd_alerts", "cmd_rules"]

_HTTP_ENV = "  SENSOR_INGEST_HTTP_ADDR           http.addr: where the service listens"
_DB_ENV = ("  SENSOR_INGEST_DATABASE_URL        database.url\n"
           "  SENSOR_INGEST_DATABASE_PASSWORD   the database password (only from the environment)")

RULES_DESCRIPTION = """\
The alert rules are the [[rules]] and [[webhooks]] entries (and [alerts]) of the config file. Each
webhook's secret is read from the environment variable its secret_env names, never from the file.

  sensor-ingest rules check FILE           validate offline; exit 0 when valid, 1 when not
  sensor-ingest rules list -c FILE         the set the running service uses (GET /v1/rules)
  sensor-ingest rules reload -c FILE       make the service read its config file again (POST /-/reload)

A reload (also on SIGHUP) validates the whole file first: with any problem the service keeps its
running set and says why. Only [[rules]], [[webhooks]] and [alerts] take effect at a reload; the
other sections at the next start.
"""

ALERTS_DESCRIPTION = """\
What the alert rules have done, read from the database: the state of each series a rule watches
(alert_state), the firing and resolved events (alert_events) and their webhook deliveries
(alert_outbox); and acknowledgements, the one thing written here (silences: `sensor-ingest silences`).

  sensor-ingest alerts list [--firing]          pending and firing alerts (--all: every series)
  sensor-ingest alerts history [--rule R] ...   firing and resolved events, newest first
  sensor-ingest alerts deliveries [--failed]    webhook deliveries: attempts, last answer, error
  sensor-ingest alerts ack ALERT --comment C    acknowledge a firing alert's episode
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def _client_args(p: argparse.ArgumentParser, env: str, json_flag: bool = True) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = f"Environment (overrides the file):\n{env}"
    p.add_argument("--config", "-c", metavar="FILE", type=Path,
                   help="the service's TOML config file, for its address or database (optional: the environment "
                   "may be enough); its rules need not be valid here")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_alerts_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rules = sub.add_parser(
        "rules", help="check, list and reload the alert rules ([[rules]] and [[webhooks]])",
        description=RULES_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment:\n  SENSOR_INGEST_HTTP_ADDR  where the service listens (list, reload)\n"
        "  each webhook's secret_env  its secret, whsec_<base64> (check; the service's own for reload)",
    )
    actions = rules.add_subparsers(dest="rules_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "check", help="validate the rules and webhooks of FILE offline",
        description=_wrap("Validate FILE as the service reads it at start-up and at a reload, with the SENSOR_INGEST_* "
        "environment and the webhook secrets from the variables their secret_env names (set them here too), "
        "without any network call. Each problem names the rule or webhook, the key and the fix. Exit 0 when "
        "valid (the rules are listed), 1 when not."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment: SENSOR_INGEST_* overrides, as for `run`; each webhook's secret_env variable.",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--json", action="store_true", help="print the rules as GET /v1/rules would, in JSON")

    p = actions.add_parser(
        "list", help="the rules the running service uses (asks it: GET /v1/rules)",
        description=_wrap("Ask the running service for its active rules and webhooks "
        "(GET http://<http.addr>/v1/rules): each rule's metric, condition, clear level, for, severity, "
        "webhooks (name and URL, never the secret), devices, where and labels. Exit 0, or 2 when the "
        "service cannot be reached."),
    )
    _client_args(p, _HTTP_ENV)

    p = actions.add_parser(
        "reload", help="make the running service read its rules again (POST /-/reload; SIGHUP does the same)",
        description=_wrap("Ask the running service to read its own config file again "
        "(POST http://<http.addr>/-/reload) and replace its rules and webhooks if every one is valid. Exit 0 "
        "when they were replaced (what changed is printed), 1 when the service found problems and kept its "
        "running set (the problems are printed), 2 when the service cannot be reached. Only [[rules]], "
        "[[webhooks]] and [alerts] change at a reload. `sensor-ingest rules check FILE` finds the problems "
        "before a reload does."),
    )
    _client_args(p, _HTTP_ENV, json_flag=False)

    alerts = sub.add_parser(
        "alerts", help="alerts from the database: active ones, their history, their webhook deliveries",
        description=ALERTS_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Environment (overrides the file):\n{_DB_ENV}",
    )
    actions = alerts.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "list", help="pending and firing alerts, one per (rule, device, metric)",
        description=_wrap("The series the rules watch that are pending (the condition holds, `for` not yet elapsed) or "
        "firing, firing first, with the episode's start, the last value and its event time, and the severity and "
        "threshold of the series' last event. Read from alert_state. Exit 0, 2 when the database cannot be read."),
    )
    _client_args(p, _DB_ENV)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--firing", action="store_true", help="only the firing ones")
    which.add_argument("--all", action="store_true", help="every series a rule has evaluated, ok ones too")
    p.add_argument("--rule", metavar="R", help="only this rule")
    p.add_argument("--limit", type=positive, default=1000, metavar="N", help="at most N rows (default: %(default)s)")

    p = actions.add_parser(
        "history", help="firing and resolved events, newest first",
        description=_wrap("Firing and resolved events (alert_events), newest first, with the reading that caused each "
        "(event time, value), the threshold, and whether it was notified: no for an episode older than "
        "alerts.max_notify_age when recorded (kept, not sent) and for an event a silence held back (silenced by); a "
        "held firing event sent when its silence ended shows yes, and when in released. Exit 0, 2 when the "
        "database cannot be read."),
    )
    _client_args(p, _DB_ENV)
    p.add_argument("--rule", metavar="R", help="only this rule")
    p.add_argument("--device", metavar="D", help="only this device id; * and ? are wildcards, e.g. 'hn-aq-*'")
    p.add_argument("--since", metavar="T", type=since,
                   help="only events whose event time is at or after T: RFC 3339 with an offset "
                   "(2026-11-25T03:00:00Z) or a duration back from now (30m, 2h, 7d)")
    p.add_argument("--limit", type=positive, default=50, metavar="N", help="at most N events (default: %(default)s)")

    p = actions.add_parser(
        "deliveries", help="webhook deliveries: status, attempts, the receiver's last answer",
        description=_wrap("Webhook deliveries (alert_outbox), newest first: status (pending, delivered, failed), "
        "attempts, the receiver's last HTTP status and error, when the event was recorded and delivered (or the "
        "next attempt). A delivery fails for good on a 4xx other than 408 and 429, on 410 (the webhook is "
        "disabled), or once older than the webhook's max_age. Exit 0, 2 when the database cannot be read."),
    )
    _client_args(p, _DB_ENV)
    p.add_argument("--failed", action="store_true", help="failed deliveries (with --pending: both)")
    p.add_argument("--pending", action="store_true", help="deliveries not yet made (with --failed: both)")
    p.add_argument("--webhook", metavar="W", help="only this webhook")
    p.add_argument("--limit", type=positive, default=50, metavar="N", help="at most N rows (default: %(default)s)")

    from ingest.alerts.silence_cli import add_ack_parser  # it imports this module

    add_ack_parser(actions)


# -- rules ------------------------------------------------------------------------------------------------


def cmd_rules(args: argparse.Namespace) -> int:
    command: str = args.rules_command
    if command == "check":
        return _rules_check(args)
    if command == "list":
        return _rules_list(args)
    return _rules_reload(args)


def _rules_check(args: argparse.Namespace) -> int:
    from ingest.alerts.runtime import load_rules, view_of

    rules, problems = load_rules(args.file)
    if rules is None:
        fail(f"{args.file}: {len(problems)} problem(s)" + "".join(f"\n  - {p}" for p in problems))
        return 1
    view = view_of(rules, args.file)
    if args.json:
        print(json.dumps(view.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False))
        return 0
    print(f"{args.file}: OK: {len(view.rules)} rule(s), {len(view.webhooks)} webhook(s)")
    _print_rules(view.model_dump(mode="json", by_alias=True))
    return 0


def _rules_list(args: argparse.Namespace) -> int:
    from ingest.alerts.runtime import RuleSetView

    answer = _ask(args.config, "GET", "/v1/rules")
    if isinstance(answer, int):
        return answer
    status, body = answer
    if status != 200:
        fail(f"GET /v1/rules answered {status}: {body}")
        return 2
    view = RuleSetView.model_validate(body).model_dump(mode="json", by_alias=True)
    if args.json:
        print(json.dumps(view, indent=2, ensure_ascii=False))
        return 0
    print(f"active rules of the service (from {view['config'] or 'no config file'}): {len(view['rules'])} rule(s), "
          f"{len(view['webhooks'])} webhook(s)")
    _print_rules(view)
    return 0


def _rules_reload(args: argparse.Namespace) -> int:
    answer = _ask(args.config, "POST", "/-/reload")
    if isinstance(answer, int):
        return answer
    status, body = answer
    message = body.get("message") if isinstance(body, dict) else None
    if status == 200 and isinstance(message, str):
        print(mask_secrets(message))
        return 0
    if status == 422 and isinstance(message, str):
        fail(message)
        return 1
    fail(f"POST /-/reload answered {status}: {body}")
    return 2


def _number(v: Any) -> str:
    if isinstance(v, list):
        return f"[{', '.join(_number(x) for x in v)}]"
    return f"{v:g}" if isinstance(v, float | int) else str(v)


def _seconds(v: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if v >= size and v % size == 0:
            return f"{v / size:g}{unit}"
    return f"{v:g}s"


_CONDITION = {"above": "> {}", "below": "< {}", "outside": "outside {}"}


def _fires_when(r: dict[str, Any]) -> tuple[str, str]:
    """A rule's condition and clear level in words, e.g. "> 55.5", "no data for 15m (per device)",
    "rate over 10m > 0.5/min", "avg over 1h (clock, coverage 0.75) > 55.5". A rule of a kind this
    release does not know (a newer service) shows as its threshold."""
    condition = _CONDITION[r["kind"]].format(_number(r["threshold"]))
    clear = _number(r["clear"])
    signal = r.get("signal", "value")
    if signal == "no_data" and r.get("no_data") is not None:
        per = " (per device)" if r.get("per") == "device" else ""
        return f"no data for {_seconds(r['no_data'])}{per}", "a reading"
    if signal == "rate" and r.get("rate"):
        return f"rate over {_seconds(r['rate']['over'])} {condition}/min", f"{clear}/min"
    if signal == "window" and r.get("window"):
        w = r["window"]
        how = w["align"] + (f", coverage {_number(w['coverage'])}" if w["coverage"] else "")
        return f"{w['agg']} over {_seconds(w['over'])} ({how}) {condition}", clear
    return condition, clear


def _print_rules(view: dict[str, Any]) -> None:
    if not view["rules"]:
        print("no [[rules]]: nothing alerts")
    else:
        rows = []
        for r in view["rules"]:
            scope = ", ".join(r["devices"]) or "every device"
            if r["where"]:
                scope += " where " + ", ".join(f"{k}={v}" for k, v in r["where"].items())
            fires, clear = _fires_when(r)
            rows.append([r["name"], r["metric"] or "any metric", fires, clear,
                         _seconds(r["for"]) if r["for"] else "-", r["severity"],
                         ", ".join(w["name"] for w in r["webhooks"]) or "-", scope,
                         ", ".join(f"{k}={v}" for k, v in r["labels"].items())])
        table("rules", ["rule", "metric", "fires when", "clear", "for", "severity", "webhooks", "devices",
                         "labels"], rows)
    if view["webhooks"]:
        table("webhooks", ["webhook", "url"], [[w["name"], w["url"]] for w in view["webhooks"]])


# -- asking the service -----------------------------------------------------------------------------------


def _ask(config: Path | None, method: str, path: str) -> tuple[int, Any] | int:
    """(status, JSON body) of the service's answer; or the exit status, 2, after saying why there is none."""
    import httpx

    http = client_settings(config).http
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(http.host, http.host)
    base = f"http://{f'[{host}]' if ':' in host else host}:{http.port}"
    where = f"http.addr in {config}" if config else "http.addr: the default, or SENSOR_INGEST_HTTP_ADDR"
    try:
        response = httpx.request(method, base + path, timeout=30)
    except httpx.TimeoutException:
        fail(f"the service at {base} did not answer {method} {path} within 30 s; is it stuck? "
              f"Check `curl {base}/healthz` and its log")
        return 2
    except httpx.HTTPError as exc:
        fail(f"cannot reach the service at {base} ({exc}): is it running, and is this its address ({where})? "
              f"Check with `curl {base}/healthz`")
        return 2
    if response.status_code == 404:
        fail(f"the service at {base} does not serve {path}: it runs without alert rules (a version before them), "
              f"or another program listens at {where}")
        return 2
    try:
        body = response.json()
    except ValueError:
        body = response.text[:500]
    return response.status_code, body


# -- alerts, from the database ----------------------------------------------------------------------------


def cmd_alerts(args: argparse.Namespace) -> int:
    command: str = args.alerts_command
    if command == "ack":
        from ingest.alerts.silence_cli import cmd_ack

        return cmd_ack(args)
    settings = client_settings(args.config)
    query, params, columns = (_list_query if command == "list" else
                              _history_query if command == "history" else _deliveries_query)(args)
    with database_errors(settings, "has no alert tables", doing="read"), connect(settings, read_only=True) as conn:
        cursor = conn.execute(query, params)
        names = [d.name for d in cursor.description or ()]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:  # a receiver's error may quote a URL with its password
        if row.get("last_error"):
            row["last_error"] = mask_secrets(str(row["last_error"]))
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False, default=json_value))
        return 0
    if not rows:
        print(_nothing(args) + _filters(args))
        return 0
    table(f"{command}{_filters(args)}", [title for title, _ in columns],
           [[cell(row[key], key) for _, key in columns] for row in rows])
    if len(rows) == args.limit:
        print(f"(the first {args.limit}; --limit N shows more)")
    return 0


def _nothing(args: argparse.Namespace) -> str:
    if args.alerts_command == "list":
        return "no firing alerts" if args.firing else "no alert state" if args.all else "no pending or firing alerts"
    if args.alerts_command == "history":
        return "no alert events"
    kinds = [k for k in ("failed", "pending") if getattr(args, k)]
    return f"no {' or '.join(kinds)} deliveries" if kinds else "no deliveries"


def _filters(args: argparse.Namespace) -> str:
    shown = [f"{k} {getattr(args, k)}" for k in ("rule", "device", "webhook") if getattr(args, k, None)]
    if getattr(args, "since", None):
        shown.append(f"since {args.since.strftime('%Y-%m-%d %H:%M:%SZ')}")
    return f" ({', '.join(shown)})" if shown else ""


# A per-device no_data rule's series has metric 0, which is no metric: shown as "*".
_SERIES = ("JOIN devices d ON d.id = {t}.device_id LEFT JOIN metrics m ON m.id = {t}.metric_id")

Query = tuple[str, dict[str, Any], list[tuple[str, str]]]


def _list_query(args: argparse.Namespace) -> Query:
    statuses = ["firing"] if args.firing else ["ok", "pending", "firing"] if args.all else ["pending", "firing"]
    where = ["s.status = ANY(%(statuses)s)", "s.rule <> '*value'"]  # not a series' shared row (ValueRules)
    params: dict[str, Any] = {"statuses": statuses, "limit": args.limit}
    if args.rule:
        where.append("s.rule = %(rule)s")
        params["rule"] = args.rule
    # The series' last event gives the severity and threshold it fired with (alert_events_series index).
    query = (
        "SELECT s.rule || '/' || d.uid AS alert, s.rule, d.uid AS device, COALESCE(m.name, '*') AS metric,"
        " s.status, e.severity, s.last_value AS value, e.threshold, s.episode_start AS since,"
        " s.last_time AS event_time, s.updated_at,"
        " a.acked_by, a.acked_at, a.comment AS ack_comment, h.silenced_by"
        " FROM alert_state s " + _SERIES.format(t="s") +
        # The ack and the hold of the current episode only (ingest.alerts.silence).
        " LEFT JOIN alert_acks a ON a.rule = s.rule AND a.device_id = s.device_id AND a.metric_id = s.metric_id"
        " AND a.episode_start = s.episode_start AND s.status = 'firing'"
        " LEFT JOIN alert_held h ON h.rule = s.rule AND h.device_id = s.device_id AND h.metric_id = s.metric_id"
        " AND h.starts_at = s.episode_start AND s.status = 'firing'" +
        " LEFT JOIN LATERAL (SELECT severity, threshold FROM alert_events x WHERE x.rule = s.rule"
        " AND x.device_id = s.device_id AND x.metric_id = s.metric_id ORDER BY x.id DESC LIMIT 1) e ON true"
        " WHERE " + " AND ".join(where) +
        " ORDER BY s.status = 'firing' DESC, s.status = 'pending' DESC, s.episode_start, s.rule, d.uid, metric"
        " LIMIT %(limit)s"
    )
    columns = [("alert", "alert"), ("metric", "metric"), ("status", "status"),
               ("severity", "severity"), ("value", "value"), ("threshold", "threshold"), ("since", "since"),
               ("last reading", "event_time"), ("acked by", "acked_by"), ("acked", "acked_at"),
               ("ack comment", "ack_comment"), ("held by silence", "silenced_by")]
    return query, params, columns


def _history_query(args: argparse.Namespace) -> Query:
    where: list[str] = []
    params: dict[str, Any] = {"limit": args.limit}
    if args.rule:
        where.append("e.rule = %(rule)s")
        params["rule"] = args.rule
    if args.device:
        where.append("d.uid LIKE %(device)s")
        params["device"] = like(args.device)
    if args.since:
        where.append("e.event_time >= %(since)s")
        params["since"] = args.since
    query = (
        "SELECT e.id, e.event_time, e.rule, d.uid AS device, COALESCE(m.name, '*') AS metric, e.status,"
        " e.severity, e.value, e.threshold, e.starts_at, e.notified, e.silenced_by, e.released_at, e.created_at"
        " FROM alert_events e " + _SERIES.format(t="e") +
        (" WHERE " + " AND ".join(where) if where else "") +
        " ORDER BY e.id DESC LIMIT %(limit)s"
    )
    columns = [("event", "id"), ("event time", "event_time"), ("rule", "rule"), ("device", "device"),
               ("metric", "metric"), ("status", "status"), ("severity", "severity"), ("value", "value"),
               ("threshold", "threshold"), ("episode start", "starts_at"), ("notified", "notified"),
               ("silenced by", "silenced_by"), ("released", "released_at"), ("recorded", "created_at")]
    return query, params, columns


def _deliveries_query(args: argparse.Namespace) -> Query:
    statuses = [s for s, on in (("failed", args.failed), ("pending", args.pending)) if on] or [
        "pending", "delivered", "failed"]
    where = ["o.status = ANY(%(statuses)s)"]
    params: dict[str, Any] = {"statuses": statuses, "limit": args.limit}
    if args.webhook:
        where.append("o.webhook = %(webhook)s")
        params["webhook"] = args.webhook
    query = (
        "SELECT o.id, o.webhook, o.status, o.attempts, o.last_status, o.last_error, e.rule, d.uid AS device,"
        " COALESCE(m.name, '*') AS metric, e.status AS event, o.created_at, o.delivered_at,"
        " CASE WHEN o.status = 'pending' THEN o.next_attempt_at END AS next_attempt_at"
        " FROM alert_outbox o JOIN alert_events e ON e.id = o.event_id " + _SERIES.format(t="e") +
        " WHERE " + " AND ".join(where) +
        " ORDER BY o.id DESC LIMIT %(limit)s"
    )
    columns = [("id", "id"), ("webhook", "webhook"), ("status", "status"), ("attempts", "attempts"),
               ("last status", "last_status"), ("last error", "last_error"), ("rule", "rule"),
               ("device", "device"), ("metric", "metric"), ("event", "event"), ("created", "created_at"),
               ("delivered", "delivered_at"), ("next attempt", "next_attempt_at")]
    return query, params, columns
