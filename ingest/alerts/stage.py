"""The writer's alert stage, inside the batch's transaction (ingest.store.writer).

Given the readings that are new in this transaction (a redelivered duplicate is not new), for each
series (rule, device, metric) a rule selects: its alert_state row is created if missing and locked,
all in one sorted order (so that workers writing the same series wait for each other, never
deadlock); the pure evaluation (ingest.alerts.evaluate) runs on the new readings in event-time
order; the state, the events and, for the events young enough to notify, one outbox row per webhook
(and one for MQTT, webhook "mqtt:alerts", when alerts.mqtt is on) are written, except for the
events an active silence holds back (ingest.alerts.silence decides, one query for the batch:
recorded with silenced_by, their rows kept in alert_held); ``NOTIFY sensor_ingest_outbox`` wakes
the dispatcher when the transaction commits. A crash before the commit loses none of it and repeats
none of it: it is all rolled back with the readings, and the redelivered messages evaluate again.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ingest.alerts.body import Annotations, StandardBody, alertmanager_body
from ingest.alerts.evaluate import Event, State, evaluate
from ingest.alerts.model import Rule
from ingest.alerts.mqtt_channel import CHANNEL_NAME as MQTT_CHANNEL
from ingest.alerts.runtime import AlertRuntime
from ingest.alerts.silence import Candidate, event_labels, judge
from ingest.model import Reading

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["NOTIFY_CHANNEL", "AlertStage", "NewReading", "StageResult"]

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "sensor_ingest_outbox"
_ENSURE = """
INSERT INTO alert_state (rule, device_id, metric_id, status)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::text[]) ORDER BY 1, 2, 3
ON CONFLICT DO NOTHING
"""
_LOCK = """
SELECT s.rule, s.device_id, s.metric_id, s.status, s.episode_start, s.last_time, s.last_value
FROM alert_state s JOIN unnest($1::text[], $2::int[], $3::int[]) AS k(r, d, m)
  ON s.rule = k.r AND s.device_id = k.d AND s.metric_id = k.m
ORDER BY s.rule, s.device_id, s.metric_id
FOR UPDATE OF s
"""
_SAVE = """
UPDATE alert_state AS s SET status = t.status, episode_start = t.start, last_time = t.last_time,
    last_value = t.last_value, updated_at = now()
FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::timestamptz[], $6::timestamptz[], $7::float8[])
    AS t(rule, device_id, metric_id, status, start, last_time, last_value)
WHERE s.rule = t.rule AND s.device_id = t.device_id AND s.metric_id = t.metric_id
"""
_EVENTS = """
INSERT INTO alert_events (rule, device_id, metric_id, status, event_time, starts_at, value, threshold, severity,
                          notified, silenced_by)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                     $7::float8[], $8::float8[], $9::text[], $10::bool[], $11::bigint[])
