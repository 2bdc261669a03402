"""Issue #16, must show: three workers on a shared subscription, over five seeded interleavings that
include a series split across the workers and out-of-order delivery, record exactly the events one
worker records, and deliver each of them to the webhook once.

Four real services at once, started once for the whole test: three workers in one shared group
(``[mqtt] shared_group``) under topic prefix A on database A, and one reference worker, alone, under
prefix B on a database of its own (on a shared database every worker's evaluator would judge every
series, and the reference would not be one worker). Same rules, one kind each, and one webhook each,
to one real HTTP receiver answering 200 (paths /a and /b).

Per seed, the same script (three devices, the ids unique to the seed) is published to both prefixes
in the same order: the 20 steps of event time (0.1 s, 0.3 s, ... 3.9 s after the seed's base, a whole
second), one gateway message per step holding the readings of every device at that step, shuffled by
``random.Random(seed)`` so that each message moves at most DISPLACEMENT - 1 places from its place in
event-time order. Each message is published LEAD seconds before the event time of the place it was
shuffled to, so the messages of a series reach the service while the watermark (the clock minus
alerts.lateness) passes the earlier ones: batches that store readings of a series run while other
workers' evaluators judge it. A message arrives at most (DISPLACEMENT - 1) x 0.2 s = 0.6 s behind its
place, well inside LEAD + lateness: no reading may be late, and the test checks that none was
(``sensor_ingest_alert_readings_late_total`` = 0), so that a machine too slow for the premise fails
with that said rather than as a difference of events.

Every phase-1 message holds a reading of d1's four series, and the shared subscription spreads the
messages over the three workers, so a check that each worker received some of a seed's messages is
a check that d1's series were split across all three.

d3's heartbeat stops at 0.9 s; its no_data rule (2 s) is judged by the no-data job, on the real
clock. The beat that ends the silence (at RESUME_MS) is published only once both sides recorded the
firing, so that the firing does not depend on timing: a reading that arrives before the job judged
a silence means there was none.

At the end both databases are quiet (no series waits to be judged, every no_data series fires for
its final silence), and per seed: the events of B equal a small set computed by hand (EXPECTED),
those of A equal those of B, as lists (a duplicate event counts), and every event of each side was
delivered once: one request per outbox row, unique webhook-ids, each event's id in exactly one body, and the
bodies say what the rows say.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.harness import IngestProcess, Publisher, write_config
from tests.services import Mosquitto, Postgres, wait_until
from tests.webhook_receiver import Delivery, WebhookReceiver

SEEDS = (1, 2, 3, 4, 5)
LATENESS = 2.0  # [alerts] lateness, seconds (written out: the shuffle of the script below needs it)
LEAD = 1.0  # seconds: a message is published this long before the event time of its place
STEPS = 20  # messages per seed and prefix: step k at 0.1 + 0.2 k seconds after the base
STEP_MS = 200
DISPLACEMENT = 4  # the shuffle's bound: a message moves fewer than this many places
RESUME_MS = 5900  # d3's beat after its silence (phase 2)
WORKERS = 3
WAIT = 60.0  # only bounds a hang
SECRET_ENV = "SENSOR_INGEST_WEBHOOK_OPS_SECRET"
RECEIVED = "sensor_ingest_messages_received_total"
LATE = "sensor_ingest_alert_readings_late_total"

RULES = """
[[rules]]
name = "level-high"
metric = "level"
above = 5.0
clear = 4.0
for = "500ms"
webhooks = ["ops"]

[[rules]]
name = "flow-rising"
metric = "flow"
rate = { over = "1.9s", above = 30.0 }
webhooks = ["ops"]

[[rules]]
name = "noise-rolling"
metric = "noise"
window = { agg = "avg", over = "1.1s", align = "rolling" }
above = 65.0
clear = 60.0
webhooks = ["ops"]

