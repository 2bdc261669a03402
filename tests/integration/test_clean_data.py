"""Correct and clean data end to end (issue #13): real Mosquitto, real TimescaleDB, the service as a process.

Two service processes serve every case of this file at once (a module fixture), each case on its own
devices (and, where the policy is per source, its own [[sources]] entry):

- ``main``: the catalog on (the default), sources with each time policy, a ``device_policy = "known"``
  source and a source whose new-metric budget a case spends;
- ``nocat``: ``[catalog] enabled = false``, on a database of its own.

The messages go out in three phases, each awaited on the service's acknowledgement counter (a message
is acknowledged only after its commit): A, one partly valid message while the test holds a lock on
rejected_messages (its readings and its row are one transaction, acknowledged once); B, the messages
a later one repeats or contradicts (first values, first copies); C, everything else.

The whole-message reasons (every reading of the message refused) are covered by
tests/integration/test_pipeline.py::test_every_rejection_reason_from_input_is_a_row_with_the_exact_bytes;
here each per-reading reason comes in a message that also holds valid readings.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from ingest.catalog import BUILTIN, Catalog
from ingest.model import FLAG_RECEIVE_TIME, FLAG_SUSPECT
from ingest.reasons import REASONS
from tests.integration.harness import IngestProcess, Publisher, count, waiting_on_a_lock, write_config
from tests.integration.test_pipeline import NOT_FROM_INPUT
from tests.services import Mosquitto, Postgres, wait_until

T = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)  # a good device time
TS = T.isoformat()
BUDGET = 12  # [ingest] max_new_metrics_per_minute of the main service: per source, per minute
KNOWN = "hn-kn-1"  # in the device register before the service starts
UNBOUND = "zz_unbound_level"  # a metric name the catalog binds to no quantity

# Per-reading reasons that input over MQTT cannot cause: none. (The reasons that only a bug or the
# database can cause, decoder_error, db_rejected and write_error, all refuse the whole message: they
# are test_pipeline.NOT_FROM_INPUT, covered in tests/integration/test_hostile_writes.py and
# tests/unit/test_process.py.)
PARTIAL_NOT_FROM_INPUT: frozenset[str] = frozenset()
PARTIAL = frozenset(code for code, r in REASONS.items() if not r.whole_message)


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


Row = tuple[str, str, datetime, float, int]  # (device, metric, time, value, flags)
StateRow = tuple[str, str, datetime, str, int]


@dataclass(frozen=True)
class Partial:
    """One message holding one reading with ``reason``'s problem and at least one valid reading."""

    reason: str
    source: str
    topic: str
    payload: bytes
    devices: tuple[str, ...]  # every device the message names: their readings are exactly ``stored``
    stored: tuple[Row, ...]  # including what an earlier message of these devices stored (conflict)
    bad_device: str  # the device of the refused reading (the row's device_uid and its detail's)
    detail_has: tuple[str, ...]  # what the detail of that reading must name
    unregistered: str | None = None  # a device that must not be in the devices table afterwards
    uncreated_metric: str | None = None  # a metric name that must not be in the metrics table


