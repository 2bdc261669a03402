"""Quarantine and replay on the real services (issue #15): `sensor-ingest rejected`, `rejected show`, `replay`.

The main case is a real rejection: the service stores a city's JSON source whose firmware sends
Fahrenheit while the mapping says nothing of units, so the catalog refuses the temperatures
(out_of_range); the mapping is fixed (unit = "F"), `replay -c fixed.toml` stores them, and what it
stores is compared with what the service running the fixed config stores for the same payloads on
another device id. The other cases seed rejected_messages directly (the rows are the contract) and
replay in-process (ingest.replay.Replayer) or as a process, interrupted in every way.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest.cli import main
from ingest.model import FLAG_RECEIVE_TIME, FLAG_SUSPECT
from ingest.process import Processor
from ingest.quarantine import Filters, hexdump
from ingest.replay import Replayer, ReplayTally, open_pool
from ingest.settings import Settings, load_settings
from tests.integration.harness import IngestProcess, Publisher, native, write_config
from tests.services import REPO, Mosquitto, until, wait_until

pytestmark = pytest.mark.integration

Reading = tuple[str, str, datetime, float, int]  # (device, metric, time, value, flags)
T0 = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)


# -- helpers ----------------------------------------------------------------------------------------------


def readings(url: str, device: str | None = None) -> set[Reading]:
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT d.uid, m.name, r.time, r.value, r.flags FROM readings r JOIN devices d ON d.id = r.device_id"
            " JOIN metrics m ON m.id = r.metric_id WHERE %s::text IS NULL OR d.uid = %s", [device, device]).fetchall()
    return {(str(u), str(n), t, float(v), int(f)) for u, n, t, v, f in rows}


def reading_count(url: str) -> int:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT count(*) FROM readings").fetchone()
    assert row is not None
    return int(row[0])


def rejected(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url) as c:
        cur = c.execute("SELECT id, received_at, source, topic, payload, reason, detail, device_uid, details,"
                        " replayed_at, replay_reason, replay_detail FROM rejected_messages ORDER BY id")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def marked(url: str) -> set[int]:
    with psycopg.connect(url) as c:
        return {int(i) for (i,) in c.execute("SELECT id FROM rejected_messages WHERE replayed_at IS NOT NULL")}


def seed(url: str, rows: Iterable[tuple[datetime, str | None, str, bytes, str, str, str | None]]) -> list[int]:
    """Insert rejection rows (received_at, source, topic, payload, reason, detail, device); their ids."""
    rows = list(rows)
    with psycopg.connect(url) as c:
        # Inserted in the given order, so that the ids (ascending) are in that order too.
        ids = c.execute(
            "INSERT INTO rejected_messages (received_at, source, topic, payload, reason, detail, device_uid)"
            " SELECT a, b, c, d, e, f, g FROM unnest(%s::timestamptz[], %s::text[], %s::text[], %s::bytea[],"
            " %s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS u(a, b, c, d, e, f, g, n) ORDER BY n"
            " RETURNING id",
            [list(col) for col in zip(*rows, strict=True)]).fetchall()
    return sorted(int(i) for (i,) in ids)


def fleet_rows(prefix: str, n: int) -> tuple[list[tuple[datetime, None, str, bytes, str, str, None]],
                                             list[set[Reading]]]:
    """n native messages of 20 devices, kept as no_source rows (received before their source was
    configured), one second apart in received_at; and the readings each must store."""
    rows, expected = [], []
    for i in range(n):
        device, t = f"hn-rp-{i % 20:02d}", T0 + timedelta(seconds=i)
        pm25, temp = (i % 300) / 10, 20.0 + i % 10
        topic = f"{prefix}/{device}/up"
        rows.append((t + timedelta(seconds=1), None, topic, native(device, t.isoformat(), {"pm25": pm25,
                     "temperature": temp}), "no_source", f"no source's topic template matches {topic!r}", None))
        expected.append({(device, "pm25", t, pm25, 0), (device, "temperature", t, temp, 0)})
    return rows, expected


def config(tmp_path: Path, url: str, prefix: str, name: str = "replay.toml", extra: str = "") -> Path:
    return write_config(tmp_path / name, prefix=prefix, database_url=url, mqtt_url="mqtt://127.0.0.1:1883",
                        extra=extra)


async def replay(settings: Settings, filters: Filters | None = None, batch: int = 500, dry: bool = False,
                 **hooks: Any) -> ReplayTally:
    """What `sensor-ingest replay` does, in-process."""
    pool = await open_pool(settings)
    try:
        r = Replayer(pool, Processor.from_settings(settings), settings, filters or Filters(), batch=batch)
        await r.count()
        await r.bind_units(write=not dry)
        tally = await (r.dry_run(**hooks) if dry else r.run(**hooks))
    except BaseException:
        pool.terminate()  # as the command does: a connection may be stuck in a cancelled statement
        raise
    await pool.close()
    return tally


def cli(cfg: Path, *argv: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSOR_INGEST_")}
    return subprocess.Popen([sys.executable, "-m", "ingest", *argv, "-c", str(cfg)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_cli(cfg: Path, *argv: str) -> tuple[int, str, str]:
    proc = cli(cfg, *argv)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def replay_sessions(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sensor-ingest-replay'"
                        " AND datname = current_database()").fetchone()
    assert row is not None
    return int(row[0])


def rounded(rs: set[Reading]) -> set[Reading]:
    """Converted values (Fahrenheit to degC) compared to the micro-degree."""
    return {(d, m, t, round(v, 6), f) for d, m, t, v, f in rs}


def by_payload(url: str, messages: dict[str, tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    """The rejection rows of ``messages``, by message name."""
    names = {payload: name for name, (_, payload) in messages.items()}
    return {names[bytes(r["payload"])]: r for r in rejected(url) if bytes(r["payload"]) in names
            and r["topic"] == messages[names[bytes(r["payload"])]][0]}


def waiting_on(url: str, application: str) -> bool:
    """A session of ``application`` waits on a lock. (Asked on a connection of its own: a transaction
    sees pg_stat_activity as of its first look.)"""
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND application_name = %s", [application]).fetchone()
    return bool(row and row[0])


def union(sets: Iterable[set[Reading]]) -> set[Reading]:
    out: set[Reading] = set()
    for s in sets:
        out |= s
    return out


# -- a real rejection, fixed, replayed: what live ingest stores -------------------------------------------

CITY = """
[[sources]]
name = "city"
topic = "{p}/city/{{device}}"
format = "json"
time_field = "ts"
time_policy = "device_or_receive"
{fix}
[[sources]]
name = "cityraw"
topic = "{p}/cityraw/{{device}}"
format = "json"
{fix}
"""
FIX = '[sources.metrics.temperature]\nunit = "F"  # the firmware reports Fahrenheit\n'


def city_messages(p: str, device: str) -> dict[str, tuple[str, bytes]]:
    t = [(T0 + timedelta(seconds=s)).isoformat() for s in range(3)]
    city, raw = f"{p}/city/{device}", f"{p}/cityraw/{device}"
    return {
        "partial": (city, json.dumps({"ts": t[0], "temperature": 86.0, "pm25": 12.5}).encode()),  # 30 degC
        "no_time": (raw, json.dumps({"temperature": 95.0}).encode()),  # 35 degC at the receive time
        "clock_1970": (city, json.dumps({"ts": 0, "temperature": 89.6}).encode()),  # device_or_receive: 32 degC
        "still_hot": (city, json.dumps({"ts": t[1], "temperature": 300.0, "pm25": 20.0}).encode()),  # 148.9 degC
        "malformed": (city, b'{"ts": '),
        "suspect": (city, json.dumps({"ts": t[2], "temperature": 125.6}).encode()),  # 52 degC: implausible
    }


def test_a_fixed_mapping_replays_to_what_live_ingest_stores(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, ingests: list[IngestProcess],
) -> None:
    p, url = topic_prefix, database_url
    broken = write_config(tmp_path / "broken.toml", prefix=p, database_url=url, mqtt_url=broker.url,
                          extra=CITY.format(p=p, fix=""))
    fixed = write_config(tmp_path / "fixed.toml", prefix=p, database_url=url, mqtt_url=broker.url,
                         extra=CITY.format(p=p, fix=FIX))
    messages = city_messages(p, "c1")

    # 1. The service with the broken mapping: every temperature is out_of_range (86 "degC" > 70).
    service = IngestProcess(broken, tmp_path / "broken.log")
    ingests.append(service)
    service.start()
    pub = Publisher(broker.port)
    try:
        pub.publish_all(messages.values())
        wait_until(lambda: len(rejected(url)) == 6, 60, "six rejection rows")
    finally:
        pub.close()
    assert service.terminate() == 0
    rows = by_payload(url, messages)
    assert {k: r["reason"] for k, r in rows.items()} == {
        "partial": "out_of_range", "no_time": "out_of_range", "clock_1970": "out_of_range",
        "still_hot": "out_of_range", "malformed": "malformed", "suspect": "out_of_range"}
    first = readings(url)
    assert first == {("c1", "pm25", T0, 12.5, 0), ("c1", "pm25", T0 + timedelta(seconds=1), 20.0, 0)}

    # 2. The mapping fixed, the rows replayed.
    code, out, err = run_cli(fixed, "replay", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary == {"dry_run": False, "matching": 6, "not_replayable": 0, "rows_replayed": 6, "batches": 1,
                       "readings_stored": 4, "duplicates": 2, "rows_stored": 4, "rows_skipped": {},
                       "rows_still_rejected": {"out_of_range": 1, "malformed": 1}, "rows_partly_stored": 1,
                       "interrupted": False}
    after = by_payload(url, messages)
    for key in ("partial", "no_time", "clock_1970", "suspect"):
        assert after[key]["replayed_at"] is not None, key
        assert (after[key]["replay_reason"], after[key]["replay_detail"]) == (None, None), key
    assert after["still_hot"]["replay_reason"] == "out_of_range"
    assert "148.889 degC (300 F)" in after["still_hot"]["replay_detail"]
    assert after["malformed"]["replay_reason"] == "malformed"
    assert after["malformed"]["replay_detail"] == after["malformed"]["detail"]
    replayed = readings(url, "c1")
    received = {k: r["received_at"] for k, r in rows.items()}
    assert rounded(replayed) == first | {
        ("c1", "temperature", T0, 30.0, 0),
        # No time in the payload, and a 1970 clock under device_or_receive: the row's received_at.
        ("c1", "temperature", received["no_time"], 35.0, FLAG_RECEIVE_TIME),
        ("c1", "temperature", received["clock_1970"], 32.0, FLAG_RECEIVE_TIME),
        ("c1", "temperature", T0 + timedelta(seconds=2), 52.0, FLAG_SUSPECT),
    }
    marks = [(r["id"], r["replayed_at"]) for r in rejected(url)]

    # 3. A second replay adds nothing.
    code, out, err = run_cli(fixed, "replay", "--json")
    assert code == 0, err
    assert json.loads(out)["rows_replayed"] == 0
    assert readings(url) == replayed
    assert [(r["id"], r["replayed_at"]) for r in rejected(url)] == marks

    # 4. Live ingest with the fixed mapping, the same payloads from device c1-live.
    live = IngestProcess(fixed, tmp_path / "fixed.log")
    ingests.append(live)
    live.start()
    pub = Publisher(broker.port)
    before = datetime.now(UTC)
    try:
        pub.publish_all((topic.replace("/c1", "/c1-live"), payload) for topic, payload in messages.values())
        wait_until(lambda: len(readings(url, "c1-live")) == 6 and len(rejected(url)) == 8, 60,
                   "the live readings and rejections")
    finally:
        pub.close()
    assert live.terminate() == 0
    after_live = datetime.now(UTC)
    live_rows = readings(url, "c1-live")

    def shape(rs: set[Reading]) -> set[tuple[str, Any, float, int]]:
        # A receive time differs between the two runs; everything else must be equal.
        return {(m, "receive time" if f & FLAG_RECEIVE_TIME else t, v, f) for _, m, t, v, f in rs}

    assert shape(live_rows) == shape(replayed)
    assert all(before <= t <= after_live for _, _, t, _, f in live_rows if f & FLAG_RECEIVE_TIME)
    live_rejections = {r["reason"]: r["detail"] for r in rejected(url)[6:]}
    assert live_rejections == {"out_of_range": after["still_hot"]["replay_detail"],
                               "malformed": after["malformed"]["replay_detail"]}


# -- still rejected, partly valid, narrowed ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_still_rejected_rows_record_the_new_reason_and_store_their_valid_readings(
    tmp_path: Path, database_url: str, topic_prefix: str,
) -> None:
    p, url = topic_prefix, database_url
    t = T0.isoformat()
    ids = seed(url, [
        (T0, None, f"{p}/hn-a/up", native("hn-a", t, {"pm25": 10.0, "temperature": 400.0}), "no_source", "-", None),
        (T0, None, f"{p}/hn-b/up", b'{"device": "hn-b", ', "no_source", "-", None),
        (T0, None, f"{p}/hn-c/up", native("hn-c", t, {"pm25": 666.0}), "no_source", "-", None),
        (T0, None, f"{p}/hn-d/up", native("hn-d", t, {"pm25": 7.0}), "no_source", "-", None),
        (T0, None, f"{p}/excluded/x", b'{"firmware": 3}', "no_source", "-", None),
    ])
    extra = f'[[sources]]\nname = "skip"\ntopic = "{p}/excluded/{{device}}"\nformat = "json"\nignore = ["*"]\n'
    settings = load_settings(config(tmp_path, url, p, extra=extra))
    # The database refuses one message's value: the batch is narrowed to it, the others are stored.
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("ALTER TABLE readings ADD CONSTRAINT no_666 CHECK (value <> 666)")
    tally = await replay(settings, batch=10)
    assert (tally.replayed, tally.batches, tally.stored, tally.rows_stored) == (5, 1, 2, 1)
    assert tally.still == {"out_of_range": 1, "malformed": 1, "db_rejected": 1}
    assert tally.partly == 1
    by_id = {r["id"]: r for r in rejected(url)}
    a, b, c_, d, e = (by_id[i] for i in ids)
    assert a["replay_reason"] == "out_of_range"
    assert "400" in a["replay_detail"]
    assert b["replay_reason"] == "malformed"
    assert c_["replay_reason"] == "db_rejected"
    assert "23514" in c_["replay_detail"]
    assert (d["replay_reason"], d["replay_detail"]) == (None, None)
    # An empty object where every leaf is ignored: nothing to store, not a rejection.
    assert e["replay_reason"] is None
    assert e["replay_detail"].startswith("nothing to store")
    assert all(r["replayed_at"] is not None for r in by_id.values())
    assert readings(url) == {("hn-a", "pm25", T0, 10.0, 0), ("hn-d", "pm25", T0, 7.0, 0)}
    assert tally.skipped.total() == 1


@pytest.mark.asyncio
async def test_too_large_rows_are_counted_and_left_as_they_are(tmp_path: Path, database_url: str,
                                                                topic_prefix: str) -> None:
    p, url = topic_prefix, database_url
    ids = seed(url, [
        (T0, None, f"{p}/hn-a/up", b'{"device": "hn-a", "time": "2026', "too_large",
         "payload of 70000 bytes exceeds ingest.max_message_bytes = 65536; ...", None),
        (T0, None, f"{p}/hn-b/up", native("hn-b", T0.isoformat(), {"pm25": 3.0}), "no_source", "-", None),
    ])
    settings = load_settings(config(tmp_path, url, p))
    tally = await replay(settings, Filters(reasons=("too_large", "no_source")))
    assert (tally.matching, tally.not_replayable, tally.replayed, tally.stored) == (1, 1, 1, 1)
    assert [r["replayed_at"] is None for r in rejected(url)] == [True, False]
    again = await replay(settings)
    assert (again.matching, again.not_replayable, again.replayed) == (0, 1, 0)
    assert rejected(url)[0]["id"] == ids[0]
    assert rejected(url)[0]["replayed_at"] is None


@pytest.mark.asyncio
async def test_a_dry_run_decodes_and_validates_and_writes_nothing(tmp_path: Path, database_url: str,
                                                                   topic_prefix: str) -> None:
    p, url = topic_prefix, database_url
    rows, expected = fleet_rows(p, 7)
    rows.append((T0, None, f"{p}/hn-x/up", native("hn-x", T0.isoformat(), {"pm25": -4.0}), "no_source", "-", None))
    seed(url, rows)
    settings = load_settings(config(tmp_path, url, p))
    with psycopg.connect(url) as c:
        tables = {t: c.execute(f"SELECT count(*) FROM {t}").fetchone() for t in ("devices", "metrics")}
    tally = await replay(settings, batch=3, dry=True)
    assert (tally.dry_run, tally.replayed, tally.batches, tally.stored, tally.rows_stored) == (True, 8, 3, 14, 7)
    assert tally.still == {"out_of_range": 1}
    assert marked(url) == set()
    assert reading_count(url) == 0
    with psycopg.connect(url) as c:
        assert {t: c.execute(f"SELECT count(*) FROM {t}").fetchone() for t in tables} == tables
    assert (await replay(settings)).stored == len(union(expected))


# -- interrupted and concurrent replays: each reading stored once -----------------------------------------


@pytest.mark.asyncio
async def test_an_interrupted_replay_resumes_and_stores_each_reading_once(tmp_path: Path, database_url: str,
                                                                          topic_prefix: str) -> None:
    p, url = topic_prefix, database_url
    rows, expected = fleet_rows(p, 30)
    ids = seed(url, rows)
    settings = load_settings(config(tmp_path, url, p))
    seen: list[int] = []
    tally = await replay(settings, batch=4, stop=lambda: len(seen) >= 3, on_batch=lambda t: seen.append(t.replayed))
    assert (tally.interrupted, tally.batches, tally.replayed, seen) == (True, 3, 12, [4, 8, 12])
    assert marked(url) == set(ids[:12])  # the oldest first
    assert readings(url) == union(expected[:12])
    rest = await replay(settings, batch=4)
    assert (rest.interrupted, rest.matching, rest.replayed, rest.duplicates) == (False, 18, 18, 0)
    assert rest.stored == len(union(expected[12:]))
    assert marked(url) == set(ids)
    assert readings(url) == union(expected)
    assert reading_count(url) == 60


@pytest.mark.asyncio
async def test_rows_rejected_during_a_replay_are_left_to_the_next_one(tmp_path: Path, database_url: str,
                                                                       topic_prefix: str) -> None:
    p, url = topic_prefix, database_url
    rows, expected = fleet_rows(p, 7)
    ids = seed(url, rows[1:])
    settings = load_settings(config(tmp_path, url, p))
    late: list[int] = []

    def live_ingest_rejects_one_more(t: ReplayTally) -> None:
        if not late:  # older than every other row: first in the claim's order, were it this run's
            late.extend(seed(url, rows[:1]))

    tally = await replay(settings, batch=2, on_batch=live_ingest_rejects_one_more)
    assert (tally.matching, tally.replayed, tally.batches) == (6, 6, 3)
    assert marked(url) == set(ids)
    assert readings(url) == union(expected[1:])
    again = await replay(settings)
    assert (again.matching, again.replayed) == (1, 1)
    assert marked(url) == {*ids, *late}


@pytest.mark.asyncio
async def test_a_batch_interrupted_before_its_commit_leaves_no_trace(tmp_path: Path, database_url: str,
                                                                     topic_prefix: str) -> None:
    p, url = topic_prefix, database_url
    rows, expected = fleet_rows(p, 10)
    seed(url, rows)
    settings = load_settings(config(tmp_path, url, p))
    with psycopg.connect(url) as lock:
        # The batch's new devices wait on this lock, inside the batch's transaction.
        lock.execute("LOCK TABLE devices IN SHARE MODE")
        task = asyncio.create_task(replay(settings, batch=10))

        await until(lambda: waiting_on(url, "sensor-ingest-replay"), "the replay's batch to wait on the lock")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        lock.rollback()
    await until(lambda: replay_sessions(url) == 0, "the cancelled replay's session to end")
    assert marked(url) == set()
    assert reading_count(url) == 0
    again = await replay(settings, batch=10)
    assert (again.replayed, again.duplicates) == (10, 0)
    assert readings(url) == union(expected)


@pytest.mark.asyncio
async def test_concurrent_replays_take_each_row_once(tmp_path: Path, database_url: str, topic_prefix: str) -> None:
    p, url = topic_prefix, database_url
    rows, expected = fleet_rows(p, 60)
    ids = seed(url, rows)
    settings = load_settings(config(tmp_path, url, p))
    a, b = await asyncio.gather(replay(settings, batch=3), replay(settings, batch=3))
    assert a.replayed + b.replayed == 60
    assert a.duplicates == b.duplicates == 0
    assert a.stored + b.stored == 120
    assert marked(url) == set(ids)
    assert readings(url) == union(expected)


def _consistent(url: str, ids: list[int], expected: list[set[Reading]]) -> set[int]:
    """Every replayed row's readings are stored, and no reading of a row not replayed: each batch is all
    or nothing. Returns the replayed rows."""
    done = marked(url)
    assert readings(url) == union(e for i, e in zip(ids, expected, strict=True) if i in done)
    return done


def test_a_killed_replay_loses_only_its_batch_and_the_next_run_resumes(tmp_path: Path, database_url: str,
                                                                       topic_prefix: str) -> None:
    p, url = topic_prefix, database_url
    rows, expected = fleet_rows(p, 800)
    ids = seed(url, rows)
    cfg = config(tmp_path, url, p)
    proc = cli(cfg, "replay", "--batch", "1", "--json")
    try:
        wait_until(lambda: len(marked(url)) >= 20, 120, "the replay to commit 20 batches")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    wait_until(lambda: replay_sessions(url) == 0, 60, "the killed replay's session to end")
    done = _consistent(url, ids, expected)
    assert 20 <= len(done) < 800
    code, out, err = run_cli(cfg, "replay", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["rows_replayed"], summary["duplicates"]) == (800 - len(done), 0)
    assert marked(url) == set(ids)
    assert readings(url) == union(expected)


def test_ctrl_c_stops_after_the_commit_and_says_how_to_resume(tmp_path: Path, database_url: str,
                                                              topic_prefix: str) -> None:
    p, url = topic_prefix, database_url
    rows, expected = fleet_rows(p, 800)
    ids = seed(url, rows)
    cfg = config(tmp_path, url, p)
    proc = cli(cfg, "replay", "--batch", "1")
    try:
        wait_until(lambda: len(marked(url)) >= 20, 120, "the replay to commit 20 batches")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopping after the batch in progress commits" in err
    done = _consistent(url, ids, expected)
    assert out.startswith(f"replayed {len(done)} row(s) of 800 not yet replayed, in {len(done)} batch(es)\n")
    assert "interrupted: the committed batches are kept; run the same command again to resume" in out
    assert len(done) < 800
    code, out, err = run_cli(cfg, "replay", "--json")
    assert code == 0, err
    assert (json.loads(out)["rows_replayed"], json.loads(out)["duplicates"]) == (800 - len(done), 0)
    assert readings(url) == union(expected)
    code, out, err = run_cli(cfg, "replay")
    assert (code, out) == (0, "nothing to replay: no matching row is waiting for a replay (`sensor-ingest rejected` "
                              "lists the rows and their replay outcomes)\n")


def test_a_second_ctrl_c_stops_at_once_and_rolls_the_batch_back(tmp_path: Path, database_url: str,
                                                                 topic_prefix: str) -> None:
    p, url = topic_prefix, database_url
    rows, expected = fleet_rows(p, 10)
    seed(url, rows)
    cfg = config(tmp_path, url, p)
    with psycopg.connect(url) as lock:
        lock.execute("LOCK TABLE devices IN SHARE MODE")  # the first batch's new devices wait on it
        proc = cli(cfg, "replay")
        stdout, stderr = proc.stdout, proc.stderr
        assert stdout is not None
        assert stderr is not None
        errors: list[str] = []
        reader = threading.Thread(target=lambda: errors.extend(iter(stderr.readline, "")), daemon=True)
        reader.start()
        try:
            wait_until(lambda: waiting_on(url, "sensor-ingest-replay"), 60, "the batch to wait on the lock")
            proc.send_signal(signal.SIGINT)
            wait_until(lambda: any("stopping after the batch" in e for e in errors), 60, "the first Ctrl-C's answer")
            assert marked(url) == set()  # the batch still waits: the first Ctrl-C let it go on
            proc.send_signal(signal.SIGINT)
            out = stdout.read()
            assert proc.wait(60) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(60)
            reader.join(60)
            stdout.close()
            stderr.close()
    assert out.startswith("replayed 0 row(s) of 10 not yet replayed, in 0 batch(es)\n")
    assert "run the same command again to resume" in out
    wait_until(lambda: replay_sessions(url) == 0, 60, "the replay's sessions to end")
    assert marked(url) == set()
    assert reading_count(url) == 0
    code, out, err = run_cli(cfg, "replay", "--json")
    assert code == 0, err
    assert json.loads(out)["rows_replayed"] == 10
    assert readings(url) == union(expected)


# -- `sensor-ingest rejected` and `rejected show` ---------------------------------------------------------


def _listed(capsys: pytest.CaptureFixture[str], cfg: Path, *argv: str) -> dict[str, Any]:
    assert main(["rejected", "-c", str(cfg), "--json", *argv]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


@pytest.mark.asyncio
async def test_rejected_lists_counts_and_filters(tmp_path: Path, database_url: str, topic_prefix: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    p, url = topic_prefix, database_url
    old, new = T0 - timedelta(hours=5), T0
    t = old.isoformat()  # the same time rules as live: a reading may not be later than its receipt (+ max_future)
    ids = seed(url, [
        (old, None, f"{p}/hn_a1/up", native("hn_a1", t, {"pm25": 1.0}), "no_source", "no source matches", None),
        (old, "native", f"{p}/hnxa2/up", native("hnxa2", t, {"pm25": -1.0}), "out_of_range", "pm25 -1 ...", "hnxa2"),
        (new, "native", f"{p}/hn_a3/up", native("hn_a3", t, {"pm25": 2.0}), "bad_unit", "pm25 in ppm ...", "hn_a3"),
        (new, "senml", f"{p}/senml/x", b"\x00\x01binary", "malformed", "not UTF-8 [/x] at byte 0", "x"),
    ])
    cfg = config(tmp_path, url, p)
    await replay(load_settings(cfg), Filters(reasons=("no_source", "out_of_range")))

    everything = _listed(capsys, cfg)
    assert everything["total"] == 4
    assert everything["by_reason"] == [
        {"reason": r, "rows": 1, "not_replayed": n, "stored": s, "skipped": 0, "still_rejected": x}
        for r, n, s, x in (("bad_unit", 1, 0, 0), ("malformed", 1, 0, 0), ("no_source", 0, 1, 0),
                           ("out_of_range", 0, 0, 1))]
    assert everything["still_rejected_by_new_reason"] == {"out_of_range": 1}
    assert [r["id"] for r in everything["rows"]] == [ids[3], ids[2], ids[1], ids[0]]  # newest first
    first = everything["rows"][3]
    assert first["replay"]["status"] == "stored"
    assert first["replay"]["reason"] is None
    assert everything["rows"][2]["replay"]["status"] == "still_rejected"
    assert everything["rows"][2]["replay"]["reason"] == "out_of_range"
    assert everything["rows"][0]["size"] == 8

    def ids_of(*argv: str) -> list[int]:
        return sorted(r["id"] for r in _listed(capsys, cfg, *argv)["rows"])

    assert ids_of("--reason", "malformed", "--reason", "bad_unit") == [ids[2], ids[3]]
    assert ids_of("--source", "native") == [ids[1], ids[2]]
    assert ids_of("--since", "2h") == [ids[2], ids[3]]
    assert ids_of("--since", (old + timedelta(minutes=1)).isoformat()) == [ids[2], ids[3]]
    assert ids_of("--device", "hn_a*") == [ids[2]]  # _ is literal: hnxa2 does not match
    assert ids_of("--device", "hn?a*") == [ids[1], ids[2]]
    assert ids_of("--replayed") == [ids[0], ids[1]]
    assert ids_of("--not-replayed") == [ids[2], ids[3]]
    limited = _listed(capsys, cfg, "--limit", "1")
    assert limited["total"] == 4
    assert [r["id"] for r in limited["rows"]] == [ids[3]]

    assert main(["rejected", "-c", str(cfg), "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "4 rejected message(s), by reason" in text
    assert "\nstill rejected after replay, by new reason: out_of_range 1\n" in text
    assert "not UTF-8 [/x] at byte 0" in text  # printed as it is, not read as markup
    assert "still rejected: out_of_range" not in text  # the oldest two are beyond --limit
    assert "(the newest 2 of 4; --limit N shows more" in text
    assert main(["rejected", "-c", str(cfg), "--replayed"]) == 0
    text = capsys.readouterr().out
    assert "still rejected: out_of_range" in text
    assert "stored at " in text
    assert main(["rejected", "-c", str(cfg), "--reason", "too_many_lines"]) == 0
    assert capsys.readouterr().out == "no rejected messages (reason too_many_lines)\n"


def test_rejected_show_prints_text_as_text_and_bytes_as_hex(tmp_path: Path, database_url: str, topic_prefix: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    p, url = topic_prefix, database_url
    text_payload = b'{"temperature": 86.0,\n "ts": "[bold]x"}'
    binary = b"\x00\x01\x02 bin\xff"
    cut = b'{"readings": {"pm25": 1' * 3
    ids = seed(url, [
        (T0, "city", f"{p}/city/c1", text_payload, "out_of_range", "temperature: 86 degC is outside ...", "c1"),
        (T0, "native", f"{p}/bin/up", binary, "malformed", "not UTF-8", None),
        (T0, None, f"{p}/big/up", cut, "too_large", "payload of 70000 bytes exceeds ingest.max_message_bytes", None),
    ])
    with psycopg.connect(url) as c:
        c.execute("UPDATE rejected_messages SET details = %s::jsonb WHERE id = %s",
                  [json.dumps([{"reason": "out_of_range", "detail": "temperature: 86 degC ...", "device": "c1"},
                               {"reason": "bad_unit", "detail": "pm25 in ppm", "device": "c1"}]), ids[0]])
    cfg = config(tmp_path, url, p)

    assert main(["rejected", "show", str(ids[0]), "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"rejected message {ids[0]}\n" in out
    assert f"  topic     {p}/city/c1\n" in out
    assert "  source    city\n" in out
    assert "  device    c1\n" in out
    assert "  reason    out_of_range: temperature: 86 degC is outside ...\n" in out
    assert "    - out_of_range (c1): temperature: 86 degC ...\n    - bad_unit (c1): pm25 in ppm\n" in out
    assert "  replay    not replayed\n" in out
    assert out.endswith(f"payload: {len(text_payload)} byte(s), UTF-8 text:\n{text_payload.decode()}\n")

    assert main(["rejected", "show", str(ids[0]), "--hex", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.endswith(f"UTF-8 text, as a hex dump:\n{hexdump(text_payload)}\n")

    assert main(["rejected", "show", str(ids[1]), "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"payload: {len(binary)} byte(s), binary or not UTF-8 text, as a hex dump:\n"
                        f"{hexdump(binary)}\n")
    assert "00000000  00 01 02 20 62 69 6e ff" in out

    assert main(["rejected", "show", str(ids[2]), "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"payload: {len(cut)} byte(s); only the first {len(cut)} bytes of the message were kept" in out
    assert "not replayable" in out

    assert main(["rejected", "show", str(ids[1]), "--json", "-c", str(cfg)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["payload_hex"] == binary.hex()
    assert shown["payload_text"] is None
    assert (shown["id"], shown["topic"], shown["reason"], shown["truncated"]) == (ids[1], f"{p}/bin/up", "malformed",
                                                                                  False)
    assert shown["replay"] == {"status": "not_replayed", "at": None, "reason": None, "detail": None}
    assert main(["rejected", "-c", str(cfg), "--json", "show", str(ids[0])]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["payload_text"] == text_payload.decode()
    assert len(shown["details"]) == 2

    assert main(["rejected", "show", str(ids[2] + 1000), "-c", str(cfg)]) == 1
    assert f"no rejected message with id {ids[2] + 1000}" in capsys.readouterr().err


def test_an_unreachable_database_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.services import free_port

    monkeypatch.setenv("SENSOR_INGEST_DATABASE_PASSWORD", "hunter2")
    cfg = config(tmp_path, f"postgresql://postgres@127.0.0.1:{free_port()}/none", "t")
    assert main(["replay", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the database" in err
    assert "hunter2" not in err
    assert main(["rejected", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the database" in err
    assert "hunter2" not in err
