"""The straightforward approach, for the ratio: paho on_message -> one INSERT per reading, autocommit.

This is what a user would write first, and it is kept that way on purpose: no batching, no COPY, no
id cache, one transaction (and so one fsync) per reading, paho's automatic acknowledgement after the
callback returns. It gets only what it needs to be a fair opponent on the same data: a persistent
session (clean_session false) so the backlog waits for it like it waits for the service, a table of
the same shape with the same unique key, and ON CONFLICT DO NOTHING so a redelivery is harmless.

It reads the payloads the benchmark sends, the way a first version would: a JSON array is a SenML
pack (RFC 8428: name = bn + n, the device is bn without its trailing ':', time = bt + t), a JSON
object a native message (device, time, readings). Values are stored as sent: no unit conversion, no
range check, no alert rules.

    python -m bench.baseline --database-url URL --mqtt-url URL --topic 'bench/+/up'
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

TABLE_SQL = """
CREATE TABLE IF NOT EXISTS baseline_readings (
    time timestamptz NOT NULL,
    device text NOT NULL,
    metric text NOT NULL,
    value double precision,
    UNIQUE (device, metric, time)
);
SELECT create_hypertable('baseline_readings', 'time', if_not_exists => true, create_default_indexes => false);
"""


def readings(body: Any) -> Iterator[tuple[datetime | str, str, str, float]]:
    """(time, device, metric, value) of each reading of a decoded payload."""
    if isinstance(body, list):  # a SenML pack
        name, base = "", 0.0
        for record in body:
            name, base = record.get("bn", name), record.get("bt", base)
            yield (datetime.fromtimestamp(base + record.get("t", 0), UTC), name.removesuffix(":"), record["n"],
                   record["v"])
        return
    for metric, value in body["readings"].items():
        if isinstance(value, dict):  # {"value": 50.5, "unit": "degF"}: stored as sent, no conversion
            value = value["value"]
        yield body["time"], body["device"], metric, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--mqtt-url", required=True)
    ap.add_argument("--topic", required=True, help="MQTT filter to subscribe to")
    ap.add_argument("--client-id", default="bench-baseline")
    ap.add_argument("--create-table", action="store_true", help="create baseline_readings and exit")
    args = ap.parse_args(argv)

    db = psycopg.connect(args.database_url, autocommit=True)
    if args.create_table:
        db.execute(TABLE_SQL)
        return 0

    def on_connect(client: paho.Client, _u: object, _f: object, rc: object, _p: object = None) -> None:
        client.subscribe(args.topic, qos=1)
        print("subscribed", flush=True)

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        for at, device, metric, value in readings(json.loads(msg.payload)):
            db.execute(
                "INSERT INTO baseline_readings (time, device, metric, value) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (at, device, metric, value),
            )

    parts = urlsplit(args.mqtt_url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False)
    client.max_inflight_messages_set(1000)
    client.on_connect = on_connect
    client.on_message = on_message

    def stop(_s: int, _f: FrameType | None) -> None:
        client.disconnect()

    signal.signal(signal.SIGTERM, stop)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=60)
    client.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