def _partial_cases(p: str) -> dict[str, Partial]:
    n = "native"
    budget_metrics = {f"b{i:02d}.temperature": 20.0 + i for i in range(BUDGET + 1)}  # bound by suffix
    denied = f"b{BUDGET:02d}.temperature"  # the last new name of the message: beyond the budget
    cases = [
        Partial("schema", "senml", f"{p}/senml/hn-cs-sch",
                _json([{"bn": "hn-cs-sch:", "bt": T.timestamp(), "n": "temperature", "v": 21.5},
                       {"n": "humidity"}]),  # a record without a value
                ("hn-cs-sch",), (("hn-cs-sch", "temperature", T, 21.5, 0),), "hn-cs-sch", ("[1]", "no value")),
        Partial("wrong_type", n, f"{p}/hn-cs-wt/up", _json({"time": TS, "readings": {"pm25": "12.5", "humidity": 41}}),
                ("hn-cs-wt",), (("hn-cs-wt", "humidity", T, 41.0, 0),), "hn-cs-wt", ("readings.pm25", "string")),
        # SenML times below 2**28 s are relative to the receive time (RFC 8428), so the absolute time
        # before earliest_time (2000-01-01) is 1980, not 1970.
        Partial("bad_time", "senml", f"{p}/senml/hn-cs-bt",
                _json([{"bn": "hn-cs-bt:", "bt": T.timestamp(), "n": "temperature", "v": 22.5},
                       {"bt": datetime(1980, 1, 1, tzinfo=UTC).timestamp(), "n": "humidity", "v": 42}]),
                ("hn-cs-bt",), (("hn-cs-bt", "temperature", T, 22.5, 0),), "hn-cs-bt", ("humidity", "1980-01-01")),
        Partial("not_finite", n, f"{p}/hn-cs-nf/up",
                b'{"time": "%s", "readings": {"pm25": NaN, "humidity": 43}}' % TS.encode(),
                ("hn-cs-nf",), (("hn-cs-nf", "humidity", T, 43.0, 0),), "hn-cs-nf", ("pm25", "nan")),
        Partial("bad_device", "gateway", f"{p}/gw/gw-cs-bd",
                _json([{"device": "hn-cs-bd", "time": TS, "readings": {"pm25": 12.0}},
                       {"device": "xx-cs-bd", "time": TS, "readings": {"pm25": 13.0}}]),  # allow_devices: hn-*
                ("hn-cs-bd", "xx-cs-bd"), (("hn-cs-bd", "pm25", T, 12.0, 0),), "xx-cs-bd",
                ("'xx-cs-bd'", "allow_devices"), unregistered="xx-cs-bd"),
        Partial("bad_metric", n, f"{p}/hn-cs-bm/up", _json({"time": TS, "readings": {"pm\u0007": 1.0, "humidity": 44}}),
                ("hn-cs-bm",), (("hn-cs-bm", "humidity", T, 44.0, 0),), "hn-cs-bm", ("control characters",),
                uncreated_metric="pm\u0007"),
        Partial("bad_text", n, f"{p}/hn-cs-bx/up",
                _json({"time": TS, "readings": {"status": {"text": "a\u0000b"}, "humidity": 45}}),
                ("hn-cs-bx",), (("hn-cs-bx", "humidity", T, 45.0, 0),), "hn-cs-bx", ("status", "NUL")),
        Partial("too_long", n, f"{p}/hn-cs-tl/up",
                _json({"time": TS, "readings": {"status": {"text": "x" * 1001}, "humidity": 46}}),
                ("hn-cs-tl",), (("hn-cs-tl", "humidity", T, 46.0, 0),), "hn-cs-tl", ("status", "1001")),
        Partial("too_many_new_series", "budget", f"{p}/budget/hn-cs-tm",
                _json({"time": TS, "readings": budget_metrics}),
                ("hn-cs-tm",), tuple(("hn-cs-tm", m, T, v, 0) for m, v in budget_metrics.items() if m != denied),
                "hn-cs-tm", (repr(denied), f"max_new_metrics_per_minute = {BUDGET}"), uncreated_metric=denied),
        Partial("unknown_device", "known", f"{p}/known/gw-cs-kn",
                _json([{"device": KNOWN, "time": TS, "readings": {"pm25": 14.0}},
                       {"device": "hn-kn-2", "time": TS, "readings": {"pm25": 15.0}}]),
                (KNOWN, "hn-kn-2"), ((KNOWN, "pm25", T, 14.0, 0),), "hn-kn-2", ("'hn-kn-2'", "register"),
                unregistered="hn-kn-2"),
        Partial("out_of_range", n, f"{p}/hn-cs-or/up", _json({"time": TS, "readings": {"pm25": 5000, "humidity": 40}}),
                ("hn-cs-or",), (("hn-cs-or", "humidity", T, 40.0, 0),), "hn-cs-or", ("pm25", "5000", "0..2000")),
        Partial("bad_unit", n, f"{p}/hn-cs-bu/up",
                _json({"time": TS, "readings": {"temperature": {"value": 20, "unit": "hPa"}, "humidity": 47}}),
                ("hn-cs-bu",), (("hn-cs-bu", "humidity", T, 47.0, 0),), "hn-cs-bu", ("'hPa'", "degC")),
        # The first value, 11.5, was stored by CONFLICT_FIRST (phase B); this message says 22.25.
        Partial("conflict", n, f"{p}/hn-cs-cf/up", _json({"time": TS, "readings": {"pm25": 22.25, "humidity": 48}}),
                ("hn-cs-cf",), (("hn-cs-cf", "pm25", T, 11.5, 0), ("hn-cs-cf", "humidity", T, 48.0, 0)),
                "hn-cs-cf", ("pm25", "22.25", "11.5")),
    ]
    return {c.reason: c for c in cases}


