"""Workers hold no state of their own: two processes share one MQTT v5 shared subscription."""

from __future__ import annotations

from pathlib import Path

from tests.integration.harness import IngestProcess, Publisher, count, fleet, stored_readings, write_config
from tests.integration.test_pipeline import T0
from tests.services import Mosquitto, wait_until


def test_two_workers_in_a_shared_group_store_everything_once(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    workers = []
    for i in range(2):
        cfg = write_config(tmp_path / f"w{i}.toml", prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url)
        cfg.write_text(
            cfg.read_text().replace("keepalive = 10\n", f'keepalive = 10\nshared_group = "{topic_prefix}"\n')
        )
        workers.append(IngestProcess(cfg, tmp_path / f"w{i}.log"))
    try:
        for w in workers:
            w.start()
        messages, expected = fleet(topic_prefix, 4000, T0)
        pub = Publisher(broker.port)
        try:
            pub.publish_all(messages)
        finally:
            pub.close()
        wait_until(lambda: count(database_url, "readings") >= len(expected), 120, "every reading")
        assert stored_readings(database_url) == expected
        assert count(database_url, "readings") == len(expected)
        received = [w.metric("sensor_ingest_messages_received_total") for w in workers]
        assert sum(received) == len(messages)  # each message went to exactly one worker
        assert all(r > 0 for r in received)  # and both did work
        assert all("$share/" in w.log_path.read_text() for w in workers)
    finally:
        for w in workers:
            w.close()
