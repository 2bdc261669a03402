"""load_settings(): file + environment -> one typed Settings, or a ConfigError naming every problem.

Also `sensor-ingest check-config`, which is load_settings() with an exit code.
"""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path

import pytest

from ingest.cli import main
from ingest.errors import ConfigError, ConfigProblem
from ingest.settings import MqttSettings, Settings, SourceSettings, load_settings, mask_url

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
    assert s.ingest.batch_max_messages == 4000
    assert s.ingest.batch_max_readings == 40000
    assert s.ingest.max_future == 600.0
    assert s.ingest.max_readings_per_message == 2000
    assert s.ingest.max_json_depth == 32
    assert s.ingest.max_new_devices_per_minute == 1000
    assert s.ingest.max_new_metrics_per_minute == 100
    assert s.log.level == "info"
    assert s.sources == []


def test_the_example_file_loads_with_its_documented_defaults() -> None:
    s = load_settings(EXAMPLE)

    assert s == load_settings().model_copy(update={"sources": s.sources})
    assert [src.name for src in s.sources] == [
        "native", "senml", "gateways", "tasmota", "ttn", "chirpstack", "telegraf", "esphome"]
    assert {src.format for src in s.sources} == {"native", "senml", "json", "lorawan", "line", "value"}
    assert s.sources[0].topic == "city/{district}/{device}/up"
    assert s.sources[0].allow_devices is None
    # The gateways' topic has no {device}: the example shows how such a source is bounded.
    assert s.sources[2].allow_devices == ["hn-*"]


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


@pytest.mark.parametrize(
    ("section", "url", "env"),
    [
        ("database", "postgresql://u@h/db?password=s3cret", "SENSOR_INGEST_DATABASE_PASSWORD"),
        ("database", "postgresql://u@h/db?sslmode=require&sslpassword=s3cret", "SENSOR_INGEST_DATABASE_PASSWORD"),
        ("mqtt", "mqtt://h:1883?password=s3cret", "SENSOR_INGEST_MQTT_PASSWORD"),
        # malformed: still a password in a file, refused as such and never echoed
        ("database", "postgresql://u:pa:s3cret@[bad/db", "SENSOR_INGEST_DATABASE_PASSWORD"),
        ("mqtt", "mqtt://u:s3cret@host:99999", "SENSOR_INGEST_MQTT_PASSWORD"),
        ("mqtt", "mqtt://u:ab/s3cret@host", "SENSOR_INGEST_MQTT_PASSWORD"),
    ],
)
def test_password_anywhere_in_the_file_url_is_refused(tmp_path: Path, section: str, url: str, env: str) -> None:
    path = _write(tmp_path, f'[{section}]\nurl = "{url}"\n')

    with pytest.raises(ConfigError) as info:
        load_settings(path)

    p = _only(info.value.problems)
    assert p.key == f"{section}.url"
    assert "password" in p.message
    assert env in p.fix
    assert f"SENSOR_INGEST_{section.upper()}_URL" in p.fix
    assert "s3cret" not in "".join(traceback.format_exception(info.value))


MALFORMED_ENV_URLS = [
    ("SENSOR_INGEST_DATABASE_URL", "postgresql://u:pa:s3cret@[bad/db", "database.url"),
    ("SENSOR_INGEST_DATABASE_URL", "mysql://u:s3cret@h/db", "database.url"),
    ("SENSOR_INGEST_DATABASE_URL", "u:s3cret@h/db", "database.url"),
    ("SENSOR_INGEST_MQTT_URL", "mqtt://u:s3cret@host:99999", "mqtt.url"),
    ("SENSOR_INGEST_MQTT_URL", "mqtt://u:s3cret@[::1", "mqtt.url"),
    ("SENSOR_INGEST_MQTT_URL", "http://u:s3cret@broker:1883", "mqtt.url"),
    ("SENSOR_INGEST_MQTT_URL", "mqtt://u:s3cret@:1883", "mqtt.url"),
    # unencoded '/': urlsplit reads "u" as the host and "s3cret" as a bad port
    ("SENSOR_INGEST_MQTT_URL", "mqtt://u:s3cret/x@broker", "mqtt.url"),
    # the MQTT client reads no password from the query string: refused, and not echoed
    ("SENSOR_INGEST_MQTT_URL", "mqtt://broker:1883?password=s3cret", "mqtt.url"),
]