def _conflict_first(p: str) -> tuple[str, bytes]:
    return f"{p}/hn-cs-cf/up", _json({"time": TS, "readings": {"pm25": 11.5}})


def _main_sources(p: str) -> str:
    return f"""
[[sources]]
name = "known"
topic = "{p}/known/{{gateway}}"
format = "native"
device_policy = "known"
allow_devices = ["hn-kn-*"]

[[sources]]
name = "dor"
topic = "{p}/dor/{{device}}"
format = "native"
time_policy = "device_or_receive"

[[sources]]
name = "recv"
topic = "{p}/recv/{{device}}"
format = "native"
time_policy = "receive"

[[sources]]
name = "budget"
topic = "{p}/budget/{{device}}"
format = "native"

[ingest]
max_new_metrics_per_minute = {BUDGET}
"""


# One message with problems found by the decoder, the catalog and the writer: one row, each in details.
# Its noise 50 is stored first (phase B); this message says 60.
SEVERAL_FIRST = ("hn-mx-1", _json({"time": TS, "readings": {"noise": 50}}))
SEVERAL = ("hn-mx-1", _json({"time": TS, "readings": {
    "pm25": "x", "humidity": 5000, "temperature": {"value": 1, "unit": "hPa"}, "noise": 60, "pressure": 1000}}))
# Phase A: partly valid; humidity 5000 is outside its possible range 0..100 %.
PARTLY = ("hn-pv-1", _json({"time": TS, "readings": {"pm25": 16, "humidity": 5000}}))
# Duplicates: REPEATED is published twice in a row (phase C); REDELIVERED once in B, again in C.
REPEATED = ("hn-dup-1", _json({"time": TS, "readings": {"pm25": 12.5, "temperature": 21.0}}))
REDELIVERED = ("hn-dup-2", _json({"time": TS, "readings": {"pm25": 13.5, "humidity": 44}}))
# Time policies. pressure 5000 hPa is out_of_range: its rejection row's received_at is the message's
# receive time, exactly.
DEVICE_OR_RECEIVE = ("hn-tp-dor", _json({"readings": [
    {"metric": "pm25", "value": 14, "time": "1970-01-01T00:00:00Z"},  # a clock after a power loss
    {"metric": "temperature", "value": 22, "time": "2099-01-01T00:00:00Z"},  # beyond max_future
    {"metric": "humidity", "value": 45, "time": TS},  # a good time: kept
    {"metric": "pressure", "value": 5000, "time": TS},
]}))
RECEIVE = ("hn-tp-recv", _json({"time": TS, "readings": {"pm25": 15, "humidity": 46, "pressure": 5000}}))
# The catalog.
FAHRENHEIT = ("hn-cat-f", _json({"time": TS, "readings": {"temperature": {"value": 95, "unit": "degF"}}}))
SMOKE = ("hn-cat-pm", _json({"time": TS, "readings": {"pm25": 700}}))  # plausible 0..500, possible 0..2000
UNBOUND_MSG = ("hn-cat-ub", _json({"time": TS, "readings": {UNBOUND: {"value": 7.25, "unit": "zz"}}}))
# The nocat service ([catalog] enabled = false).
NOCAT_F = ("hn-nc-f", _json({"time": TS, "readings": {"temperature": {"value": 95, "unit": "degF"},
                                                      "pm25": 5000}}))
