"""A slow write is not an outage: while the database still answers, the broker connection stays up.

The service disconnects from the broker on purpose when the database has not answered for half the
MQTT keepalive (issue #5). Before issue #9 it counted the length of the write in progress instead of
the time without an answer, so a write held up (here by a lock another session holds) on a database
that answered every probe suspended the broker connection and turned /readyz to 503.
"""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from tests.integration.harness import (
    HealthSampler,
    IngestProcess,
    Publisher,
    native,
    stored_readings,
    waiting_on_a_lock,
    write_config,
)
from tests.services import Mosquitto, wait_until

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
KEEPALIVE = 5  # the stall limit is half of it: 2.5 s


def test_a_write_held_up_by_a_lock_does_not_suspend_the_broker_connection(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    cfg = write_config(tmp_path / "c.toml", prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url,
                       keepalive=KEEPALIVE)
    ingest = IngestProcess(cfg, tmp_path / "ingest.log")
    try:
        ingest.start()
        pub = Publisher(broker.port)
        try:
            first = native("hn-aq-1", T0.isoformat(), {"pm25": 1.0})
            pub.publish_all([(f"{topic_prefix}/hn-aq-1/up", first)])
            wait_until(lambda: len(stored_readings(database_url)) == 1, 30, "the first reading")
            with HealthSampler(ingest, interval=0.1) as health, psycopg.connect(database_url) as locker:
                locker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")  # held until the block ends
                second = native("hn-aq-1", T0.replace(minute=1).isoformat(), {"pm25": 2.0})
                pub.publish_all([(f"{topic_prefix}/hn-aq-1/up", second)])
                wait_until(lambda: waiting_on_a_lock(database_url), 30, "the service's write to wait on the lock")
                held_until = time.monotonic() + 4 * KEEPALIVE / 2  # four stall limits
                while time.monotonic() < held_until:
                    time.sleep(0.1)
                assert waiting_on_a_lock(database_url), "the write was held up the whole time"
                # The sampler really watched the whole hold (a starved sampler would prove nothing).
                wait_until(lambda: any(s.at >= held_until for s in health.samples), 30, "a sample after the hold")
                covered = [s.at for s in health.samples if s.at <= held_until]
                assert len(covered) >= 10
                assert max(b - a for a, b in itertools.pairwise(covered)) < 2 * KEEPALIVE
            wait_until(lambda: len(stored_readings(database_url)) == 2, 30, "the held-up reading")
            suspended = health.max_of("sensor_ingest_mqtt_suspended")
            assert suspended == 0, "the broker connection was suspended during a slow write"
            codes = {s.readyz for s in health.samples}
            assert codes == {200}, f"/readyz answered {codes} during a slow write"
            assert "disconnected on purpose" not in ingest.log_path.read_text()
        finally:
            pub.close()
        assert ingest.terminate() == 0
    finally:
        ingest.close()