[[rules]]
name = "pm25-clock"
metric = "pm25"
window = { agg = "avg", over = "1s", align = "clock" }
above = 55.5
clear = 50.0
webhooks = ["ops"]

[[rules]]
name = "beat-silent"
metric = "beat"
no_data = "2s"
webhooks = ["ops"]
"""

# The spans (1.9 s, 1.1 s) are not multiples of the 0.2 s step and the readings sit 0.1 s off the
# whole seconds, so that no reading lies on the edge of a rate span or a window: each event below
# does not depend on whether an edge is open or closed.
Row = tuple[str, str, str, float]  # (rule, device, status, seconds after the seed's base)
EXPECTED: list[Row] = sorted([
    # level-high (above 5, for 0.5 s, clear 4): d1 is 6 from 1.1 s, pending then, firing at 1.7 s
    # (held 0.6 s; at 1.5 s only 0.4 s); 4.5 at 2.3 s is not back at clear, 3 at 2.5 s is. d2's 6 at
    # 1.1-1.3 s is gone at 1.5 s, held 0.2 s: pending only, no event.
    ("level-high", "d1", "firing", 1.7), ("level-high", "d1", "resolved", 2.5),
    # flow-rising (rate over 1.9 s above 30/min): d1 steps 10 -> 12 at 1.5 s; against the oldest
    # reading in [t - 1.9 s, t), 0.1 s at 10: +2 in 1.4 s = 85.7/min, firing at 1.5 s. Up to 3.1 s the
    # reference is a 10 (1.3 s: 66.7/min); at 3.3 s it is 1.5 s, a 12: 0/min, resolved. d2 rises
    # 0.05 a step, 15/min: never.
    ("flow-rising", "d1", "firing", 1.5), ("flow-rising", "d1", "resolved", 3.3),
    # noise-rolling (avg over (t - 1.1 s, t], six readings, above 65, clear 60): d1 is 90 at 2.1-2.7 s,
    # 50 else: the mean is 56.7, 63.3 at 2.1, 2.3 s, then 70 at 2.5 s: firing; 76.7 to 3.1 s, 70 at
    # 3.3 s, 63.3 at 3.5 s (above clear), 56.7 at 3.7 s: resolved. d2's one 90 at 2.1 s: 56.7 at most.
    ("noise-rolling", "d1", "firing", 2.5), ("noise-rolling", "d1", "resolved", 3.7),
    # pm25-clock (avg of each whole second, above 55.5, clear 50), judged at each window's end: d1's
    # seconds average 40, 70 (firing at 2 s), 55 (not above, not cleared), 30 (resolved at 4 s). d2 is
    # 40 with one 90 a second: 50 every window, though one reading in five is above 55.5.
    ("pm25-clock", "d1", "firing", 2.0), ("pm25-clock", "d1", "resolved", 4.0),
    # beat-silent (no_data 2 s): d3 beats at 0.1, 0.5 and 0.9 s (gaps of 0.4 s), then is silent: firing
    # at 2.9 s, the last beat + 2 s; the beat at 5.9 s (phase 2) resolves it, and the silence after it
    # fires at 7.9 s.
    ("beat-silent", "d3", "firing", 2.9), ("beat-silent", "d3", "resolved", 5.9),
    ("beat-silent", "d3", "firing", 7.9),
])


def values(k: int) -> dict[str, dict[str, float]]:
    """The script: device -> metric -> value at step k (0.1 + 0.2 k s after the base)."""
    window = k // 5  # the whole second [window, window + 1) holding step k
    d1 = {
        "level": 6.0 if 5 <= k <= 10 else 4.5 if k == 11 else 3.0 if k == 12 else 1.0,
        "flow": 10.0 if k <= 6 else 12.0,
        "noise": 90.0 if 10 <= k <= 13 else 50.0,
        "pm25": (40.0, 70.0, 55.0, 30.0)[window],
    }
    d2 = {
        "level": 6.0 if k in (5, 6) else 1.0,
        "flow": 10.0 + 0.05 * k,
        "noise": 90.0 if k == 10 else 50.0,
        "pm25": 90.0 if k % 5 == 2 else 40.0,
    }
    out = {"d1": d1, "d2": d2}
    if k in (0, 2, 4):
        out["d3"] = {"beat": 1.0}
    return out


def device(seed: int, name: str) -> str:
    return f"hn-s{seed}-{name}"


def at(base: datetime, ms: int) -> datetime:
    return base + timedelta(milliseconds=ms)


def step_message(seed: int, base: datetime, k: int) -> bytes:
    t = at(base, 100 + STEP_MS * k).isoformat()
    return json.dumps([{"device": device(seed, d), "time": t, "readings": r} for d, r in values(k).items()]).encode()


def resume_message(seed: int, base: datetime) -> bytes:
    t = at(base, RESUME_MS).isoformat()
    return json.dumps([{"device": device(seed, "d3"), "time": t, "readings": {"beat": 1.0}}]).encode()


def shuffled(seed: int) -> list[int]:
    """The steps in a seeded order where each moves fewer than DISPLACEMENT places: step k sorts by a
    key in [k, k + DISPLACEMENT), so a step more than DISPLACEMENT - 1 behind k always comes first."""
    rng = random.Random(seed)
    keys = [k + rng.uniform(0, DISPLACEMENT) for k in range(STEPS)]
    return sorted(range(STEPS), key=keys.__getitem__)


# --- the database -------------------------------------------------------------------------------------


def events(db: str) -> list[tuple[int, str, str, str, datetime, bool]]:
    """alert_events: (id, rule, device uid, status, event_time, notified), by id."""
    with psycopg.connect(db) as c:
        rows = c.execute(
            "SELECT e.id, e.rule, d.uid, e.status, e.event_time, e.notified"
            " FROM alert_events e JOIN devices d ON d.id = e.device_id ORDER BY e.id").fetchall()
    return [(int(i), str(r), str(u), str(s), t, bool(n)) for i, r, u, s, t, n in rows]


def outbox(db: str) -> list[tuple[int, int, str, str]]:
    """alert_outbox: (id, event_id, webhook, status)."""
    with psycopg.connect(db) as c:
        rows = c.execute("SELECT id, event_id, webhook, status FROM alert_outbox ORDER BY id").fetchall()
    return [(int(i), int(e), str(w), str(s)) for i, e, w, s in rows]


def scalar(db: str, sql: str) -> int:
    with psycopg.connect(db) as c:
        row = c.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def fired(db: str, uid: str) -> bool:
    with psycopg.connect(db) as c:
        row = c.execute("SELECT count(*) FROM alert_events e JOIN devices d ON d.id = e.device_id"
                        " WHERE e.rule = 'beat-silent' AND e.status = 'firing' AND d.uid = %s", (uid,)).fetchone()
    return row is not None and row[0] > 0


def quiet(db: str) -> bool:
    """Nothing left to judge: no series waits for the watermark, and every no_data series fires (for
    its final silence, the last thing of the script in event time), so that no further event can come.
    (Not a count of events: too few must show as a difference, not as a wait that times out.)"""
    return (scalar(db, "SELECT count(*) FROM alert_state WHERE due_at IS NOT NULL") == 0
            and scalar(db, "SELECT count(*) FROM alert_state WHERE rule = 'beat-silent' AND status <> 'firing'") == 0)


def delivered(db: str) -> bool:
    rows = outbox(db)
    notified = sum(1 for e in events(db) if e[5])
    return len(rows) == notified and all(r[3] == "delivered" for r in rows)


def by_seed(rows: list[tuple[int, str, str, str, datetime, bool]], bases: dict[int, datetime]) -> dict[int, list[Row]]:
    """Per seed, the sorted (rule, device, status, seconds after the seed's base) of the events."""
    out: dict[int, list[Row]] = {seed: [] for seed in bases}
    for _, rule, uid, status, t, _ in rows:
        _, s, name = uid.split("-")
        seed = int(s.removeprefix("s"))
        out[seed].append((rule, name, status, round((t - bases[seed]).total_seconds(), 3)))
    return {seed: sorted(v) for seed, v in out.items()}


def differences(got: dict[int, list[Row]], want: dict[int, list[Row]]) -> dict[int, dict[str, list[Row]]]:
    """Per seed that differs, the events missing from ``got`` and the extra ones (duplicates count)."""
    out: dict[int, dict[str, list[Row]]] = {}
    for seed in sorted(set(got) | set(want)):
        g, w = Counter(got.get(seed, [])), Counter(want.get(seed, []))
        missing, extra = sorted((w - g).elements()), sorted((g - w).elements())
        if missing or extra:
            out[seed] = {"missing": missing, "extra": extra}
    return out


# --- the services -------------------------------------------------------------------------------------


@pytest.fixture
def reference_database_url(pg: Postgres, migrated_template: str) -> Iterator[str]:
    """Database B, of the reference worker alone."""
    name = pg.create_database(migrated_template)
    yield pg.url(name)
    pg.drop_database(name)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver().up()
    yield r
    r.close()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def alerts_config(url: str) -> str:
    return f"""
[alerts]
lateness = "{LATENESS:g}s"
no_data_grace = "0s"

[[webhooks]]
name = "ops"
url = "{url}"
secret_env = "{SECRET_ENV}"
timeout = 2.0
{RULES}
"""


@dataclass
class Side:
    """One side of the comparison: its prefix, database, webhook path and workers."""

    prefix: str
    db: str
    path: str
    workers: list[IngestProcess] = field(default_factory=list)

    def received(self) -> list[float]:
        return [w.metric(RECEIVED) for w in self.workers]

    def deliveries(self, receiver: WebhookReceiver) -> list[Delivery]:
        return [d for d in receiver.requests() if d.path == self.path]


def play(seed: int, pub: Publisher, a: Side, b: Side) -> tuple[datetime, list[float]]:
    """Publish one seed's script to both sides; its base, and how many of its phase-1 messages each
    A worker received."""
    order = shuffled(seed)
    assert order != sorted(order), f"seed {seed} delivers in order; pick another seed"
    base = datetime.fromtimestamp(math.ceil(time.time() + LEAD + 0.2), UTC)  # a whole second: clock windows
    before_a, before_b = a.received(), sum(b.received())
    for place, k in enumerate(order):
        # Paced by the event time of the place, not of the message: that is the out-of-order delivery.
        time.sleep(max(0.0, at(base, 100 + STEP_MS * place).timestamp() - LEAD - time.time()))
        payload = step_message(seed, base, k)
        pub.publish_all([(f"{a.prefix}/gw/g1", payload), (f"{b.prefix}/gw/g1", payload)])
    wait_until(lambda: sum(a.received()) - sum(before_a) == STEPS, WAIT, f"seed {seed}: A's messages received")
    share = [x - y for x, y in zip(a.received(), before_a, strict=True)]
    wait_until(lambda: sum(b.received()) - before_b == STEPS, WAIT, f"seed {seed}: B's messages received")

    # Phase 2: the beat that ends d3's silence, once both sides have judged the silence.
    d3 = device(seed, "d3")
    wait_until(lambda: fired(a.db, d3) and fired(b.db, d3), WAIT, f"seed {seed}: the no_data firing of {d3}")
    time.sleep(max(0.0, at(base, RESUME_MS).timestamp() - LEAD - time.time()))
    before_a, before_b = a.received(), sum(b.received())
    payload = resume_message(seed, base)
    pub.publish_all([(f"{a.prefix}/gw/g1", payload), (f"{b.prefix}/gw/g1", payload)])
    wait_until(lambda: sum(a.received()) - sum(before_a) == 1 and sum(b.received()) - before_b == 1, WAIT,
               f"seed {seed}: the resuming beat received")
    return base, share


def test_three_workers_record_and_deliver_what_one_worker_does(
    tmp_path: Path, database_url: str, reference_database_url: str, broker: Mosquitto, topic_prefix: str,
    receiver: WebhookReceiver, ingests: list[IngestProcess],
) -> None:
    secret = new_secret()
    a = Side(topic_prefix + "a", database_url, "/a")
    b = Side(topic_prefix + "b", reference_database_url, "/b")
    for side, count, group in ((a, WORKERS, f'shared_group = "{topic_prefix}"'), (b, 1, "")):
        for i in range(count):
            name = f"{side.path[1:]}{i}"
            cfg = write_config(tmp_path / f"{name}.toml", prefix=side.prefix, database_url=side.db,
                               mqtt_url=broker.url, mqtt_extra=group, extra=alerts_config(receiver.url(side.path)))
            side.workers.append(IngestProcess(cfg, tmp_path / f"{name}.log", env={SECRET_ENV: secret}))
    everyone = a.workers + b.workers
    ingests.extend(everyone)
    for w in everyone:
        w.start(wait=False)
    wait_until(lambda: all([w.ready() for w in everyone]), WAIT, "the four workers to be ready")

    pub = Publisher(broker.port)
    bases: dict[int, datetime] = {}
    shares: dict[int, list[float]] = {}  # seed -> how many of its phase-1 messages each A worker received
    try:
        for seed in SEEDS:
            bases[seed], shares[seed] = play(seed, pub, a, b)
    finally:
        pub.close()
    for side in (a, b):
        wait_until(functools.partial(quiet, side.db), WAIT, f"{side.path}: every series judged, every silence fired")
        wait_until(functools.partial(delivered, side.db), WAIT, f"{side.path}: every notified event delivered")

    # The premise: no reading reached its series after the series was judged past it.
    late = [w.metric(LATE) for w in everyone]
    assert late == [0.0] * len(everyone), f"late readings (A workers, then B): {late}: a reading reached its " \
        f"series about LEAD + lateness ({LEAD + LATENESS:g}s) or more after it was published (the machine stalled?), " \
        "or was counted late without being late"
    # Every phase-1 message holds d1's readings: each A worker having some means d1's series were split
    # over all three; and each message went to one worker.
    assert {seed: all(n > 0 for n in s) for seed, s in shares.items()} == {seed: True for seed in SEEDS}, shares
    assert {seed: sum(s) for seed, s in shares.items()} == {seed: STEPS for seed in SEEDS}, shares

    # The events: the reference as computed by hand, and the three workers as the reference.
    a_events, b_events = events(a.db), events(b.db)
    one, three = by_seed(b_events, bases), by_seed(a_events, bases)
    assert differences(one, {seed: EXPECTED for seed in SEEDS}) == {}, "one worker (B) against EXPECTED"
    assert differences(three, one) == {}, "three workers (A) against one (B)"
    assert all(e[5] for e in a_events + b_events), "every event is young enough to be notified"

    # No duplicate delivery: one request per outbox row (one per event and webhook), each a 200.
    for side, rows in ((a, a_events), (b, b_events)):
        got = side.deliveries(receiver)
        box = outbox(side.db)
        assert sorted(d.webhook_id for d in got) == sorted(f"msg_{o[0]}" for o in box), side.path
        assert sorted(o[1] for o in box) == sorted(e[0] for e in rows), side.path  # one row per event
        assert all(d.status == 200 and d.verify(secret) == d.webhook_id for d in got), side.path
        bodies: list[dict[str, Any]] = [d.json() for d in got]
        said = sorted((b["id"], b["rule"], b["device"], b["status"], datetime.fromisoformat(b["event_time"]))
                      for b in bodies)
        assert said == sorted((f"evt_{i}", r, u, s, t) for i, r, u, s, t, _ in rows), side.path
