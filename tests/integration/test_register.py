"""The device register on the real database: `devices import|list|show` run in-process, and the real
service writing devices that a CSV registered (issue #15, part 1)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest.cli import main
from tests.integration.harness import IngestProcess, Publisher, count, native, write_config
from tests.services import Mosquitto, wait_until

pytestmark = pytest.mark.integration

HANOI = (
    "device,make,model,source,expected_interval,district,lat,lon,installation_height\n"
    "hn-aq-001,Sensirion,SPS30,hanoi-air,5m,Hoan Kiem,21.0285,105.8542,3.5\n"
    "hn-aq-002,Sensirion,SPS30,hanoi-air,300,Ba Dinh,21.0341,105.8372,4\n"
    "hn-wl-001,Vega,Puls 31,hanoi-water,60s,Tay Ho,21.0590,105.8210,-1.25\n"
)


class Cli:
    """`sensor-ingest ...` in this process, on the test's database."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = main(list(argv))
        out, err = self.capsys.readouterr()
        return rc, out, err


@pytest.fixture
def cli(database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    for name in list(os.environ):
        if name.upper().startswith("SENSOR_INGEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", database_url)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main() installs its own root handler
    yield Cli(capsys)
    root.handlers[:] = handlers
    root.setLevel(level)


def csv_file(tmp_path: Path, text: str, name: str = "devices.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def register(url: str) -> list[tuple[Any, ...]]:
    """The whole devices table."""
    with psycopg.connect(url) as c:
        return c.execute("SELECT * FROM devices ORDER BY id").fetchall()


def devices(url: str) -> dict[str, tuple[Any, ...]]:
    """uid -> (make, model, source, expected_interval, attributes, last_seen is null)."""
    with psycopg.connect(url) as c:
        rows = c.execute("SELECT uid, make, model, source, expected_interval, attributes, last_seen IS NULL"
                         " FROM devices").fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def test_import_adds_then_updates_merging_and_leaving_empty_cells_alone(cli: Cli, database_url: str,
                                                                          tmp_path: Path) -> None:
    with psycopg.connect(database_url) as c:  # a device the service created from its readings
        c.execute("INSERT INTO devices (uid, source, attributes, last_seen) VALUES"
                  " ('hn-aq-003', 'native', '{\"gateway\": \"gw-7\"}', '2026-01-02T03:04:05Z')")
    assert cli("devices", "import", str(csv_file(tmp_path, HANOI))) == (0, "3 devices added, 0 updated\n", "")
    hoan_kiem = {"district": "Hoan Kiem", "lat": 21.0285, "lon": 105.8542, "installation_height": 3.5}
    assert devices(database_url) == {
        "hn-aq-001": ("Sensirion", "SPS30", "hanoi-air", 300.0, hoan_kiem, True),
        "hn-aq-002": ("Sensirion", "SPS30", "hanoi-air", 300.0,
                      {"district": "Ba Dinh", "lat": 21.0341, "lon": 105.8372, "installation_height": 4}, True),
        "hn-wl-001": ("Vega", "Puls 31", "hanoi-water", 60.0,
                      {"district": "Tay Ho", "lat": 21.059, "lon": 105.821, "installation_height": -1.25}, True),
        "hn-aq-003": (None, None, "native", None, {"gateway": "gw-7"}, False),
    }

    second = csv_file(tmp_path, (
        "Device,Model,District,Owner,expected_interval,source,make\n"
        "hn-aq-001,SPS30-B,,URENCO,,,\n"             # model changed, a new attribute, the rest left alone
        "hn-aq-002,SPS30,Ba Dinh,,5m,,\n"             # as stored
        "hn-aq-003,,Cau Giay,,2m,hanoi-air,Bosch\n"   # the service's device: fields set, attributes merged
        "hn-aq-004,,,,,,\n"                           # new, with nothing but its id
    ), "second.csv")
    assert cli("devices", "import", str(second)) == (0, "1 devices added, 2 updated, 1 unchanged\n", "")
    assert devices(database_url) == {
        "hn-aq-001": ("Sensirion", "SPS30-B", "hanoi-air", 300.0, hoan_kiem | {"owner": "URENCO"}, True),
        "hn-aq-002": ("Sensirion", "SPS30", "hanoi-air", 300.0,
                      {"district": "Ba Dinh", "lat": 21.0341, "lon": 105.8372, "installation_height": 4}, True),
        "hn-wl-001": ("Vega", "Puls 31", "hanoi-water", 60.0,
                      {"district": "Tay Ho", "lat": 21.059, "lon": 105.821, "installation_height": -1.25}, True),
        "hn-aq-003": ("Bosch", None, "hanoi-air", 120.0, {"gateway": "gw-7", "district": "Cau Giay"}, False),
        "hn-aq-004": (None, None, None, None, {}, True),
    }
    with psycopg.connect(database_url) as c:
        assert c.execute("SELECT last_seen FROM devices WHERE uid = 'hn-aq-003'").fetchone() == (
            datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),)

    before = register(database_url)
    assert cli("devices", "import", str(second)) == (0, "0 devices added, 0 updated, 4 unchanged\n", "")
    assert register(database_url) == before


def test_a_file_with_one_bad_row_leaves_the_register_exactly_unchanged(cli: Cli, database_url: str,
                                                                        tmp_path: Path) -> None:
    assert cli("devices", "import", str(csv_file(tmp_path, HANOI)))[0] == 0
    before = register(database_url)
    rows = [f"hn-aq-{i:03d},Bosch,BME680,,,Dong Da,21.01,105.82,\n" for i in range(100, 150)]
    bad = csv_file(tmp_path, (
        "device,make,model,source,expected_interval,district,lat,lon,notes\n"
        "hn-aq-001,Sensirion,SPS40,,,,,,\"replaced\nin May\"\n"  # an update, over lines 2-3
        + "".join(rows)                                           # lines 4-53: new devices
        + "hn-aq-999,Bosch,BME680,,,Dong Da,21.01,1058.2,\n"      # line 54: lon out of range
        + "".join(r.replace("hn-aq-1", "hn-aq-2") for r in rows)  # lines 55-104
    ), "bad.csv")
    rc, out, err = cli("devices", "import", str(bad))
    assert (rc, out) == (1, "")
    assert err == (f"sensor-ingest: {bad}: 1 problem(s); nothing imported:\n"
                   "  line 54: lon 1058.2 is out of range: lon lies between -180 and 180\n")
    assert register(database_url) == before

    rc, out, err = cli("devices", "import", str(bad), "--dry-run")
    assert (rc, out) == (1, "")
    assert register(database_url) == before


def test_dry_run_reports_what_would_change_and_writes_nothing(cli: Cli, database_url: str, tmp_path: Path) -> None:
    assert cli("devices", "import", str(csv_file(tmp_path, HANOI)))[0] == 0
    before = register(database_url)
    change = csv_file(tmp_path, "device,model,expected_interval,district,lat\n"
                                "hn-aq-001,SPS30,,Hoan Kiem,21.0285\n"
                                "hn-aq-002,SPS40,10m,Dong Da,\n"
                                "hn-new-1,,1h,,21\n", "change.csv")
    assert cli("devices", "import", str(change), "--dry-run") == (0, (
        "+ hn-new-1 (line 4, new): expected_interval=1h, lat=21\n"
        "~ hn-aq-002 (line 3): model SPS30 -> SPS40, expected_interval 5m -> 10m, district Ba Dinh -> Dong Da\n"
        "dry run: 1 devices would be added, 1 updated, 1 unchanged; nothing written\n"), "")
    assert register(database_url) == before
    assert cli("devices", "import", str(change)) == (0, "1 devices added, 1 updated, 1 unchanged\n", "")
    assert register(database_url) != before


def cells(out: str) -> list[list[str]]:
    """The rows of the tables in ``out`` (rich separates cells with vertical bars), headers included."""
    return [[c.strip() for c in re.split("[│┃]", line)] for line in out.splitlines() if re.search("[│┃]", line)]


def listed(cli: Cli, *filters: str) -> list[str]:
    rc, out, err = cli("devices", "list", "--json", *filters)
    assert (rc, err) == (0, "")
    return [d["device"] for d in json.loads(out)]


def test_list_filters(cli: Cli, database_url: str, tmp_path: Path) -> None:
    assert cli("devices", "import", str(csv_file(tmp_path, HANOI + "hn_aq_x,Bosch,,,,Ba Dinh,,,\n")))[0] == 0
    with psycopg.connect(database_url) as c:
        c.execute("UPDATE devices SET last_seen = '2026-03-04T05:06:07Z' WHERE uid = 'hn-aq-002'")
    everyone = ["hn-aq-001", "hn-aq-002", "hn-wl-001", "hn_aq_x"]
    assert listed(cli) == everyone
    assert listed(cli, "--where", "district=Ba Dinh") == ["hn-aq-002", "hn_aq_x"]
    assert listed(cli, "--where", "district=Ba Dinh", "--where", "make=Bosch") == []  # make is no attribute
    assert listed(cli, "--where", "District=Ba Dinh", "--make", "Bosch") == ["hn_aq_x"]
    assert listed(cli, "--where", "lat=21.0341") == ["hn-aq-002"]  # a number compared as its text
    assert listed(cli, "--where", "installation_height=4") == ["hn-aq-002"]
    assert listed(cli, "--where", "district=ba dinh") == []
    assert listed(cli, "--device", "hn-aq-*") == ["hn-aq-001", "hn-aq-002"]  # _ is no wildcard
    assert listed(cli, "--device", "hn?aq?00?") == ["hn-aq-001", "hn-aq-002"]
    assert listed(cli, "--device", "hn_*") == ["hn_aq_x"]
    assert listed(cli, "--never-seen") == ["hn-aq-001", "hn-wl-001", "hn_aq_x"]
    assert listed(cli, "--source", "hanoi-water") == ["hn-wl-001"]
    assert listed(cli, "--limit", "2") == everyone[:2]

    rc, out, _ = cli("devices", "list", "--json", "--device", "hn-aq-002")
    assert json.loads(out) == [{
        "device": "hn-aq-002", "make": "Sensirion", "model": "SPS30", "source": "hanoi-air", "expected_interval": 300.0,
        "attributes": {"district": "Ba Dinh", "lat": 21.0341, "lon": 105.8372, "installation_height": 4},
        "first_seen": json.loads(out)[0]["first_seen"], "last_seen": "2026-03-04T05:06:07+00:00"}]
    assert json.loads(out)[0]["first_seen"] is not None  # seen: it has a first seen
    assert json.loads(cli("devices", "list", "--json", "--device", "hn-aq-001")[1])[0]["first_seen"] is None

    rc, out, err = cli("devices", "list", "--where", "district=Ba Dinh")
    assert (rc, err) == (0, "")
    assert out.splitlines()[0].rstrip() == "devices (2)"
    assert cells(out) == [
        ["device", "make", "model", "source", "district", "expected interval", "first seen", "last seen",
         "other attributes"],
        ["hn-aq-002", "Sensirion", "SPS30", "hanoi-air", "Ba Dinh", "5m", cells(out)[1][6], "2026-03-04 05:06:07Z",
         "installation_height=4, lat=21.0341, lon=105.8372"],
        ["hn_aq_x", "Bosch", "-", "-", "Ba Dinh", "-", "-", "never", ""],
    ]
    assert re.fullmatch(r"20\d\d-\d\d-\d\d \d\d:\d\d:\d\dZ", cells(out)[1][6])
    assert cli("devices", "list", "--where", "district=Nowhere") == (0, "no devices match\n", "")
    rc, out, _ = cli("devices", "list", "--limit", "2")
    assert out.splitlines()[-1].rstrip() == "(the first 2; --limit N shows more)"


def test_show_a_device_with_its_series_calibrations_and_rejections(cli: Cli, database_url: str,
                                                                   tmp_path: Path) -> None:
    assert cli("devices", "import", str(csv_file(tmp_path, HANOI)))[0] == 0
    now = datetime.now(UTC).replace(microsecond=0)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with psycopg.connect(database_url) as c:
        (dev,) = c.execute("SELECT id FROM devices WHERE uid = 'hn-aq-001'").fetchone() or ()
        (other,) = c.execute("SELECT id FROM devices WHERE uid = 'hn-aq-002'").fetchone() or ()
        pm25, temp, status = (c.execute("INSERT INTO metrics (name, unit, kind) VALUES (%s, %s, %s) RETURNING id",
                                        m).fetchone()[0]  # type: ignore[index]
                              for m in (("pm25", "ug/m3", "number"), ("temperature", "degC", "number"),
                                        ("status", None, "state")))
        c.execute("UPDATE devices SET last_seen = %s WHERE id = %s", (t0 + timedelta(days=2), dev))
        for i in range(5):  # pm25 over three days' chunks, the last one suspect
            c.execute("INSERT INTO readings VALUES (%s, %s, %s, %s, %s)",
                      (t0 + timedelta(hours=12 * i), dev, pm25, 10.0 + i, 1 if i == 4 else 0))
        c.execute("INSERT INTO readings VALUES (%s, %s, %s, 28.5, 2)", (t0 + timedelta(hours=1), dev, temp))
        c.execute("INSERT INTO readings VALUES (%s, %s, %s, 99, 0)", (t0 + timedelta(days=9), other, pm25))
        c.execute("INSERT INTO states VALUES (%s, %s, %s, 'ok', 0)", (t0, dev, status))
        c.execute("INSERT INTO calibrations (device_id, metric_id, effective_from, scale, offset_value, comment,"
                  " rewrite_cursor, rewritten) VALUES (%s, %s, %s, 1.1, -0.5, 'lab 2026-01', NULL, 5),"
                  " (%s, %s, %s, 1.2, 0, NULL, %s, 2)",
                  (dev, pm25, t0, dev, pm25, t0 + timedelta(days=1), t0 + timedelta(days=1, hours=12)))
        for when, reason in ((now - timedelta(hours=1), "out_of_range"), (now - timedelta(hours=2), "out_of_range"),
                             (now - timedelta(hours=3), "bad_time"), (now - timedelta(hours=25), "bad_time"),
                             (now - timedelta(hours=1), "malformed")):
            c.execute("INSERT INTO rejected_messages (received_at, source, topic, payload, reason, detail, device_uid)"
                      " VALUES (%s, 'hanoi-air', 't', '\\x00', %s, 'd', %s)",
                      (when, reason, "hn-aq-001" if reason != "malformed" else "hn-aq-002"))

    rc, out, err = cli("devices", "show", "hn-aq-001", "--json")
    assert (rc, err) == (0, "")
    shown = json.loads(out)
    assert shown.pop("first_seen") is not None
    assert shown == {
        "device": "hn-aq-001", "make": "Sensirion", "model": "SPS30", "source": "hanoi-air", "expected_interval": 300.0,
        "attributes": {"district": "Hoan Kiem", "lat": 21.0285, "lon": 105.8542, "installation_height": 3.5},
        "last_seen": "2026-01-03T00:00:00+00:00",
        "series": [
            {"metric": "pm25", "unit": "ug/m3", "kind": "number", "last_time": "2026-01-03T00:00:00+00:00",
             "last_value": 14.0, "flags": 1},
            {"metric": "status", "unit": None, "kind": "state", "last_time": "2026-01-01T00:00:00+00:00",
             "last_value": "ok", "flags": 0},
            {"metric": "temperature", "unit": "degC", "kind": "number", "last_time": "2026-01-01T01:00:00+00:00",
             "last_value": 28.5, "flags": 2},
        ],
        "calibrations": [
            {"metric": "pm25", "effective_from": "2026-01-01T00:00:00+00:00", "scale": 1.1, "offset_value": -0.5,
             "comment": "lab 2026-01", "rewrite_cursor": None, "rewritten": 5},
            {"metric": "pm25", "effective_from": "2026-01-02T00:00:00+00:00", "scale": 1.2, "offset_value": 0.0,
             "comment": None, "rewrite_cursor": "2026-01-02T12:00:00+00:00", "rewritten": 2},
        ],
        "rejections_24h": [
            {"reason": "out_of_range", "count": 2, "last": (now - timedelta(hours=1)).isoformat()},
            {"reason": "bad_time", "count": 1, "last": (now - timedelta(hours=3)).isoformat()},
        ],
    }

    rc, out, err = cli("devices", "show", "hn-aq-001")
    assert (rc, err) == (0, "")
    text = [" ".join(line.split()) for line in out.splitlines()]
    assert text[:5] == ["device hn-aq-001", "make Sensirion", "model SPS30", "source hanoi-air",
                        "expected interval 5m"]
    assert re.fullmatch(r"first seen 20\d\d-\d\d-\d\d \d\d:\d\d:\d\dZ", text[5])
    assert text[6:12] == ["last seen 2026-01-03 00:00:00Z", "attributes", "district Hoan Kiem",
                          "installation_height 3.5", "lat 21.0285", "lon 105.8542"]
    assert cells(out) == [
        ["metric", "unit", "kind", "last reading", "value", "flags"],
        ["pm25", "ug/m3", "number", "2026-01-03 00:00:00Z", "14.0", "suspect"],
        ["status", "-", "state", "2026-01-01 00:00:00Z", "ok", "-"],
        ["temperature", "degC", "number", "2026-01-01 01:00:00Z", "28.5", "receive time"],
        ["metric", "effective from", "scale", "offset", "status", "readings rewritten", "comment"],
        ["pm25", "2026-01-01 00:00:00Z", "1.1", "-0.5", "applied", "5", "lab 2026-01"],
        ["pm25", "2026-01-02 00:00:00Z", "1.2", "0.0", "readings from 2026-01-02 12:00:00Z on not yet rewritten: run "
         "`sensor-ingest devices recalibrate hn-aq-001 pm25`", "2", "-"],
        ["reason", "messages", "last"],
        ["out_of_range", "2", (now - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%SZ")],
        ["bad_time", "1", (now - timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%SZ")],
    ]

    rc, out, err = cli("devices", "show", "hn-wl-001")
    assert rc == 0
    assert out.splitlines()[-3:] == ["series: none (no reading stored)", "calibrations: none",
                                     "rejections in the last 24 h: none"]
    assert "last seen never (no reading yet)" in [" ".join(line.split()) for line in out.splitlines()]


def test_show_an_unknown_device_hints_how_to_find_it(cli: Cli, tmp_path: Path) -> None:
    assert cli("devices", "import", str(csv_file(tmp_path, HANOI)))[0] == 0
    assert cli("devices", "show", "HN-AQ-00") == (1, "", (
        "sensor-ingest: no device 'HN-AQ-00' in the register (did you mean 'hn-aq-001', 'hn-aq-002'?); find it with "
        "`sensor-ingest devices list --device 'HN-AQ-*'`\n"))
    assert cli("devices", "show", "zz%") == (1, "", (
        "sensor-ingest: no device 'zz%' in the register; find it with `sensor-ingest devices list --device 'zz%*'`\n"))


def test_the_service_keeps_what_the_register_says_and_adds_the_topics_district(
        database_url: str, broker: Mosquitto, topic_prefix: str, tmp_path: Path, cli: Cli,
        ingests: list[IngestProcess]) -> None:
    assert cli("devices", "import", str(csv_file(tmp_path, (
        "device,make,model,source,lat,lon\n"
        "hn-reg-1,Sensirion,SPS30,hanoi-air,21.0285,105.8542\n"
        "hn-reg-2,Bosch,BME280,,,\n"))))[1] == "2 devices added, 0 updated\n"
    config = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url,
                          mqtt_url=broker.url, extra=(
                              "[[sources]]\n"
                              'name = "by-district"\n'
                              f'topic = "{topic_prefix}/d/{{district}}/{{device}}/up"\n'
                              'format = "native"\n'))
    ingest = IngestProcess(config, tmp_path / "ingest.log")
    ingests.append(ingest)
    ingest.start()
    t = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0).isoformat()
    publisher = Publisher(broker.port)
    try:
        publisher.publish_all([
            (f"{topic_prefix}/d/hoan-kiem/hn-reg-1/up", native("hn-reg-1", t, {"pm25": 12.5})),
            (f"{topic_prefix}/d/ba-dinh/hn-new-1/up", native("hn-new-1", t, {"pm25": 30.0})),
            (f"{topic_prefix}/d/ba-dinh/hn-reg-2/up", native("hn-reg-2", t, {"pm25": 8.0})),
        ])
    finally:
        publisher.close()
    wait_until(lambda: count(database_url, "readings") == 3, 60, "the three readings")
    wait_until(lambda: all(not d[5] for d in devices(database_url).values()), 60, "last_seen of both devices")
    assert devices(database_url) == {
        "hn-reg-1": ("Sensirion", "SPS30", "hanoi-air", None,
                     {"lat": 21.0285, "lon": 105.8542, "district": "hoan-kiem"}, False),
        "hn-new-1": (None, None, "by-district", None, {"district": "ba-dinh"}, False),
        # Imported without a source: the first source that writes it fills it in.
        "hn-reg-2": ("Bosch", "BME280", "by-district", None, {"district": "ba-dinh"}, False),
    }
    assert count(database_url, "rejected_messages") == 0
    assert listed(cli, "--where", "district=hoan-kiem") == ["hn-reg-1"]

    rc, out, _ = cli("devices", "show", "hn-reg-1", "--json")
    assert rc == 0
    assert json.loads(out)["series"] == [{"metric": "pm25", "unit": "ug/m3", "kind": "number",
                                          "last_time": datetime.fromisoformat(t).astimezone(UTC).isoformat(),
                                          "last_value": 12.5, "flags": 0}]
