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


def test_every_filter_that_overlaps_another_gets_a_stable_identifier() -> None:
    ids = subscription_ids(["a/+", "b/+", "a/b", "c/d"])
    assert ids[1] == ids[3] == 0  # overlap nothing: no identifier, no property on their messages
    assert ids[0]
    assert ids[2]
    assert ids[0] != ids[2]
    # Derived from the text, not the position: the same after filters are added, removed or moved.
    again = subscription_ids(["x/+", "a/b", "x/y", "a/+"])
    assert (again[3], again[1]) == (ids[0], ids[2])
    assert all(0 < sid <= 268_435_455 for sid in ids + again if sid)


def test_a_configured_source_overlapping_no_preset_carries_no_identifier() -> None:
    settings = Settings(sources=[SourceSettings(name="aq", topic="city/{district}/{device}/up", format="native")])
    processor = Processor.from_settings(settings)
    ids = dict(zip(processor.filters, processor.subscription_ids, strict=True))
    assert ids["city/+/+/up"] == 0
    assert ids["+/sensor/+/state"] != 0


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
    esp, ha = processor.subscription_ids
    assert esp
    assert ha
    topic = "homeassistant/sensor/bedroom/state"  # both filters match; the first source takes it

    own = processor.process(RawMessage(topic, b"21.5", NOW, subscriptions=(esp,)))
    other = processor.process(RawMessage(topic, b"21.5", NOW, subscriptions=(ha,)))
    both = processor.process(RawMessage(topic, b"21.5", NOW, subscriptions=(ha, esp)))  # one copy for both
    plain = processor.process(RawMessage(topic, b"21.5", NOW))  # subscribed without identifiers
    gone = processor.process(RawMessage(topic, b"21.5", NOW, subscriptions=(12345,)))  # a subscription since gone

    assert [(r.device, r.metric, r.value) for r in own.readings] == [("homeassistant", "sensor.bedroom", 21.5)]
    assert (other.readings, other.rejection, other.skipped) == ([], None, "overlap_copy")
    assert both.readings == own.readings
    assert plain.readings == own.readings
    assert gone.readings == own.readings
    # A topic only the second filter matches: its copy carries that filter's identifier, and is read.
    only = processor.process(RawMessage("homeassistant/light/kitchen/state", b"ON", NOW, subscriptions=(ha,)))
    assert [(r.device, r.metric, r.value) for r in only.readings] == [("kitchen", "value", True)]


def test_an_excluded_topic_is_counted_once_and_its_other_copies_as_overlap() -> None:
    processor = _processor()
    topic = "homeassistant/sensor/config/config"  # both filters match it; ha excludes it, esphome: no
    # "+/sensor/+/state" does not match: this topic reaches only through ha's filter
    ha = processor.subscription_ids[1]
    assert processor.process(RawMessage(topic, b"{}", NOW, subscriptions=(ha,))).skipped == "excluded"
    # A copy for another current filter that matches the topic: counted as such.
    topic = "homeassistant/sensor/config/state"
    assert processor.process(RawMessage(topic, b"1", NOW, subscriptions=(ha,))).skipped == "overlap_copy"
