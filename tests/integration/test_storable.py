"""Every Outcome is storable: whatever a publisher sent, its message ends as readings or as a
rejection row in the real database, and the writer never raises on it.

Two property tests drive the real Processor (routing, decoders, validation) and the real Writer
into a real TimescaleDB:
- arbitrary decoded readings (any text in device, metric, unit and text values, any float) pass
  through validation, as every decoder's output does;
- mutated real payloads: the golden cases' payloads with bytes flipped, inserted and deleted, and
  strings swapped for text PostgreSQL cannot hold (lone surrogates, NUL).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.model import RawMessage, Reading, Rejection
from ingest.process import Outcome, Processor, summarize
from ingest.settings import DatabaseSettings, Settings, SourceSettings
from ingest.store.pool import create_pool
from ingest.store.writer import Writer
from ingest.validate import Limits, validate

RECEIVED = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
LIMITS = Limits(datetime(2000, 1, 1, tzinfo=UTC), timedelta(seconds=600))
CASES = Path(__file__).parents[1] / "decoders" / "cases"
PROPS = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Text of every kind, weighted towards what PostgreSQL refuses.
hostile_chars = st.sampled_from(["\x00", "\ud800", "\udc80", "\udfff", "\ud83d", "\x7f", "\n", "'", "\\", "é", "水"])
texts = st.one_of(
    st.text(max_size=8),
    st.lists(st.one_of(hostile_chars, st.characters()), max_size=8).map("".join),
    st.text(min_size=190, max_size=260),
)
values = st.one_of(st.floats(), st.booleans(), texts)
times = st.one_of(
    st.just(RECEIVED),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)),
)
readings = st.builds(Reading, device=texts, metric=texts, time=times, value=values,
                     unit=st.one_of(st.none(), texts), flags=st.sampled_from([0, 1, 2]))


class _Db:
    """One event loop and one writer for all examples of a property test."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool: asyncpg.Pool = self.loop.run_until_complete(create_pool(DatabaseSettings(url=url)))
        self.writer = Writer(self.pool)

    def run(self, outcomes: list[Outcome]) -> None:
        before = self.count()
        result = self.loop.run_until_complete(self.writer.write(outcomes))  # must not raise
        with_rejection = sum(1 for o in outcomes if o.rejection is not None)
        # The writer adds a row only for a message whose reading conflicts with a stored value.
        added = result.rejections - with_rejection
        assert 0 <= added <= result.reasons["conflict"]
        assert self.count() == before + result.rejections
        for o in outcomes:
            assert o.readings or o.rejection is not None or o.skipped, (
                "an outcome is stored as readings, a rejection or both, or skipped (counted) by design")

    def count(self) -> int:
        return int(self.loop.run_until_complete(self.pool.fetchval("SELECT count(*) FROM rejected_messages")))

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()


@pytest.fixture
def db(database_url: str) -> Iterator[_Db]:
    d = _Db(database_url)
    yield d
    d.close()


def _outcome(i: int, decoded: list[Reading], topic: str) -> Outcome:
    kept, problems = validate(decoded, RECEIVED, LIMITS)
    msg = RawMessage(topic, b"payload %d" % i, RECEIVED, 1, i + 1, 1, i)
    if not kept and not problems:
        problems = [Rejection("empty", "the payload holds no readings")]
    return Outcome(msg, "props", kept, summarize(problems) if problems else None)


@PROPS
@given(batch=st.lists(st.tuples(st.lists(readings, max_size=4), texts), min_size=1, max_size=6))
def test_arbitrary_decoded_readings_are_stored_or_rejected(db: _Db, batch: list[tuple[list[Reading], str]]) -> None:
    outcomes = [_outcome(i, rs, "city/" + topic) for i, (rs, topic) in enumerate(batch)]
    db.run([o for o in outcomes if o.readings or o.rejection is not None])


def _payloads() -> list[tuple[str, bytes]]:
    out = []
    for case in sorted(CASES.glob("*/*")):
        out.append((case.parent.name, (case / "payload").read_bytes()))
    return out


PAYLOADS = _payloads()
_SWAPS = ["\\ud800", "\\udc80x", "\\u0000", "\\udfff\\ud800", "x" * 300]