NOCAT_STATE = ("hn-nc-s", _json({"time": TS, "readings": {"status": {"text": "ok"}}}))  # published twice
# A state's conflict: "ok" first (phase B), then "fault" for the same time.
STATE_FIRST = ("hn-nc-c", _json({"time": TS, "readings": {"status": {"text": "ok"}}}))
STATE_SECOND = ("hn-nc-c", _json({"time": TS, "readings": {"status": {"text": "fault"}, "pm25": 3}}))
# A SenML pack without bn on a topic that names its device: a record whose name is not a string.
SENML_NO_BN = ("hn-cs-sch2", _json([{"bt": T.timestamp(), "n": "temperature", "v": 23.5}, {"n": 5, "v": 1.0}]))
# Two contradicting messages published back to back (phase C, likely one batch): the first is kept.
BATCH_FIRST = ("hn-cf-2", _json({"time": TS, "readings": {"pm25": 31.5}}))
BATCH_SECOND = ("hn-cf-2", _json({"time": TS, "readings": {"pm25": 32.5, "humidity": 49}}))


@dataclass
class World:
    main: IngestProcess
    nocat: IngestProcess
    url: str
    nocat_url: str
    prefix: str
    nocat_prefix: str
    cases: dict[str, Partial]
    published: int = 0  # messages published to main
    nocat_published: int = 0
    window: tuple[datetime, datetime] = (T, T)  # before phase C was published .. after it was acked
    during_lock: dict[str, Any] = field(default_factory=dict)  # phase A, seen while the row was held up
    after_lock_acked: float = -1.0

    def topic(self, device: str, source: str = "") -> str:
        return f"{self.prefix}/{source}/{device}" if source else f"{self.prefix}/{device}/up"


def _readings(url: str, devices: Iterable[str]) -> list[Row]:
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT d.uid, m.name, r.time, r.value, r.flags FROM readings r JOIN devices d ON d.id = r.device_id"
            " JOIN metrics m ON m.id = r.metric_id WHERE d.uid = ANY(%s)", (list(devices),)).fetchall()
    return sorted((str(d), str(m), t, float(v), int(f)) for d, m, t, v, f in rows)


def _states(url: str, devices: Iterable[str]) -> list[StateRow]:
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT d.uid, m.name, s.time, s.value, s.flags FROM states s JOIN devices d ON d.id = s.device_id"
            " JOIN metrics m ON m.id = s.metric_id WHERE d.uid = ANY(%s)", (list(devices),)).fetchall()
    return sorted((str(d), str(m), t, str(v), int(f)) for d, m, t, v, f in rows)