@pytest.mark.parametrize(("env", "url", "key"), MALFORMED_ENV_URLS)
def test_a_bad_url_from_the_environment_is_reported_without_its_password(
    monkeypatch: pytest.MonkeyPatch, env: str, url: str, key: str
) -> None:
    monkeypatch.setenv(env, url)

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert _only(info.value.problems).key == key
    # The whole text, with the chained pydantic ValidationError a traceback would print too.
    text = "".join(traceback.format_exception(info.value))
    assert "ValidationError" in text
    assert "s3cret" not in text
    assert "s3cret" not in repr(info.value.problems)


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("mqtt://u:s3cret@[::1", "got 'mqtt://u:***@[::1'"),
        ("mqtt://u:s3cret@host:99999", "percent-encode a password that holds '/', '?', '#' or '@'; "
                                       "got 'mqtt://u:***@host:99999'"),
    ],
)
def test_a_bad_url_is_echoed_masked_so_the_operator_sees_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, url: str, fix: str
) -> None:
    monkeypatch.setenv("SENSOR_INGEST_MQTT_URL", url)

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert _only(info.value.problems).fix.endswith(fix)


def test_input_values_are_not_in_the_chained_validation_error(tmp_path: Path) -> None:
    # A mistyped secret key is an unknown key, not a refused secret: its value must not be echoed either.
    path = _write(tmp_path, '[database]\npasword = "hunter2"\n[mqtt]\nkeepalive = "hunter3"\n')

    with pytest.raises(ConfigError) as info:
        load_settings(path)

    assert {p.key for p in info.value.problems} == {"database.pasword", "mqtt.keepalive"}
    text = "".join(traceback.format_exception(info.value))
    assert "hunter2" not in text
    assert "'password'" in text  # the suggestion is still there


def test_a_section_from_the_environment_that_is_not_json_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE", '{"url": "postgresql://u:s3cret@h/db", oops')

    with pytest.raises(ConfigError) as info:
        load_settings()

    p = _only(info.value.problems)
    assert p.key == "database"
    assert "SENSOR_INGEST_DATABASE__<KEY>" in p.fix
    assert "s3cret" not in "".join(traceback.format_exception(info.value))


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


def test_unknown_key_in_a_source_suggests_the_known_one(tmp_path: Path) -> None:
    text = SOURCE.format(name="aq", topic="a/{device}", format="native") + 'devce_prefix = "x"\n'
    p = _only(_problems(tmp_path, text))

    assert p.key == "sources[0].devce_prefix"
    assert "'device_prefix'" in p.fix


# --- new [ingest] limits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_readings_per_message", 0),
        ("max_json_depth", 1),
        ("max_json_depth", 1001),
        ("max_new_devices_per_minute", 0),
        ("max_new_metrics_per_minute", 0),
    ],
)
def test_ingest_limits_out_of_range_name_the_key(tmp_path: Path, key: str, value: int) -> None:
    p = _only(_problems(tmp_path, f"[ingest]\n{key} = {value}\n"))

    assert p.key == f"ingest.{key}"
    assert p.message.startswith("Input should be")
    assert p.fix == f"got {value}"


def test_ingest_limits_are_read(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, """
        [ingest]
        max_readings_per_message = 5
        max_json_depth = 2
        max_new_devices_per_minute = 7
        max_new_metrics_per_minute = 3
    """))

    assert (s.ingest.max_readings_per_message, s.ingest.max_json_depth) == (5, 2)
    assert (s.ingest.max_new_devices_per_minute, s.ingest.max_new_metrics_per_minute) == (7, 3)


# --- mqtt.qos -----------------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
def test_qos_0_and_1_are_accepted(tmp_path: Path, qos: int) -> None:
    assert load_settings(_write(tmp_path, f"[mqtt]\nqos = {qos}\n")).mqtt.qos == qos


def test_qos_2_is_refused_saying_why(tmp_path: Path) -> None:
    p = _only(_problems(tmp_path, "[mqtt]\nqos = 2\n"))

    assert p.key == "mqtt.qos"
    assert "PUBREC" in p.message
    assert "commit" in p.message
    assert "qos = 1" in p.fix
    assert "0" in p.fix


def test_qos_2_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_MQTT__QOS", "2")

    with pytest.raises(ConfigError) as info:
        load_settings()

    p = _only(info.value.problems)
    assert (p.key, "PUBREC" in p.message) == ("mqtt.qos", True)


