"""The one last resort (ingest/pipeline.py, Pipeline._narrow), end to end.

The test's own database is made to refuse one marked message in every form the service can write
it: a row trigger on readings refuses its reading and one on rejected_messages refuses any row
whose payload holds the mark (SQLSTATE 22023, a data-class error). Published among good messages
over the real broker to the real service, the message is narrowed down to itself, its rejection
row is refused, and then it is logged at ERROR with its topic and payload in hex, and
acknowledged: every good message is stored, and the broker does not deliver it again.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg

from tests.integration.harness import IngestProcess, Publisher, count, native, stored_readings, write_config
from tests.integration.test_pipeline import T0
from tests.services import Mosquitto, wait_until

HANG = 60  # seconds: a bound on a hang only
MARK = 4242.4242  # the value, and so the payload text, the triggers refuse
GOOD = 20  # good messages on each side of the marked one

_REFUSE = f"""
CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- TG_TABLE_NAME is the hypertable's chunk.
    RAISE EXCEPTION 'test: % refuses the marked message', TG_TABLE_NAME USING ERRCODE = '22023';
END $$;
CREATE TRIGGER test_refuse_reading BEFORE INSERT ON readings
    FOR EACH ROW WHEN (NEW.value = {MARK}) EXECUTE FUNCTION test_refuse();
CREATE TRIGGER test_refuse_rejection BEFORE INSERT ON rejected_messages
    FOR EACH ROW WHEN (position(convert_to('{MARK}', 'UTF8') IN NEW.payload) > 0) EXECUTE FUNCTION test_refuse();
"""


def test_a_message_even_whose_rejection_row_is_refused_is_logged_in_hex_and_acknowledged(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute(_REFUSE)
    cfg = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url)
    log = tmp_path / "ingest.log"
    ingest = IngestProcess(cfg, log)
    messages, expected = [], set()
    for i in range(2 * GOOD):
        device, t = f"hn-aq-{i:03d}", T0.isoformat()
        messages.append((f"{topic_prefix}/{device}/up", native(device, t, {"pm25": float(i)})))
        expected.add((device, "pm25", t, float(i)))
    bad_topic = f"{topic_prefix}/hn-aq-bad/up"
    bad = native("hn-aq-bad", T0.isoformat(), {"pm25": MARK})
    messages.insert(GOOD, (bad_topic, bad))
    try:
        ingest.start()
        pub = Publisher(broker.port)
        try:
            pub.publish_all(messages)
        finally:
            pub.close()
        # Every message, the refused one included, is acknowledged; every good one is stored.
        wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= len(messages), HANG,
                   "every message to be acknowledged")
        assert ingest.metric("sensor_ingest_messages_acked_total") == len(messages)
        assert stored_readings(database_url) == expected
        assert count(database_url, "rejected_messages") == 0  # its rejection row was refused too
        assert ingest.metric("sensor_ingest_db_errors_total") >= 3  # batch, message, rejection row

        # Acknowledged for good: after a restart (same client id, same session) the broker has
        # nothing of it to deliver. A sentinel published after the restart is delivered after
        # anything the session still held, so once it is stored, nothing came back.
        assert ingest.terminate() == 0
        ingest.start()
        pub = Publisher(broker.port)
        try:
            pub.publish_all([(f"{topic_prefix}/hn-aq-sentinel/up", native("hn-aq-sentinel", T0.isoformat(),
                                                                          {"pm25": 1.0}))])
        finally:
            pub.close()
        wait_until(lambda: count(database_url, "readings") == len(expected) + 1, HANG, "the sentinel")
        assert ingest.metric("sensor_ingest_messages_received_total") == 1  # the sentinel, nothing else
        assert count(database_url, "rejected_messages") == 0
        assert ingest.terminate() == 0
    finally:
        ingest.close()

    # The log, over both runs, holds the payload in hex exactly once: on one ERROR line with its topic.
    lines = log.read_text().splitlines()
    with_hex = [line for line in lines if bad.hex() in line]
    assert len(with_hex) == 1, with_hex
    assert re.search(r"\bERROR\b", with_hex[0])
    assert repr(bad_topic) in with_hex[0]
    assert "cannot be stored even as a rejection" in with_hex[0]
    assert "refuses the marked message" in with_hex[0]  # the database's own words
