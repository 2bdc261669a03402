"""Topic templates: compiled once into a subscription filter and a matcher with captures."""

from __future__ import annotations

import re

import pytest

from ingest.routing import Router, compile_template


@pytest.mark.parametrize(
    ("template", "expected_filter"),
    [
        ("city/{district}/{device}/up", "city/+/+/up"),
        ("city/+/{device}", "city/+/+"),
        ("gw/{gateway}/#", "gw/+/#"),
        ("#", "#"),
        ("plain/topic", "plain/topic"),
    ],
)
def test_filter_of_a_template(template: str, expected_filter: str) -> None:
    assert compile_template(template).filter == expected_filter


def test_captures_named_levels() -> None:
    route = compile_template("city/{district}/{device}/up", "native")

    assert route.source == "native"
    assert route.template == "city/{district}/{device}/up"
    assert route.match("city/hoan-kiem/aq-7/up") == {"district": "hoan-kiem", "device": "aq-7"}


def test_plus_matches_one_level_without_capturing() -> None:
    route = compile_template("city/+/{device}")

    assert route.match("city/anything/aq-7") == {"device": "aq-7"}
    assert route.match("city/other/aq-8") == {"device": "aq-8"}


def test_final_hash_captures_the_rest_under_hash() -> None:
    route = compile_template("gw/{gateway}/#")

    assert route.match("gw/g1/a/b/c") == {"gateway": "g1", "#": "a/b/c"}
    assert route.match("gw/g1/x") == {"gateway": "g1", "#": "x"}
    assert route.match("other/g1/x") is None


def test_lone_hash_captures_the_whole_topic() -> None:
    assert compile_template("#").match("a/b/c") == {"#": "a/b/c"}


def test_literal_mismatch() -> None:
    route = compile_template("city/{district}/{device}/up")

    assert route.match("city/hoan-kiem/aq-7/down") is None
    assert route.match("town/hoan-kiem/aq-7/up") is None
    assert route.match("City/hoan-kiem/aq-7/up") is None  # MQTT topics are case-sensitive


@pytest.mark.parametrize("topic", ["city/hoan-kiem/up", "city/hoan-kiem/aq-7/up/extra", "city", ""])
def test_wrong_level_count(topic: str) -> None:
    assert compile_template("city/{district}/{device}/up").match(topic) is None


@pytest.mark.parametrize("topic", ["city//aq-7/up", "city/hoan-kiem//up"])
def test_empty_capture_level_is_rejected(topic: str) -> None:
    assert compile_template("city/{district}/{device}/up").match(topic) is None


@pytest.mark.parametrize(
    ("template", "message_part"),
    [
        ("a/{x}/{x}", "captures {x} twice"),
        ("a/{x}y", "'{x}y'"),
        ("a/x{y}/b", "'x{y}'"),
        ("a/b+", "'b+'"),
        ("a/#/b", "'#'"),
        ("a/{1x}", "'{1x}'"),
        ("$SYS/broker/load", "'$'"),
        ("", "non-empty"),
    ],
)
def test_bad_templates_raise_a_clear_value_error(template: str, message_part: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message_part)):
        compile_template(template)


def test_partial_level_message_says_how_to_write_it() -> None:
    with pytest.raises(ValueError, match=r"use \{name\} or \{name:glob\} for a whole level"):
        compile_template("city/{district}-x/up")


def test_router_finds_the_matching_route() -> None:
    router = Router([compile_template("city/{device}/up", "a"), compile_template("senml/{device}", "b")])

    found = router.route("senml/aq-1")
    assert found is not None
    route, captures = found
    assert route.source == "b"
    assert captures == {"device": "aq-1"}
    assert router.route("nowhere/aq-1") is None


@pytest.mark.parametrize(
    "templates",
    [
        ("city/{district}/{device}/up", "city/+/{device}/up"),
        ("+/{district}/{device}/up", "city/{district}/{device}/up"),
        ("city/{district}/{device}/up", "+/{district}/{device}/up"),
        ("#", "city/{district}/{device}/up"),
        ("city/#", "city/{district}/{device}/up"),
    ],
)
def test_router_picks_the_first_configured_route(templates: tuple[str, str]) -> None:
    first, second = templates
    router = Router([compile_template(first, "first"), compile_template(second, "second")])
    found = router.route("city/hoan-kiem/aq-7/up")
    assert found is not None
    assert found[0].source == "first"

    reversed_router = Router([compile_template(second, "second"), compile_template(first, "first")])
    found = reversed_router.route("city/hoan-kiem/aq-7/up")
    assert found is not None
    assert found[0].source == "second"


def test_router_filters_deduplicate_in_config_order() -> None:
    router = Router([
        compile_template("city/{district}/{device}/up", "a"),
        compile_template("senml/{device}", "b"),
        compile_template("city/+/{x}/up", "c"),  # same filter as "a"
        compile_template("gw/#", "d"),
        compile_template("senml/+", "e"),  # same filter as "b"
    ])

    assert router.filters == ["city/+/+/up", "senml/+", "gw/#"]


def test_router_without_routes() -> None:
    router = Router([])

    assert router.filters == []
    assert router.route("a/b") is None