def test_other_qos_values_are_refused(tmp_path: Path) -> None:
    assert _only(_problems(tmp_path, "[mqtt]\nqos = 3\n")).key == "mqtt.qos"


# --- sources: whose device ids ------------------------------------------------------------------

GATEWAY = SOURCE.format(name="native", topic="city/{device}/up", format="native") + SOURCE.format(
    name="gw", topic="gw/{gateway}/up", format="native"
)


def test_a_source_taking_device_ids_from_the_payload_must_be_bounded(tmp_path: Path) -> None:
    p = _only(_problems(tmp_path, GATEWAY))

    assert p.key == "sources[1]"
    assert p.message.startswith("takes device ids from the payload")
    assert "{device}" in p.message
    assert p.fix == 'set device_prefix = "gw:" or allow_devices = ["pattern-*"]'
    assert str(p).startswith("sources[1]: takes device ids from the payload")


@pytest.mark.parametrize("extra", ['device_prefix = "gw1:"\n', 'allow_devices = ["hn-aq-*", "hn-rain-?"]\n'])
def test_a_bounded_payload_device_source_is_accepted(tmp_path: Path, extra: str) -> None:
    s = load_settings(_write(tmp_path, GATEWAY + extra))

    assert s.sources[1].name == "gw"


def test_allow_devices_is_read(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, GATEWAY + 'allow_devices = ["hn-aq-*"]\n'))

    assert s.sources[0].allow_devices is None
    assert s.sources[1].allow_devices == ["hn-aq-*"]


def test_every_unbounded_source_is_reported(tmp_path: Path) -> None:
    text = GATEWAY + SOURCE.format(name="all", topic="everything/#", format="senml")
    problems = _problems(tmp_path, text)

    assert [p.key for p in problems] == ["sources[1]", "sources[2]"]
    assert 'device_prefix = "all:"' in problems[1].fix


def test_a_source_with_a_device_capture_may_also_set_allow_devices(tmp_path: Path) -> None:
    text = SOURCE.format(name="aq", topic="city/{device}/up", format="native") + 'allow_devices = ["hn-*"]\n'

    assert load_settings(_write(tmp_path, text)).sources[0].allow_devices == ["hn-*"]


@pytest.mark.parametrize(("value", "hint"), [("[]", "at least one"), ('["hn-*", ""]', "allow_devices[1]")])
def test_allow_devices_must_be_a_non_empty_list_of_globs(tmp_path: Path, value: str, hint: str) -> None:
    text = SOURCE.format(name="aq", topic="city/{device}/up", format="native") + f"allow_devices = {value}\n"
    p = _only(_problems(tmp_path, text))

    assert p.key == "sources[0].allow_devices"
    assert hint in p.message


def test_an_empty_allow_devices_does_not_bound_a_gateway(tmp_path: Path) -> None:
    problems = _problems(tmp_path, GATEWAY + "allow_devices = []\n")

    assert [p.key for p in problems] == ["sources[1].allow_devices"]
    assert "at least one" in problems[0].message


def test_an_ad_hoc_source_is_not_subject_to_the_rule() -> None:
    # `sensor-ingest decode --format F` builds one of these for its dry run (ingest/process.py).
    ad_hoc = SourceSettings(name="adhoc", topic="#", format="native")

    assert ad_hoc.allow_devices is None
    assert ad_hoc.device_prefix == ""


def test_the_rule_also_holds_for_settings_built_in_code() -> None:
    with pytest.raises(ValueError, match="takes device ids from the payload"):
        Settings(sources=[SourceSettings(name="gw", topic="gw/{gateway}", format="native")])


# --- check-config -------------------------------------------------------------------------------


