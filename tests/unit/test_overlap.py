"""Overlapping subscription filters: a topic two filters match arrives once per filter; the service
subscribes with subscription identifiers and reads only the copy sent for its source's own filter."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ingest.model import RawMessage
from ingest.process import Processor
from ingest.routing import filters_overlap, subscription_ids
from ingest.settings import Settings, SourceSettings

NOW = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)


@pytest.mark.parametrize(("filters", "overlap"), [
    (["a/+", "a/b"], True),
    (["a/#", "a"], True),  # '#' matches its parent level
    (["a/+/#", "a/b"], True),
    (["a/+/#", "a"], False),
    (["a/b", "a/c"], False),
    (["a/b", "a/b/c"], False),
    (["+/sensor/+/state", "homeassistant/+/+/#"], True),
    (["tele/+/SENSOR", "tele/+/STATE"], False),
    (["x/+", "y/+"], False),
    (["a/b", "a/b"], False),  # one filter, written twice
    (["homie/5/+/#", "homie/+/#"], True),
])
def test_filters_overlap_when_one_topic_matches_both(filters: list[str], overlap: bool) -> None:
    assert filters_overlap(filters) is overlap


def test_the_presets_overlap_so_the_service_subscribes_with_identifiers() -> None:
    assert filters_overlap(Processor.from_settings(Settings()).filters)


def test_a_filter_gets_an_identifier_only_when_it_overlaps_an_earlier_one_without() -> None:
    assert subscription_ids(["a/+", "b/+", "a/b", "+/c", "b/#"]) == [0, 0, 3, 4, 5]
    # The filters without one never overlap each other.
    assert subscription_ids(["x/+", "y/+"]) == [0, 0]
    # A configured source's filter comes first and so carries none: its messages no property.
    settings = Settings(sources=[SourceSettings(name="bench", topic="bench/{device}/up", format="native")])
    processor = Processor.from_settings(settings)
    ids = dict(zip(processor.filters, processor.subscription_ids, strict=True))
    assert ids["bench/+/up"] == 0
    assert ids["+/status/+"] != 0  # overlaps bench/+/up at bench/status/up
    plain = [f for f, sid in ids.items() if not sid]
    assert not filters_overlap(plain)


def _processor() -> Processor:
    settings = Settings(presets={"enabled": False}, sources=[
        SourceSettings(name="esphome", topic="{device}/sensor/+/state", format="value"),
        SourceSettings(name="ha", topic="homeassistant/+/{device}/#", format="value",
                       exclude=["homeassistant/*/config"]),
    ])
    return Processor.from_settings(settings)


def test_only_the_copy_sent_for_the_routed_sources_filter_is_read() -> None:
    processor = _processor()
    assert processor.filters == ["+/sensor/+/state", "homeassistant/+/+/#"]
    assert processor.subscription_ids == [0, 2]
    topic = "homeassistant/sensor/bedroom/state"  # both filters match; the first source takes it

    own = processor.process(RawMessage(topic, b"21.5", NOW, subscriptions=(0,)))  # for the filter without id
    other = processor.process(RawMessage(topic, b"21.5", NOW, subscriptions=(2,)))
    plain = processor.process(RawMessage(topic, b"21.5", NOW))  # subscribed without identifiers

    assert [(r.device, r.metric, r.value) for r in own.readings] == [("homeassistant", "sensor.bedroom", 21.5)]
    assert (other.readings, other.rejection, other.skipped) == ([], None, "overlap_copy")
    assert plain.readings == own.readings
    # A topic only the second filter matches: its copy carries that filter's identifier, and is read.
    only = processor.process(RawMessage("homeassistant/light/kitchen/state", b"ON", NOW, subscriptions=(2,)))
    assert [(r.device, r.metric, r.value) for r in only.readings] == [("kitchen", "value", True)]


def test_an_excluded_topic_is_counted_once_and_its_other_copies_as_overlap() -> None:
    processor = _processor()
    topic = "homeassistant/sensor/config/config"  # both filters match it; ha excludes it, esphome: no
    # "+/sensor/+/state" does not match: this topic reaches only through ha's filter
    assert processor.process(RawMessage(topic, b"{}", NOW, subscriptions=(2,))).skipped == "excluded"
    assert processor.process(RawMessage(topic, b"{}", NOW, subscriptions=(3,))).skipped == "overlap_copy"