def _rows_of(url: str, payload: bytes) -> list[dict[str, Any]]:
    """The rejected_messages rows whose payload is ``payload``, byte for byte."""
    with psycopg.connect(url) as c:
        cur = c.execute("SELECT received_at, source, topic, payload, reason, detail, device_uid, details"
                        " FROM rejected_messages WHERE payload = %s", (payload,))
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _query(url: str, sql: str, values: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as c:
        return [tuple(r) for r in c.execute(sql, values).fetchall()]


def _metric_row(url: str, name: str) -> dict[str, Any] | None:
    with psycopg.connect(url) as c:
        cur = c.execute("SELECT name, unit, kind, quantity, valid_min, valid_max, plausible_min, plausible_max,"
                        " range_source FROM metrics WHERE name = %s", (name,))
        names = [d.name for d in cur.description or ()]
        row = cur.fetchone()
    return None if row is None else dict(zip(names, row, strict=True))


def _acked(proc: IngestProcess) -> float:
    return proc.metric("sensor_ingest_messages_acked_total")


def _publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    pub = Publisher(port)
    try:
        pub.publish_all(messages)
    finally:
        pub.close()


@pytest.fixture(scope="module")
def world(pg: Postgres, migrated_template: str, broker: Mosquitto,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("clean-data")
    dbs = [pg.create_database(migrated_template), pg.create_database(migrated_template)]
    url, nocat_url = pg.url(dbs[0]), pg.url(dbs[1])
    p, q = "t" + uuid.uuid4().hex[:10], "t" + uuid.uuid4().hex[:10]
    with psycopg.connect(url) as c:
        c.execute("INSERT INTO devices (uid) VALUES (%s)", (KNOWN,))
    main = IngestProcess(write_config(tmp / "main.toml", prefix=p, database_url=url, mqtt_url=broker.url,
                                      extra=_main_sources(p)), tmp / "main.log")
    nocat = IngestProcess(write_config(tmp / "nocat.toml", prefix=q, database_url=nocat_url, mqtt_url=broker.url,
                                       extra="\n[catalog]\nenabled = false\n"), tmp / "nocat.log")
    w = World(main, nocat, url, nocat_url, p, q, _partial_cases(p))
    try:
        main.start(wait=False)
        nocat.start(wait=False)
        wait_until(lambda: main.ready() and nocat.ready(), 60, "both services to be ready")

        # Phase A: the partly valid message's rejection row is held up by a lock: its readings,
        # written in the same transaction, are not visible, and the message is not acknowledged.
        with psycopg.connect(url) as locker:
            locker.execute("LOCK TABLE rejected_messages IN EXCLUSIVE MODE")  # until the rollback
            _publish(broker.port, [(w.topic(PARTLY[0]), PARTLY[1])])
            w.published += 1
            wait_until(lambda: waiting_on_a_lock(url), 60, "the batch's rejection row to wait on the lock")
            w.during_lock = {"readings": _readings(url, [PARTLY[0]]), "rows": count(url, "rejected_messages"),
                             "acked": _acked(main)}
            locker.rollback()
        wait_until(lambda: _acked(main) >= 1, 60, "the partly valid message to be acknowledged")
        w.after_lock_acked = _acked(main)

        # Phase B: first values and first copies, committed before anything repeats them.
        first = [_conflict_first(p), (w.topic(REDELIVERED[0]), REDELIVERED[1]), (w.topic(SEVERAL_FIRST[0]),
                                                                                    SEVERAL_FIRST[1])]
        _publish(broker.port, [*first, (f"{q}/{STATE_FIRST[0]}/up", STATE_FIRST[1])])
        w.published += len(first)
        w.nocat_published += 1
        wait_until(lambda: _acked(main) >= w.published and _acked(nocat) >= w.nocat_published, 60,
                   "phase B to be acknowledged")

        # Phase C: everything else.
        messages = [(c.topic, c.payload) for c in w.cases.values()]
        messages += [(w.topic(REPEATED[0]), REPEATED[1])] * 2 + [(w.topic(REDELIVERED[0]), REDELIVERED[1])]
        messages += [(w.topic(DEVICE_OR_RECEIVE[0], "dor"), DEVICE_OR_RECEIVE[1]),
                     (w.topic(RECEIVE[0], "recv"), RECEIVE[1])]
        messages += [(w.topic(d), m) for d, m in (FAHRENHEIT, SMOKE, UNBOUND_MSG, SEVERAL, BATCH_FIRST, BATCH_SECOND)]
        messages += [(w.topic(SENML_NO_BN[0], "senml"), SENML_NO_BN[1])]
        nocat_messages = [(f"{q}/{d}/up", m) for d, m in (NOCAT_F, NOCAT_STATE, NOCAT_STATE, STATE_SECOND)]
        start = datetime.now(UTC)
        _publish(broker.port, messages + nocat_messages)
        w.published += len(messages)
        w.nocat_published += len(nocat_messages)
        wait_until(lambda: _acked(main) >= w.published and _acked(nocat) >= w.nocat_published, 60,
                   "phase C to be acknowledged")
        w.window = (start, datetime.now(UTC))
        yield w
    finally:
        for proc in (main, nocat):
            proc.close()
        for name in dbs:
            pg.drop_database(name)


# -- 1. every per-reading reason, in a message that also holds valid readings ----------------------


def test_every_per_reading_reason_has_a_case_here() -> None:
    """A reason added to ingest/reasons.py without a case here fails this test (and its own below)."""
    cases = _partial_cases("p")
    assert set(cases) == PARTIAL - PARTIAL_NOT_FROM_INPUT
    assert all(c.reason == r for r, c in cases.items())
    # The reasons input cannot cause are, all of them, whole-message ones (test_pipeline lists them).
    assert NOT_FROM_INPUT & PARTIAL == PARTIAL_NOT_FROM_INPUT
    assert all(REASONS[r].whole_message for r in NOT_FROM_INPUT)
    # Each case is told apart by its bytes and its devices.
    assert len({c.payload for c in cases.values()}) == len(cases)
    devices = [d for c in cases.values() for d in c.devices]
    assert len(set(devices)) == len(devices)


@pytest.mark.parametrize("reason", sorted(PARTIAL - PARTIAL_NOT_FROM_INPUT))
def test_the_reading_with_the_problem_is_a_rejection_and_the_rest_of_its_message_is_stored(
    world: World, reason: str
) -> None:
    case = world.cases.get(reason)
    assert case is not None, f"no message for the per-reading reason {reason!r}: add one to _partial_cases"
    rows = _rows_of(world.url, case.payload)
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["reason"], row["source"], row["topic"], bytes(row["payload"]), row["device_uid"]) == (
        reason, case.source, case.topic, case.payload, case.bad_device)
    details = row["details"]
    assert isinstance(details, list)
    assert [d["reason"] for d in details] == [reason]
    assert details[0].get("device") == case.bad_device
    for text in case.detail_has:
        assert text in details[0]["detail"], (text, details[0])
    assert details[0]["detail"] in row["detail"]
    # The valid readings of the message are stored, with their values; the refused one is not,
    # neither in readings nor in states.
    assert _readings(world.url, case.devices) == sorted(case.stored)
    assert _states(world.url, case.devices) == []
    if case.unregistered is not None:
        assert _query(world.url, "SELECT uid FROM devices WHERE uid = %s", (case.unregistered,)) == []
    if case.uncreated_metric is not None:
        assert _metric_row(world.url, case.uncreated_metric) is None


def test_of_two_contradicting_messages_published_back_to_back_the_first_is_kept(world: World) -> None:
    d = BATCH_FIRST[0]
    assert _rows_of(world.url, BATCH_FIRST[1]) == []
    rows = _rows_of(world.url, BATCH_SECOND[1])
    assert [(r["reason"], [x["reason"] for x in r["details"]]) for r in rows] == [("conflict", ["conflict"])]
    assert "32.5" in rows[0]["detail"]
    assert "31.5" in rows[0]["detail"]
    assert _readings(world.url, [d]) == sorted([(d, "pm25", T, 31.5, 0), (d, "humidity", T, 49.0, 0)])


def test_a_different_state_for_a_stored_time_is_a_conflict_and_the_first_is_kept(world: World) -> None:
    d = STATE_FIRST[0]
    rows = _rows_of(world.nocat_url, STATE_SECOND[1])
    assert [(r["reason"], r["device_uid"], [x["reason"] for x in r["details"]]) for r in rows] == [
        ("conflict", d, ["conflict"])]
    assert "'fault'" in rows[0]["detail"]
    assert "'ok'" in rows[0]["detail"]
    assert _states(world.nocat_url, [d]) == [(d, "status", T, "ok", 0)]
    assert _readings(world.nocat_url, [d]) == [(d, "pm25", T, 3.0, 0)]


def test_a_message_with_several_problems_is_one_row_whose_details_list_each_in_order(world: World) -> None:
    d, payload = SEVERAL
    rows = _rows_of(world.url, payload)
    assert len(rows) == 1
    row = rows[0]
    assert [x["reason"] for x in row["details"]] == ["wrong_type", "out_of_range", "bad_unit", "conflict"]
    assert {x.get("device") for x in row["details"]} == {d}
    assert (row["reason"], row["device_uid"]) == ("wrong_type", d)  # the row's reason: the first one's
    assert row["detail"].startswith("4 readings skipped: ")
    for x in row["details"]:
        assert x["detail"] in row["detail"]
    assert "60" in row["details"][3]["detail"]
    assert "50" in row["details"][3]["detail"]
    assert _readings(world.url, [d]) == sorted([(d, "noise", T, 50.0, 0), (d, "pressure", T, 1000.0, 0)])


def test_a_senml_record_problem_names_the_device_of_the_topic(world: World) -> None:
    """The pack's other record is stored under the topic's device; its row must name that device too
    (an operator looks a device's rejections up by device_uid)."""
    d, payload = SENML_NO_BN
    assert _readings(world.url, [d]) == [(d, "temperature", T, 23.5, 0)]
    rows = _rows_of(world.url, payload)
    assert [(r["reason"], [x["reason"] for x in r["details"]]) for r in rows] == [("schema", ["schema"])]
    assert [x.get("device") for x in rows[0]["details"]] == [d]
    assert rows[0]["device_uid"] == d


def test_the_known_device_was_registered_before_and_its_readings_are_stored_under_that_row(world: World) -> None:
    rows = _query(world.url, "SELECT d.id, count(r.*) FROM devices d LEFT JOIN readings r ON r.device_id = d.id"
                  " WHERE d.uid = %s GROUP BY d.id", (KNOWN,))
    assert [n for _, n in rows] == [1]


# -- 2. duplicates --------------------------------------------------------------------------------


def test_a_repeated_and_a_republished_message_are_stored_once_and_counted_as_duplicates(world: World) -> None:
    assert _readings(world.url, [REPEATED[0], REDELIVERED[0]]) == sorted([
        (REPEATED[0], "pm25", T, 12.5, 0), (REPEATED[0], "temperature", T, 21.0, 0),
        (REDELIVERED[0], "pm25", T, 13.5, 0), (REDELIVERED[0], "humidity", T, 44.0, 0),
    ])
    assert _rows_of(world.url, REPEATED[1]) == []
    assert _rows_of(world.url, REDELIVERED[1]) == []
    # Two readings in the second copy of each: no other message of the main service repeats a key.
    assert world.main.metric("sensor_ingest_duplicates_total") == 4


def test_a_repeated_state_is_stored_once_and_counted(world: World) -> None:
    assert _states(world.nocat_url, [NOCAT_STATE[0]]) == [(NOCAT_STATE[0], "status", T, "ok", 0)]
    assert _rows_of(world.nocat_url, NOCAT_STATE[1]) == []
    assert world.nocat.metric("sensor_ingest_duplicates_total") == 1


# -- 3. time policies -----------------------------------------------------------------------------


def _received_at(world: World, payload: bytes) -> datetime:
    """The message's receive time: its rejection row's (pressure 5000 hPa is out_of_range)."""
    rows = _rows_of(world.url, payload)
    assert [(r["reason"], [d["reason"] for d in r["details"]]) for r in rows] == [("out_of_range", ["out_of_range"])]
    received: datetime = rows[0]["received_at"]
    assert world.window[0] <= received <= world.window[1]
    return received


def test_device_or_receive_keeps_a_good_time_and_replaces_an_impossible_one_by_the_receive_time(
    world: World
) -> None:
    received = _received_at(world, DEVICE_OR_RECEIVE[1])
    d = DEVICE_OR_RECEIVE[0]
    assert _readings(world.url, [d]) == sorted([
        (d, "pm25", received, 14.0, FLAG_RECEIVE_TIME),
        (d, "temperature", received, 22.0, FLAG_RECEIVE_TIME),
        (d, "humidity", T, 45.0, 0),
    ])


def test_receive_stores_every_reading_at_the_receive_time(world: World) -> None:
    received = _received_at(world, RECEIVE[1])
    assert received != T
    d = RECEIVE[0]
    assert _readings(world.url, [d]) == sorted([
        (d, "pm25", received, 15.0, FLAG_RECEIVE_TIME),
        (d, "humidity", received, 46.0, FLAG_RECEIVE_TIME),
    ])


# -- 4. the catalog -------------------------------------------------------------------------------


def _builtin(name: str) -> Any:
    return next(q for q in BUILTIN if q.name == name)


def test_a_fahrenheit_reading_is_stored_in_celsius_and_its_metric_row_holds_the_binding(world: World) -> None:
    assert _readings(world.url, [FAHRENHEIT[0]]) == [(FAHRENHEIT[0], "temperature", T, 35.0, 0)]
    assert _rows_of(world.url, FAHRENHEIT[1]) == []
    assert _metric_row(world.url, "temperature") == {
        "name": "temperature", "unit": "degC", "kind": "number", "quantity": "temperature",
        "valid_min": -60.0, "valid_max": 70.0, "plausible_min": -10.0, "plausible_max": 50.0,
        "range_source": _builtin("temperature").source,
    }
    assert _builtin("temperature").source  # the range's origin is stated, not empty


def test_an_implausible_but_possible_value_is_stored_with_the_suspect_flag(world: World) -> None:
    assert _readings(world.url, [SMOKE[0]]) == [(SMOKE[0], "pm25", T, 700.0, FLAG_SUSPECT)]
    assert _rows_of(world.url, SMOKE[1]) == []
    assert _metric_row(world.url, "pm25") == {
        "name": "pm25", "unit": "ug/m3", "kind": "number", "quantity": "pm2_5",
        "valid_min": 0.0, "valid_max": 2000.0, "plausible_min": 0.0, "plausible_max": 500.0,
        "range_source": _builtin("pm2_5").source,
    }


def test_an_unbound_metric_is_stored_as_it_came_and_counted(world: World) -> None:
    assert Catalog().quantity_of(UNBOUND) is None
    assert _readings(world.url, [UNBOUND_MSG[0]]) == [(UNBOUND_MSG[0], UNBOUND, T, 7.25, 0)]
    assert _metric_row(world.url, UNBOUND) == {
        "name": UNBOUND, "unit": "zz", "kind": "number", "quantity": None, "valid_min": None, "valid_max": None,
        "plausible_min": None, "plausible_max": None, "range_source": None,
    }
    # Every other metric the main service was sent is bound (or refused before the catalog): the
    # counter holds this one reading.
    assert world.main.metric("sensor_ingest_unbound_readings_total") == 1


def test_with_the_catalog_disabled_readings_are_stored_as_decoded(world: World) -> None:
    d = NOCAT_F[0]
    assert _readings(world.nocat_url, [d]) == sorted([(d, "temperature", T, 95.0, 0), (d, "pm25", T, 5000.0, 0)])
    assert _rows_of(world.nocat_url, NOCAT_F[1]) == []
    assert _metric_row(world.nocat_url, "temperature") == {
        "name": "temperature", "unit": "degF", "kind": "number", "quantity": None, "valid_min": None,
        "valid_max": None, "plausible_min": None, "plausible_max": None, "range_source": None,
    }


# -- 5. a partly valid message: one transaction, one acknowledgement ------------------------------


def test_a_partly_valid_message_commits_its_readings_with_its_row_and_is_acknowledged_once(world: World) -> None:
    # While its rejection row waited on the lock, nothing of the message was visible or acknowledged.
    assert world.during_lock == {"readings": [], "rows": 0, "acked": 0.0}
    assert world.after_lock_acked == 1.0
    d, payload = PARTLY
    assert _readings(world.url, [d]) == [(d, "pm25", T, 16.0, 0)]
    rows = _rows_of(world.url, payload)
    assert [(r["reason"], r["topic"], r["device_uid"], [x["reason"] for x in r["details"]]) for r in rows] == [
        ("out_of_range", world.topic(d), d, ["out_of_range"])]


def test_every_message_is_acknowledged_once_and_nothing_else_is_written(world: World) -> None:
    main = world.main.metrics()
    assert main["sensor_ingest_messages_acked_total"] == world.published
    # One row per message that had a refused reading: the partial cases, the partly valid message,
    # the two time-policy messages (their pressure), SEVERAL, BATCH_SECOND and SENML_NO_BN; none for
    # the duplicates.
    rows = len(world.cases) + 6
    assert count(world.url, "rejected_messages") == rows
    assert main["sensor_ingest_rejections_total"] == rows
    # partial cases, PARTLY, REPEATED and REDELIVERED, DEVICE_OR_RECEIVE, RECEIVE, the catalog's, SEVERAL,
    # BATCH_FIRST and BATCH_SECOND, SENML_NO_BN
    expected = sum(len(c.stored) for c in world.cases.values()) + 1 + 4 + 3 + 2 + 3 + 2 + 2 + 1
    assert count(world.url, "readings") == expected
    assert count(world.url, "states") == 0
    nocat = world.nocat.metrics()
    assert nocat["sensor_ingest_messages_acked_total"] == world.nocat_published
    assert count(world.nocat_url, "readings") == 3
    assert count(world.nocat_url, "states") == 2
    assert count(world.nocat_url, "rejected_messages") == 1  # STATE_SECOND's conflict
