"""The `sensor-ingest` command: its help (through the installed entry point) and `decode`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("sensor-ingest")
SHORT_ENV_NAMES = ("SENSOR_INGEST_DATABASE_URL", "SENSOR_INGEST_MQTT_URL", "SENSOR_INGEST_HTTP_ADDR")


def _run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.exists(), f"no entry point at {SCRIPT}: install the project (pip install -e .)"
    # The checkout under test comes first on the path, whatever the venv's install points at.
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [str(SCRIPT), *args], input=stdin, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False
    )


def test_help_names_the_environment_variables() -> None:
    result = _run("--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sensor-ingest")
    for name in SHORT_ENV_NAMES:
        assert name in result.stdout
    assert "SENSOR_INGEST_<SECTION>__<KEY>" in result.stdout
    for command in ("run", "migrate", "check-config", "decode"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["run", "migrate", "check-config", "decode"])
def test_subcommand_help(command: str) -> None:
    result = _run(command, "--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: sensor-ingest {command}")
    # Each command is configured through the environment; its help should say with which names.
    assert "SENSOR_INGEST_" in result.stdout, f"`sensor-ingest {command} --help` names no SENSOR_INGEST_* variable"


def test_version() -> None:
    result = _run("--version")

    assert result.returncode == 0
    assert result.stdout.startswith("sensor-ingest ")


def test_no_command_is_a_usage_error() -> None:
    result = _run()

    assert result.returncode == 2
    assert "usage: sensor-ingest" in result.stderr


@pytest.mark.usefixtures("_restore_logging")
def test_decode_prints_json_readings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = tmp_path / "payload.json"
    payload.write_text(
        '{"device": "aq-1", "time": "2024-05-01T10:00:00+07:00", "readings": {"pm25": 35.2, "door": true}}',
        encoding="utf-8",
    )

    code = main(["decode", "--format", "native", "--topic", "x/y", str(payload)])

    out, _ = capsys.readouterr()
    assert code == 0
    result = json.loads(out)
    assert result["topic"] == "x/y"
    assert result["rejection"] is None
    assert result["readings"] == [
        {"device": "aq-1", "metric": "pm25", "time": "2024-05-01T03:00:00+00:00", "value": 35.2,
         "unit": "ug/m3", "flags": 0},
        {"device": "aq-1", "metric": "door", "time": "2024-05-01T03:00:00+00:00", "value": True,
         "unit": None, "flags": 0},
    ]


@pytest.mark.usefixtures("_restore_logging")
def test_decode_prints_the_rejection_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"not json")

    code = main(["decode", "--format", "native", "--topic", "x/y", str(payload)])

    out, _ = capsys.readouterr()
    assert code == 1
    result = json.loads(out)
    assert result["readings"] == []
    assert result["rejection"]["reason"] == "malformed"
    assert result["rejection"]["detail"]


def test_decode_reads_standard_input() -> None:
    payload = '{"device": "aq-2", "time": "2024-05-01T03:00:00Z", "readings": {"no2": 12.5}}'
    result = _run("decode", "--format", "native", "--topic", "x/y", stdin=payload)

    assert result.returncode == 0, result.stderr
    readings = json.loads(result.stdout)["readings"]
    assert [(r["device"], r["metric"], r["value"]) for r in readings] == [("aq-2", "no2", 12.5)]



@pytest.mark.parametrize(
    ("env", "url"),
    [
        ("SENSOR_INGEST_DATABASE_URL", "postgresql://u:pa:s3cret@[bad/db"),
        ("SENSOR_INGEST_MQTT_URL", "mqtt://u:s3cret@host:99999"),
        ("SENSOR_INGEST_MQTT_URL", "mqtt://u:s3cret/x@broker"),
    ],
)
def test_check_config_with_a_bad_env_url_prints_no_password(env: str, url: str) -> None:
    result = _run("check-config", "--show", "deploy/sensor-ingest.example.toml", env={env: url})

    assert result.returncode == 2, result.stderr
    assert "invalid configuration" in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stdout + result.stderr


@pytest.mark.usefixtures("_restore_logging")
def test_an_unexpected_error_is_reported_with_its_secrets_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(path: object) -> None:
        raise RuntimeError("lost postgresql://ingest:hunter2@db/x?password=hunter3")

    monkeypatch.setattr("ingest.cli.load_settings", boom)

    assert main(["check-config", "x.toml"]) == 1

    out, err = capsys.readouterr()
    assert "RuntimeError" in err
    assert "Traceback" in err
    assert "postgresql://ingest:***@db/x" in err
    assert "hunter" not in out + err


@pytest.mark.usefixtures("_restore_logging")
def test_a_migrate_error_is_printed_masked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ingest.errors import MigrationError

    def fail(url: str, connect_timeout: float) -> list[str]:
        raise MigrationError(f"server said: bad option in {url!r}")

    monkeypatch.setattr("ingest.store.migrate.migrate", fail)
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", "postgresql://ingest:hunter2@127.0.0.1:1/x")
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_PASSWORD", "hunter3")

    assert main(["migrate"]) == 1

    _, err = capsys.readouterr()
    assert "migrate failed" in err
    assert "hunter" not in err


CASES = Path(__file__).resolve().parents[1] / "decoders" / "cases"
# One real payload per family, decoded with no config file at all: (format, case, topic, extra args,
# the (device, metric, value) of its first reading).
NO_CONFIG = [
    ("native", "native/map_form", "x/y", [], None),
    ("senml", "senml/rfc8428_single_datapoint", "senml/up", [], ("urn:dev:ow:10e2073a01080063", "value", 23.1)),
    ("json", "json/zigbee2mqtt_flat", "zigbee2mqtt/0x00158d0001dc126a", ["--template", "zigbee2mqtt/{device}"],
     ("0x00158d0001dc126a", "temperature", 27.34)),
    ("json", "json/zigbee2mqtt_flat", "zigbee2mqtt/0x00158d0001dc126a", [],  # the zigbee2mqtt preset's device
     ("0x00158d0001dc126a", "temperature", 27.34)),
    ("json", "json/zigbee2mqtt_flat", "unknown/0x00158d0001dc126a", [],  # no source: the whole topic
     ("unknown/0x00158d0001dc126a", "temperature", 27.34)),
    ("lorawan", "lorawan/tts_uplink_data_formats", "v3/app1@tenant1/devices/dev1/up", [], None),
    ("line", "line/telegraf_system_host", "telegraf/x", [], None),
    ("value", "value/esphome_sensor_float", "attic-powerwall/sensor/firstfloor_inverter_energy_yesterday/state",
     ["--template", "{device}/#"], ("attic-powerwall", "sensor.firstfloor_inverter_energy_yesterday", 0.105)),
]


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize(("fmt", "case", "topic", "extra", "first"), NO_CONFIG,
                         ids=[f"{c[0]}-{'template' if c[3] else 'bare'}" for c in NO_CONFIG])
def test_decode_reads_every_family_with_no_config(
    fmt: str, case: str, topic: str, extra: list[str], first: tuple[str, str, float] | None,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The golden case's readings, through the command: same devices (unless the topic is the device),
    metrics and values as the decoder test expects."""
    for name in list(os.environ):
        if name.startswith("SENSOR_INGEST_"):
            monkeypatch.delenv(name)
    expected = json.loads((CASES / case / "expected.json").read_text(encoding="utf-8"))["readings"]

    code = main(["decode", "--format", fmt, "--topic", topic, *extra, str(CASES / case / "payload")])

    out, _ = capsys.readouterr()
    result = json.loads(out)
    assert code == 0, result
    got = [(r["device"], r["metric"], r["value"]) for r in result["readings"]]
    assert [(m, v) for _, m, v in got] == [(r["metric"], r["value"]) for r in expected]
    if first is not None:
        assert got[0] == first
    else:
        assert [d for d, _, _ in got] == [r["device"] for r in expected]