@pytest.mark.usefixtures("_restore_logging")
def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0

    out, err = capsys.readouterr()
    assert "OK (8 source(s), " in out
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
    assert len(shown["sources"]) == 8


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://ingest@db/x?password=s3cret", "postgresql://ingest@db/x?password=***"),
        ("postgresql://ingest@db/x?sslmode=require&sslpassword=s3cret", "postgresql://ingest@db/x?sslmode=require&sslpassword=***"),
        # accepted (libpq takes several hosts; the port is the driver's to check) but unparseable by urlsplit
        ("postgresql://ingest:s3cret@db:99999/x", "postgresql://ingest:***@db:99999/x"),
        ("postgresql://ingest:s3cret@db1:5432,db2:5432/x", "postgresql://ingest:***@db1:5432,db2:5432/x"),
        # a password written without percent-encoding
        ("postgresql://ingest:ab/s3cret@db/x", "postgresql://ingest:***@db/x"),
    ],
)
def test_check_config_show_masks_every_form_of_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, masked: str
) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", url)

    assert main(["check-config", "--show", str(EXAMPLE)]) == 0

    out, err = capsys.readouterr()
    assert "s3cret" not in out + err
    shown = json.loads(out.partition("\n")[2])
    assert shown["database"]["url"] == masked


@pytest.mark.usefixtures("_restore_logging")
def test_check_config_show_masks_secret_looking_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A mapping's keys are the payload's names, so a secret-looking one can appear in any config.
    text = SOURCE.format(name="aq", topic="city/{device}/up", format="native")
    path = _write(tmp_path, text + '[sources.rename]\napi_token = "s3cret"\nnote = "see mqtt://u:s3cret2@h"\n')

    assert main(["check-config", "--show", str(path)]) == 0

    out, _ = capsys.readouterr()
    assert "s3cret" not in out
    rename = json.loads(out.partition("\n")[2])["sources"][0]["rename"]
    assert rename == {"api_token": "***", "note": "see mqtt://u:***@h"}


def test_unknown_format_options_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    text = SOURCE.format(name="aq", topic="city/{device}/up", format="line")
    path = _write(tmp_path, text + '[sources.options]\nprecison = "ms"\n')

    with pytest.raises(ConfigError) as info:
        load_settings(path)

    assert "options.precison: unknown option for format line" in str(info.value)
    assert "precision" in str(info.value)


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize(("env", "url", "key"), MALFORMED_ENV_URLS)
def test_check_config_does_not_echo_a_password_from_a_bad_env_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: str, url: str, key: str
) -> None:
    monkeypatch.setenv(env, url)

    assert main(["check-config", "--show", str(EXAMPLE)]) == 2

    out, err = capsys.readouterr()
    assert key in err
    assert "s3cret" not in out + err


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
        ("http://[::1", "http://[::1"),  # malformed, but nothing secret in it: shown as written
        # a password in the query string (libpq reads password= and sslpassword= there)
        ("postgresql://u@h/db?password=s3cret", "postgresql://u@h/db?password=***"),
        ("postgresql://u@h/db?sslmode=require&password=s3cret&x=1", "postgresql://u@h/db?sslmode=require&password=***&x=1"),
        ("postgresql://u@h/db?sslpassword=s3cret", "postgresql://u@h/db?sslpassword=***"),
        ("mqtt://h:1883?password=x", "mqtt://h:1883?password=***"),
        # malformed URLs: masked all the same, never an exception
        ("postgresql://u:pa:ss@[bad/db", "postgresql://u:***@[bad/db"),
        ("mqtt://u:secret@host:99999", "mqtt://u:***@host:99999"),
        ("postgresql://u:secret@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        # passwords written without percent-encoding
        ("postgresql://u:ab/cd+ef@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:1234/x@h/db", "postgresql://u:***@h/db"),
        ("mqtt://u:p@ss@h:1883", "mqtt://u:***@h:1883"),
        ("mqtt://u:a?b#c@h", "mqtt://u:***@h"),
        # no scheme, or a mistyped one
        ("u:secret@h/db", "u:***@h/db"),
        ("postgresql:/u:secret@h/db", "postgresql:***@h/db"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_mask_url_keeps_an_encoded_username_as_written() -> None:
    # The user name is already percent-encoded in the URL; masking must not encode it a second time.
    assert mask_url("postgresql://svc%40city:secret@h/db") == "postgresql://svc%40city:***@h/db"


README = EXAMPLE.parents[1] / "README.md"


def _readme_sources() -> list[str]:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    return [b for b in blocks if "[[sources]]" in b]


def test_the_readme_has_source_examples() -> None:
    assert len(_readme_sources()) >= 2


@pytest.mark.parametrize("block", _readme_sources())
def test_every_source_example_in_the_readme_is_valid_config(tmp_path: Path, block: str) -> None:
    settings = load_settings(_write(tmp_path, block))
    assert settings.sources
    for source in settings.sources:
        source.mapping()