def _mutate(payload: bytes, how: int, at: int, piece: bytes) -> bytes:
    at = at % (len(payload) + 1)
    if how == 0:  # flip a byte
        return payload[:at] + bytes([(payload[at % len(payload)] ^ 0xFF) if payload else 0]) + payload[at + 1:]
    if how == 1:  # insert
        return payload[:at] + piece + payload[at:]
    if how == 2:  # delete a stretch
        return payload[:at] + payload[at + len(piece):]
    # Swap the first string that follows `at` for JSON text that decodes to an unstorable string.
    start = payload.find(b'"', at)
    end = payload.find(b'"', start + 1) if start >= 0 else -1
    if end < 0:
        return payload
    swap = _SWAPS[len(piece) % len(_SWAPS)].encode()
    return payload[: start + 1] + swap + payload[end:]


def _processor() -> Processor:
    sources = [
        SourceSettings(name="native", topic="n/{device}/up", format="native"),
        SourceSettings(name="native-gw", topic="gw/{gateway}", format="native", device_prefix="gw:"),
        SourceSettings(name="senml", topic="s/{device}", format="senml"),
        SourceSettings(name="senml-gw", topic="sg/{gateway}", format="senml", device_prefix="sg:"),
        SourceSettings(name="json", topic="j/{device}", format="json", time_field="Time",
                       timezone="Asia/Ho_Chi_Minh", states=["*state*"], value_map={"ON": 1, "OFF": 0}),
        SourceSettings(name="json-gw", topic="jg/{gateway}", format="json", device_field="device",
                       device_prefix="jg:"),
        SourceSettings(name="lorawan", topic="l/{device}", format="lorawan", options={"radio": True}),
        SourceSettings(name="lorawan-gw", topic="lg/{gateway}", format="lorawan", device_prefix="lg:"),
        SourceSettings(name="line", topic="li/{device}", format="line", states=["*"]),
        SourceSettings(name="line-gw", topic="lig/{gateway}", format="line", device_prefix="lig:"),
        SourceSettings(name="value", topic="v/{device}/#", format="value", options={"text": True}),
    ]
    return Processor.from_settings(Settings(sources=sources))


PROCESSOR = _processor()
TOPICS = {"native": ["n/hn-aq-0001/up", "gw/g1"], "senml": ["s/hn-aq-0001", "sg/g1"],
          "json": ["j/hn-aq-0001", "jg/g1"], "lorawan": ["l/hn-aq-0001", "lg/g1"], "line": ["li/hn-aq-0001", "lig/g1"],
          "value": ["v/hn-aq-0001/sensor/x/state", "v/g1/text_sensor/y/state"]}


@PROPS
@given(
    picks=st.lists(
        st.tuples(st.integers(0, len(PAYLOADS) - 1), st.integers(0, 3), st.integers(0, 10_000), st.binary(max_size=8),
                  st.booleans()),
        min_size=1, max_size=6,
    )
)
def test_mutated_real_payloads_are_stored_or_rejected(db: _Db, picks: list[tuple[int, int, int, bytes, bool]]) -> None:
    outcomes = []
    for i, (k, how, at, piece, gateway) in enumerate(picks):
        family, payload = PAYLOADS[k]
        topic = TOPICS[family][1 if gateway else 0]
        msg = RawMessage(topic, _mutate(payload, how, at, piece), RECEIVED, 1, i + 1, 1, i)
        outcomes.append(PROCESSOR.process(msg))
    db.run(outcomes)


def test_the_swap_mutation_reaches_unstorable_text() -> None:
    """The swap really yields strings PostgreSQL cannot hold, so the property above meets them."""
    native = json.dumps({"device": "hn-aq-0001", "readings": {"pm25": 1.0}}).encode()
    mutated = _mutate(native, 3, native.find(b'"hn-aq'), b"")  # piece length 0: the first swap, \ud800
    assert json.loads(mutated)["device"] == "\ud800"
    outcome = PROCESSOR.process(RawMessage("gw/g1", mutated, RECEIVED, 1, 1, 1, 0))
    assert outcome.readings == []
    assert outcome.rejection is not None
    assert outcome.rejection.reason == "bad_device"
