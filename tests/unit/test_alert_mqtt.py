"""Alert events over MQTT, the pure part: topic escaping, the prefix and the overlap check."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.alerts.mqtt_channel import CHANNEL_NAME, alert_topic, escape_level, unescape_level
from ingest.alerts.settings import WebhookSettings
from ingest.errors import ConfigError
from ingest.routing import filter_matches
from ingest.settings import load_settings


@pytest.mark.parametrize(("name", "level"), [
    ("a/b", "a%2Fb"), ("a+b", "a%2Bb"), ("a#b", "a%23b"), ("a\x00b", "a%00b"), ("$SYS", "%24SYS"),
    ("a$b", "a$b"), ("50%", "50%25"), ("%2F", "%252F"), ("\x1f\x7f\x85", "%1F%7F%C2%85"), ("hn-aq-01", "hn-aq-01"),
    ("Hà Nội", "Hà Nội"), ("a\uffffb", "a%EF%BF%BFb"), ("\ufffe", "%EF%BF%BE"), ("\ufdd0\ufdef", "%EF%B7%90%EF%B7%AF"),
    ("\U0001fffe", "%F0%9F%BF%BE"), ("\ufdcf\ufdf0", "\ufdcf\ufdf0"),
])
def test_each_unsafe_character_is_percent_encoded(name: str, level: str) -> None:
    assert escape_level(name) == level
    assert unescape_level(level) == name


@given(st.text(min_size=1))
def test_escaping_is_reversible_and_gives_one_plain_level(name: str) -> None:
    level = escape_level(name)
    assert unescape_level(level) == name
    assert not any(c in level for c in "/+#\x00\uffff\ufffe")
    assert not level.startswith("$")
    topic = alert_topic("city/ops", "pm25-high", name)
    assert filter_matches("city/ops/alerts/+/+", topic)
    assert topic.split("/")[4] == level


def test_the_channel_name_is_no_webhook_name() -> None:
    with pytest.raises(ValueError, match="not a plain name"):
        WebhookSettings(name=CHANNEL_NAME, url="https://x.example/", secret_env="S")


def _load(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


def test_defaults_and_a_plain_prefix_load(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[alerts]\nmqtt = true\nmqtt_prefix = "city/ops"\n', encoding="utf-8")
    s = load_settings(path)
    assert (s.alerts.mqtt, s.alerts.mqtt_prefix) == (True, "city/ops")
    assert (load_settings().alerts.mqtt, load_settings().alerts.mqtt_prefix) == (False, "sensor-ingest")


@pytest.mark.parametrize(("prefix", "why"), [
    ("city/+", "wildcard"), ("city/#", "wildcard"), ("$SYS/x", "starts with '$'"), ("", "is empty"),
    ("a//b", "empty level"), ("a/", "empty level"),
])
def test_a_prefix_that_is_not_plain_levels_is_refused(tmp_path: Path, prefix: str, why: str) -> None:
    text = _load(tmp_path, f'[alerts]\nmqtt_prefix = "{prefix}"\n')
    assert "alerts.mqtt_prefix" in text
    assert why in text


SOURCE = '[[sources]]\nname = "own"\ntopic = "{topic}"\nformat = "native"\n'


@pytest.mark.parametrize("topic", ["sensor-ingest/{device}/#", "sensor-ingest/alerts/{rule}/{device}",
                                   "+/alerts/{device}/#", "sensor-ingest/{x}/{y}/{device}"])
def test_a_source_that_could_read_the_alert_topics_is_refused(tmp_path: Path, topic: str) -> None:
    text = _load(tmp_path, "[alerts]\nmqtt = true\n\n" + SOURCE.format(topic=topic))
    assert "source 'own' subscribes to" in text
    assert "'sensor-ingest/alerts/+/+'" in text
    assert "alerts.mqtt_prefix" in text  # the fix names what to change


def test_the_check_holds_only_with_mqtt_on_and_a_disjoint_source_passes(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(SOURCE.format(topic="sensor-ingest/{device}/#"), encoding="utf-8")
    assert load_settings(path).alerts.mqtt is False
    path.write_text('[alerts]\nmqtt = true\nmqtt_prefix = "sensor-ingest-alerts"\n\n'
                    + SOURCE.format(topic="sensor-ingest/{device}/#")
                    + SOURCE.format(topic="sensor-ingest/alerts/{device}").replace('"own"', '"other"')
                    + SOURCE.format(topic="sensor-ingest-alerts/alerts/{device}").replace('"own"', '"three"'),
                    encoding="utf-8")
    assert load_settings(path).alerts.mqtt is True


def test_a_preset_under_the_prefix_with_other_levels_passes(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[alerts]\nmqtt = true\nmqtt_prefix = "tele"\n', encoding="utf-8")  # Tasmota: tele/+/SENSOR
    assert load_settings(path).alerts.mqtt_prefix == "tele"  # three levels never match tele/alerts/+/+


@pytest.mark.parametrize(("prefix", "preset", "source"), [("shellies", "shelly", "shelly.gen1"),
                                                         ("zigbee2mqtt", "zigbee2mqtt", "zigbee2mqtt")])
def test_a_preset_that_overlaps_is_named_by_its_name(tmp_path: Path, prefix: str, preset: str, source: str) -> None:
    text = _load(tmp_path, f'[alerts]\nmqtt = true\nmqtt_prefix = "{prefix}"\n')
    assert f"preset {preset!r} (source {source!r}) subscribes to" in text
    assert f"[presets] {preset} = false" in text
    path = tmp_path / "c.toml"
    path.write_text(f'[alerts]\nmqtt = true\nmqtt_prefix = "{prefix}"\n\n[presets]\n{preset} = false\n',
                    encoding="utf-8")
    assert load_settings(path).alerts.mqtt_prefix == prefix  # switched off as told: it loads
