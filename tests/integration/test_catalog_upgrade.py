"""A stored series never changes unit under its history (ingest.store.ids.sync_bindings, Catalog.pin).

A database filled before the catalog (or before a [[metrics]] change) holds metrics whose rows say
Pa, Wh or F. At start-up the service binds each row to its quantity but keeps the row's unit: new
readings of that metric are converted to it, so history and new data agree; nothing is relabelled.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import psycopg

from ingest.catalog import Catalog
from ingest.store.ids import sync_bindings
from tests.integration.harness import IngestProcess, Publisher, native, write_config
from tests.services import Mosquitto, wait_until

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def _seed(url: str) -> None:
    """What a release without the catalog left: rows with the units their first readings had."""
    with psycopg.connect(url) as c:
        c.execute("INSERT INTO metrics (name, unit, kind) VALUES ('BME280_pressure', 'Pa', 'number'), "
                  "('BME280.Temperature', 'C', 'number'), ('Wifi.Signal', '%', 'number')")
        # An operator's own range on a metric the catalog binds to nothing: left alone.
        c.execute("INSERT INTO metrics (name, unit, kind, valid_min, valid_max) VALUES ('seq', NULL, 'number', 0, 9)")


def _rows(url: str) -> dict[str, tuple[object, ...]]:
    with psycopg.connect(url) as c:
        return {str(r[0]): tuple(r[1:]) for r in c.execute(
            "SELECT name, unit, quantity, valid_min, valid_max, plausible_min, plausible_max FROM metrics")}


def test_sync_keeps_each_stored_unit_and_binds_the_rest(database_url: str) -> None:
    _seed(database_url)

    async def sync(catalog: Catalog) -> tuple[int, list[str]]:
        conn = await asyncpg.connect(database_url)
        try:
            return await sync_bindings(conn, catalog)
        finally:
            await conn.close()

    catalog = Catalog()
    changed, kept = asyncio.run(sync(catalog))
    rows = _rows(database_url)
    assert rows["BME280_pressure"] == ("Pa", "pressure", 30000.0, 110000.0, 87000.0, 108500.0)
    assert rows["BME280.Temperature"] == ("degC", "temperature", -60.0, 70.0, -10.0, 50.0)  # C is degC
    assert rows["Wifi.Signal"] == ("%", None, None, None, None, None)  # % cannot be dBm: unbound
    assert rows["seq"] == (None, None, 0.0, 9.0, None, None)
    assert changed == 2
    assert len(kept) == 2
    assert kept == [
        "'BME280_pressure' keeps its unit 'Pa', the unit of its stored readings: new readings are converted to it "
        "(other metrics of 'pressure' are stored in 'hPa')",
        "'Wifi.Signal' stays unbound: its stored readings are in '%', which does not convert to 'dBm' of 'rssi'"]
    # And the catalog now converts new readings to the kept unit.
    assert catalog.quantity_of("BME280_pressure").unit == "Pa"  # type: ignore[union-attr]
    assert asyncio.run(sync(Catalog())) == (0, kept)  # the next start changes nothing


def test_the_service_stores_new_readings_in_the_unit_of_the_stored_history(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, ingests: list[IngestProcess]
) -> None:
    _seed(database_url)
    cfg = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url)
    ingest = IngestProcess(cfg, tmp_path / "ingest.log")
    ingests.append(ingest)
    ingest.start()
    payload = native("hn-up-1", T0.isoformat(), {"BME280_pressure": {"value": 1010.0, "unit": "hPa"},
                                                  "pressure": {"value": 101000.0, "unit": "Pa"}})
    pub = Publisher(broker.port)
    try:
        pub.publish_all([(f"{topic_prefix}/hn-up-1/up", payload)])
    finally:
        pub.close()
    wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= 1, 60, "the message acknowledged")
    with psycopg.connect(database_url) as c:
        stored = dict(c.execute("SELECT m.name, r.value FROM readings r JOIN metrics m ON m.id = r.metric_id")
                      .fetchall())
        units = dict(c.execute("SELECT name, unit FROM metrics WHERE name IN ('BME280_pressure', 'pressure')")
                     .fetchall())
    assert stored == {"BME280_pressure": 101000.0, "pressure": 1010.0}
    assert units == {"BME280_pressure": "Pa", "pressure": "hPa"}
    log = ingest.log_path.read_text()
    assert "metric catalog: metric 'BME280_pressure' keeps its unit 'Pa'" in log
    assert "metric catalog: metric 'Wifi.Signal' stays unbound" in log
    assert ingest.terminate() == 0