RETURNING id, rule, device_id, metric_id, status, event_time
"""
_OUTBOX = """
INSERT INTO alert_outbox (event_id, webhook, series, body)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::jsonb[])
"""
_DEVICES = "SELECT id, uid, attributes FROM devices WHERE id = ANY($1::int[])"
_METRICS = "SELECT id, name, unit FROM metrics WHERE id = ANY($1::int[])"


@dataclass(frozen=True, slots=True)
class NewReading:
    reading: Reading
    device_id: int
    metric_id: int


class StageResult:
    __slots__ = ("events", "late", "notified", "outbox", "silenced")

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()  # (rule, status)
        self.notified = 0
        self.outbox = 0
        self.silenced = 0  # events held back by a silence (ingest.alerts.silence): recorded, not notified
        self.late = 0  # readings older than their series' last evaluated time: not evaluated


def series_key(rule: str, device_id: int, metric_id: int) -> str:
    return f"{rule}\x1f{device_id}\x1f{metric_id}"


def _summary(rule: Rule, fields: dict[str, Any]) -> str:
    try:
        return rule.summary.format_map(fields) if rule.summary else f"{rule.name}: {fields['device']} " \
            f"{fields['metric']} is {fields['value']} (threshold {fields['threshold']})"
    except (KeyError, ValueError, IndexError):  # validated at load; a last guard, never a failed batch
        return rule.summary


class AlertStage:
    def __init__(self, runtime: AlertRuntime, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.runtime = runtime
        self._clock = clock

    def wants(self, metric: str) -> bool:
        return bool(self.runtime.rules_for(metric))

    async def run(self, conn: PoolConnectionProxy[asyncpg.Record] | asyncpg.Connection[asyncpg.Record],
                  new: Sequence[NewReading]) -> StageResult:
        result = StageResult()
        # One rule set for the whole batch: a reload during an await below must not pair the new set's
        # rules with the old set's webhooks (an event notified with no outbox row).
        active = self.runtime.active
        rules_for = functools.cache(active.for_metric)
        candidates = [n for n in new if not isinstance(n.reading.value, str) and rules_for(n.reading.metric)]
        if not candidates:
            return result
        devices = {i: (uid, _attrs(a)) for i, uid, a in
                   await conn.fetch(_DEVICES, sorted({n.device_id for n in candidates}))}
        series: dict[tuple[str, int, int], list[tuple[datetime, float]]] = {}
        rules: dict[str, Rule] = {}
        for n in candidates:
            uid, attrs = devices.get(n.device_id, (n.reading.device, {}))
            for rule in rules_for(n.reading.metric):
                if rule.selects(uid, attrs):
                    rules[rule.name] = rule
                    series.setdefault((rule.name, n.device_id, n.metric_id), []).append(
                        (n.reading.time, float(n.reading.value)))
        if not series:
            return result
        keys = sorted(series)
        cols = [list(c) for c in zip(*keys, strict=True)]
        await conn.execute(_ENSURE, *cols, ["ok"] * len(keys))
        states = {(r, d, m): State(status, start, last_t, last_v) for r, d, m, status, start, last_t, last_v in
                  await conn.fetch(_LOCK, *cols)}
        saved: list[tuple[str, int, int, str, datetime | None, datetime | None, float | None]] = []
        fired: list[tuple[tuple[str, int, int], Event]] = []
        for key in keys:
            state, events, late = evaluate(rules[key[0]], states.get(key, State()), series[key])
            result.late += late
            saved.append((*key, state.status, state.episode_start, state.last_time, state.last_value))
            fired += [(key, e) for e in events]
        await conn.execute(_SAVE, *[list(c) for c in zip(*saved, strict=True)])
        if not fired:
            return result
        now = self._clock()
        horizon = now - timedelta(seconds=active.max_notify_age)
        holds = await judge(conn, now, [Candidate(k, e.status, e.starts_at, e.event_time >= horizon, functools.partial(
            event_labels, rules[k[0]], *devices.get(k[1], (str(k[1]), {})))) for k, e in fired])
        rows = [(k[0], k[1], k[2], e.status, e.event_time, e.starts_at, e.value, e.threshold, rules[k[0]].severity,
                 e.event_time >= horizon and by is None, by) for (k, e), by in zip(fired, holds.by, strict=True)]
        ids = {(r, d, m, s, t): i for i, r, d, m, s, t in
               await conn.fetch(_EVENTS, *[list(c) for c in zip(*rows, strict=True)])}
        event_ids = [ids[(k[0], k[1], k[2], e.status, e.event_time)] for k, e in fired]
        held = holds.held_events(event_ids)
        units = {i: (name, unit) for i, name, unit in await conn.fetch(_METRICS, sorted({k[2] for k, _ in fired}))}
        outbox: list[tuple[int, str, str, str]] = []
        # The rows of events a silence holds never go to the outbox here, even when the same batch ends
        # their episode: those of a firing still held at the end of the batch wait in alert_held.
        held_rows: list[tuple[int, str, str, str]] = []
        for (key, e), row in zip(fired, rows, strict=True):
            rule = rules[key[0]]
            result.events[(rule.name, e.status)] += 1
            if row[-1] is not None:  # held back by a silence: a firing event's rows wait in alert_held
                result.silenced += 1
                if e.status == "resolved":
                    continue  # the end of an episode whose firing was never sent: nothing to send
            elif not row[-2]:
                log.info("alert %s on device %s: %s event at %s is older than alerts.max_notify_age; recorded, "
                         "not notified", rule.name, devices.get(key[1], ("?",))[0], e.status, e.event_time.isoformat())
                continue
            else:
                result.notified += 1
            event_id = ids[(key[0], key[1], key[2], e.status, e.event_time)]
            uid, attrs = devices.get(key[1], (str(key[1]), {}))
            metric, unit = units.get(key[2], (str(key[2]), None))
            fields = {"device": uid, "metric": metric, "value": e.value, "threshold": e.threshold, "rule": rule.name,
                      "severity": rule.severity, "unit": unit or ""}
            event = StandardBody(
                id=f"evt_{event_id}", status=e.status, rule=rule.name, severity=rule.severity, device=uid,
                metric=metric, value=e.value, unit=unit, threshold=e.threshold, starts_at=e.starts_at,
                ends_at=e.event_time if e.status == "resolved" else None, event_time=e.event_time,
                labels=dict(rule.labels), annotations=Annotations(summary=_summary(rule, fields)),
                device_attributes=attrs,
            )
            standard: str | None = None  # rendered once, for the first standard webhook that needs it
            target = held_rows if row[-1] is not None else outbox
            for hook in rule.webhooks:
                webhook = active.webhooks.get(hook)
                if webhook is None:
                    continue
                if webhook.body == "alertmanager":  # per webhook: its name is the payload's receiver
                    body = alertmanager_body(event, webhook.name, webhook.external_url).model_dump_json()
                else:
                    body = standard = standard or event.model_dump_json()
                target.append((event_id, hook, series_key(*key), body))
            if active.mqtt:  # also over MQTT (ingest.alerts.mqtt_channel); held and released like the others
                target.append((event_id, MQTT_CHANNEL, series_key(*key), standard or event.model_dump_json()))
        await holds.save(conn, event_ids, [o for o in held_rows if o[0] in held])
        if outbox:
            await conn.execute(_OUTBOX, *[list(c) for c in zip(*outbox, strict=True)])
            await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
            result.outbox = len(outbox)
        return result


def _attrs(raw: object) -> dict[str, Any]:
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return raw if isinstance(raw, dict) else {}
