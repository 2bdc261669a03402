"""load_settings(): file + environment -> one typed Settings, or a ConfigError naming every problem.

Also `sensor-ingest check-config`, which is load_settings() with an exit code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.cli import main
from ingest.errors import ConfigError, ConfigProblem
from ingest.settings import MqttSettings, load_settings, mask_url

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "sensor-ingest.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sensor-ingest.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _problems(tmp_path: Path, text: str) -> list[ConfigProblem]:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in info.value.source
    assert info.value.problems
    return info.value.problems


def _only(problems: list[ConfigProblem]) -> ConfigProblem:
    assert len(problems) == 1, problems
    return problems[0]


# --- defaults and overrides ---------------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    s = load_settings()

    assert s.database.url == "postgresql://postgres@127.0.0.1:5432/sensor_ingest"
    assert s.database.password is None
    assert s.mqtt.url == "mqtt://127.0.0.1:1883"
    assert s.mqtt.client_id == "sensor-ingest-1"
    assert s.mqtt.qos == 1
    assert s.mqtt.receive_maximum == 4096
    assert s.http.addr == "127.0.0.1:8080"
    assert s.ingest.batch_max_messages == 1000
    assert s.ingest.max_future == 600.0
    assert s.log.level == "info"
    assert s.sources == []


def test_the_example_file_loads_with_its_documented_defaults() -> None:
    s = load_settings(EXAMPLE)

    assert s == load_settings().model_copy(update={"sources": s.sources})
    assert [src.name for src in s.sources] == ["native", "senml", "gateways"]
    assert s.sources[0].topic == "city/{district}/{device}/up"


def test_file_values_are_read(tmp_path: Path) -> None:
    path = _write(tmp_path, """
        [mqtt]
        url = "mqtts://broker.city.example:8884"
        client_id = "ingest-7"
        receive_maximum = 100

        [ingest]
        batch_max_age = 0.5

        [[sources]]
        name = "aq"
        topic = "city/{device}/up"
        format = "senml"
        timezone = "Asia/Ho_Chi_Minh"
    """)

    s = load_settings(path)

    assert s.mqtt.url == "mqtts://broker.city.example:8884"
    assert s.mqtt.client_id == "ingest-7"
    assert s.mqtt.receive_maximum == 100
    assert s.ingest.batch_max_age == 0.5
    assert s.sources[0].format == "senml"
    assert s.sources[0].timezone == "Asia/Ho_Chi_Minh"


FILE_WITH_ALL_THREE = """
[database]
url = "postgresql://file@file-db:5432/from_file"
[mqtt]
url = "mqtt://file-broker:1883"
client_id = "from-file"
[http]
addr = "127.0.0.1:1111"
"""


@pytest.mark.parametrize(
    ("env", "value", "section", "key"),
    [
        ("SENSOR_INGEST_DATABASE_URL", "postgresql://env@env-db:5433/from_env", "database", "url"),
        ("SENSOR_INGEST_MQTT_URL", "mqtts://env-broker:8883", "mqtt", "url"),
        ("SENSOR_INGEST_HTTP_ADDR", "0.0.0.0:9090", "http", "addr"),
    ],
)
def test_short_env_names_override_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str, value: str, section: str, key: str
) -> None:
    monkeypatch.setenv(env, value)

    s = load_settings(_write(tmp_path, FILE_WITH_ALL_THREE))

    assert getattr(getattr(s, section), key) == value
    # The rest of the file still applies.
    assert s.mqtt.client_id == "from-file"


def test_short_env_names_are_enough_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", "postgresql://env@env-db/x")
    monkeypatch.setenv("SENSOR_INGEST_MQTT_URL", "mqtt://env-broker")
    monkeypatch.setenv("SENSOR_INGEST_HTTP_ADDR", "0.0.0.0:9090")

    s = load_settings()

    assert s.database.url == "postgresql://env@env-db/x"
    assert s.mqtt.url == "mqtt://env-broker"
    assert s.http.addr == "0.0.0.0:9090"


def test_nested_env_override_keeps_the_rest_of_the_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_MQTT__CLIENT_ID", "ingest-2")

    s = load_settings(_write(tmp_path, FILE_WITH_ALL_THREE))

    assert s.mqtt.client_id == "ingest-2"
    assert s.mqtt.url == "mqtt://file-broker:1883"


def test_nested_env_override_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_MQTT__CLIENT_ID", "ingest-3")
    monkeypatch.setenv("SENSOR_INGEST_INGEST__BATCH_MAX_MESSAGES", "7")

    s = load_settings()

    assert s.mqtt.client_id == "ingest-3"
    assert s.ingest.batch_max_messages == 7


def test_short_env_name_wins_over_the_nested_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_MQTT__URL", "mqtt://nested-broker")
    monkeypatch.setenv("SENSOR_INGEST_MQTT_URL", "mqtt://short-broker")

    assert load_settings().mqtt.url == "mqtt://short-broker"


def test_passwords_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_PASSWORD", "db-s3cret")
    monkeypatch.setenv("SENSOR_INGEST_MQTT_PASSWORD", "mq-s3cret")

    s = load_settings(EXAMPLE)

    assert s.database.password is not None
    assert s.database.password.get_secret_value() == "db-s3cret"
    assert s.mqtt.password is not None
    assert s.mqtt.password.get_secret_value() == "mq-s3cret"
    assert "s3cret" not in repr(s)


def test_bad_value_from_the_environment_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_HTTP_ADDR", "no-port")

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert info.value.source == "environment"
    assert _only(info.value.problems).key == "http.addr"


# --- problems in the file -----------------------------------------------------------------------


def test_unknown_key_suggests_the_known_one(tmp_path: Path) -> None:
    p = _only(_problems(tmp_path, "[mqtt]\nrecieve_maximum = 100\n"))

    assert p.key == "mqtt.recieve_maximum"
    assert p.message == "unknown key"
    assert "'receive_maximum'" in p.fix


def test_unknown_section_suggests_the_known_one(tmp_path: Path) -> None:
    p = _only(_problems(tmp_path, "[mqqt]\nurl = 'mqtt://h'\n"))

    assert p.key == "mqqt"
    assert "'mqtt'" in p.fix


def test_unknown_key_without_a_close_match_lists_the_known_keys(tmp_path: Path) -> None:
    p = _only(_problems(tmp_path, "[http]\nzzzzzz = 1\n"))

    assert p.key == "http.zzzzzz"
    assert "addr" in p.fix


def test_wrong_type_names_the_key_and_the_value(tmp_path: Path) -> None:
    p = _only(_problems(tmp_path, '[mqtt]\nreceive_maximum = "lots"\n'))

    assert p.key == "mqtt.receive_maximum"
    assert "'lots'" in p.fix


def test_out_of_range_names_the_key(tmp_path: Path) -> None:
    p = _only(_problems(tmp_path, "[mqtt]\nreceive_maximum = 0\n"))

    assert p.key == "mqtt.receive_maximum"
    assert "0" in p.fix


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ('[database]\nurl = "mysql://h/db"\n', "database.url", "postgresql://"),
        ('[mqtt]\nurl = "http://broker:1883"\n', "mqtt.url", "mqtt://"),
        ('[mqtt]\nurl = "mqtt://:1883"\n', "mqtt.url", "no host"),
        ('[mqtt]\nurl = "mqtt://broker:99999"\n', "mqtt.url", "port"),
    ],
)
def test_bad_urls_name_the_key(tmp_path: Path, text: str, key: str, hint: str) -> None:
    p = _only(_problems(tmp_path, text))

    assert p.key == key
    assert hint in p.message


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    problems = _problems(tmp_path, """
        [mqtt]
        recieve_maximum = 1
        keepalive = "often"
        [database]
        url = "mysql://h/db"
    """)

    assert {p.key for p in problems} == {"mqtt.recieve_maximum", "mqtt.keepalive", "database.url"}


def test_password_in_the_file_url_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, '[database]\nurl = "postgresql://ingest:hunter2@db:5432/x"\n')

    with pytest.raises(ConfigError) as info:
        load_settings(path)

    p = _only(info.value.problems)
    assert p.key == "database.url"
    assert "SENSOR_INGEST_DATABASE_PASSWORD" in p.fix
    assert "hunter2" not in str(info.value)


def test_password_in_the_environment_url_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://ingest:hunter2@db:5432/x"
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", url)

    assert load_settings(_write(tmp_path, FILE_WITH_ALL_THREE)).database.url == url
    assert load_settings().database.url == url


def test_password_in_the_file_mqtt_url_is_refused(tmp_path: Path) -> None:
    p = _only(_problems(tmp_path, '[mqtt]\nurl = "mqtt://ingest:hunter2@broker:1883"\n'))

    assert p.key == "mqtt.url"
    assert "SENSOR_INGEST_MQTT_PASSWORD" in p.fix
    assert "hunter2" not in str(p)


@pytest.mark.parametrize(
    ("section", "env"),
    [("mqtt", "SENSOR_INGEST_MQTT_PASSWORD"), ("database", "SENSOR_INGEST_DATABASE_PASSWORD")],
)
def test_password_key_in_the_file_is_refused(tmp_path: Path, section: str, env: str) -> None:
    path = _write(tmp_path, f'[{section}]\npassword = "hunter2"\n')

    with pytest.raises(ConfigError) as info:
        load_settings(path)

    p = _only(info.value.problems)
    assert p.key == f"{section}.password"
    assert env in p.fix
    assert "hunter2" not in str(info.value)


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    p = _only(_problems(tmp_path, "[mqtt\nurl = 1\n"))

    assert "not valid TOML" in p.message
    assert "line 1" in p.message


def test_a_file_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[mqtt]\nclient_id = "caf\xe9"\n')

    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as info:
        load_settings(path)

    assert str(path) in info.value.source
    assert "cannot read the file" in _only(info.value.problems).message


SOURCE = '[[sources]]\nname = "{name}"\ntopic = "{topic}"\nformat = "{format}"\n'


@pytest.mark.parametrize(
    ("fields", "key", "hint"),
    [
        ({"format": "xml"}, "sources[0].format", "native, senml"),
        ({"topic": "city/{device}x/up"}, "sources[0].topic", "{device}x"),
        ({"topic": "city/{d}/{d}"}, "sources[0].topic", "twice"),
        ({"topic": "$SYS/#"}, "sources[0].topic", "$"),
    ],
)
def test_bad_source_names_the_key(tmp_path: Path, fields: dict[str, str], key: str, hint: str) -> None:
    values = {"name": "aq", "topic": "city/{device}/up", "format": "native", **fields}
    p = _only(_problems(tmp_path, SOURCE.format(**values)))

    assert p.key == key
    assert hint in p.message


def test_unknown_timezone_names_the_key(tmp_path: Path) -> None:
    text = SOURCE.format(name="aq", topic="city/{device}/up", format="native") + 'timezone = "Mars/Olympus"\n'
    p = _only(_problems(tmp_path, text))

    assert p.key == "sources[0].timezone"
    assert "Mars/Olympus" in p.message


def test_problem_in_the_second_source_names_its_index(tmp_path: Path) -> None:
    text = SOURCE.format(name="a", topic="a/{device}", format="native") + SOURCE.format(
        name="b", topic="b/{device}", format="protobuf"
    )
    p = _only(_problems(tmp_path, text))

    assert p.key == "sources[1].format"


def test_source_without_a_name(tmp_path: Path) -> None:
    p = _only(_problems(tmp_path, '[[sources]]\ntopic = "a/{device}"\nformat = "native"\n'))

    assert p.key == "sources[0].name"
    assert p.fix == "add it"


def test_duplicate_source_names_are_refused_naming_the_key(tmp_path: Path) -> None:
    text = SOURCE.format(name="aq", topic="a/{device}", format="native") + SOURCE.format(
        name="aq", topic="b/{device}", format="senml"
    )
    p = _only(_problems(tmp_path, text))

    assert "'aq'" in p.message
    # House rule 5: a config problem names its key, so the operator knows where to look.
    assert p.key.startswith("sources")


# --- check-config -------------------------------------------------------------------------------


@pytest.mark.usefixtures("_restore_logging")
def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0

    out, err = capsys.readouterr()
    assert "OK (3 source(s))" in out
    assert err == ""


@pytest.mark.usefixtures("_restore_logging")
def test_check_config_rejects_a_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "[mqtt]\nrecieve_maximum = 100\n")

    assert main(["check-config", str(path)]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert "mqtt.recieve_maximum" in err
    assert "receive_maximum'" in err
    assert str(path) in err


@pytest.mark.usefixtures("_restore_logging")
def test_check_config_does_not_echo_a_refused_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, '[database]\nurl = "postgresql://ingest:hunter2@db/x"\n')

    assert main(["check-config", str(path)]) == 2

    out, err = capsys.readouterr()
    assert "database.url" in err
    assert "hunter2" not in out + err


@pytest.mark.usefixtures("_restore_logging")
def test_check_config_show_masks_passwords(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", "postgresql://ingest:db-url-s3cret@db:5432/x")
    monkeypatch.setenv("SENSOR_INGEST_MQTT_URL", "mqtt://ingest:mq-url-s3cret@broker:1883")
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_PASSWORD", "db-key-s3cret")
    monkeypatch.setenv("SENSOR_INGEST_MQTT_PASSWORD", "mq-key-s3cret")

    assert main(["check-config", "--show", str(EXAMPLE)]) == 0

    out, _ = capsys.readouterr()
    assert "s3cret" not in out
    first, _, rest = out.partition("\n")
    assert "OK" in first
    shown = json.loads(rest)
    assert shown["database"]["url"] == "postgresql://ingest:***@db:5432/x"
    assert shown["mqtt"]["url"] == "mqtt://ingest:***@broker:1883"
    assert shown["mqtt"]["client_id"] == "sensor-ingest-1"
    assert len(shown["sources"]) == 3


# --- MqttSettings and mask_url ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"url": "mqtt://broker"}, (None, None)),
        ({"url": "mqtt://alice@broker"}, ("alice", None)),
        ({"url": "mqtt://alice:pw@broker"}, ("alice", "pw")),
        ({"url": "mqtt://al%40ce:p%40ss%3Aw@broker"}, ("al@ce", "p@ss:w")),
        ({"url": "mqtt://alice:pw@broker", "username": "bob"}, ("bob", "pw")),
        ({"url": "mqtt://alice:pw@broker", "password": "explicit"}, ("alice", "explicit")),
        ({"url": "mqtt://alice:pw@broker", "username": "bob", "password": "explicit"}, ("bob", "explicit")),
        ({"url": "mqtt://broker", "username": "bob", "password": "explicit"}, ("bob", "explicit")),
    ],
)
def test_mqtt_credentials_precedence(fields: dict[str, str], expected: tuple[str | None, str | None]) -> None:
    assert MqttSettings.model_validate(fields).credentials() == expected


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://broker.city.example", "broker.city.example", 1883, False),
        ("mqtt://broker:1884", "broker", 1884, False),
        ("tcp://broker", "broker", 1883, False),
        ("mqtts://broker", "broker", 8883, True),
        ("ssl://broker", "broker", 8883, True),
        ("mqtts://broker:9883", "broker", 9883, True),
        ("mqtt://[::1]:1885", "::1", 1885, False),
        ("mqtt://u:p@broker:2000", "broker", 2000, False),
    ],
)
def test_mqtt_host_port_tls(url: str, host: str, port: int, tls: bool) -> None:
    m = MqttSettings(url=url)

    assert (m.host, m.port, m.tls) == (host, port, tls)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:secret@h:5432/db?sslmode=require", "postgresql://u:***@h:5432/db?sslmode=require"),
        ("mqtt://u:p%40ss@h:1883", "mqtt://u:***@h:1883"),
        ("mqtt://:secret@h", "mqtt://:***@h"),
        ("mqtt://u:secret@[::1]:1883", "mqtt://u:***@[::1]:1883"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db", "postgresql://h/db"),
        ("http://[::1", "<unparseable url>"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_mask_url_keeps_an_encoded_username_as_written() -> None:
    # The user name is already percent-encoded in the URL; masking must not encode it a second time.
    assert mask_url("postgresql://svc%40city:secret@h/db") == "postgresql://svc%40city:***@h/db"
