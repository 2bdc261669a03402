"""Topic templates of issue #12: `{name:glob}` levels, a final `{name#}`, `exclude`, and the router's
order and `excluded()` (ingest/routing.py)."""

from __future__ import annotations

import re

import pytest

from ingest.routing import Route, Router, compile_template

# --- {name:glob} ---------------------------------------------------------------------------------


def test_a_glob_level_subscribes_to_plus_and_keeps_its_glob() -> None:
    route = compile_template("{device:[Ss]helly*}/events/rpc", "shelly.rpc")

    assert route.filter == "+/events/rpc"
    assert route.names == ("device", None, None)
    assert route.patterns == ("[Ss]helly*", None, None)
    assert route.device_level == 0
    assert route.rest is False


def test_a_template_without_glob_levels_has_no_patterns() -> None:
    assert compile_template("city/{district}/{device}/up").patterns == ()


@pytest.mark.parametrize("device", ["shellyplus1-abc", "Shelly1", "shelly"])
def test_a_glob_level_captures_a_level_that_matches(device: str) -> None:
    route = compile_template("{device:[Ss]helly*}/events/rpc")

    assert route.match(f"{device}/events/rpc") == {"device": device}


@pytest.mark.parametrize("device", ["SHELLY1", "sHelly1", "myshelly", "tasmota-1"])
def test_a_glob_level_is_case_sensitive_and_whole(device: str) -> None:
    route = compile_template("{device:[Ss]helly*}/events/rpc")
    topic = f"{device}/events/rpc"

    assert route.match(topic) is None
    # The subscription filter brings it in all the same; only the glob refuses it.
    assert route.match_filter(topic) == {"device": device}


def test_a_glob_level_with_question_mark_and_a_glob_in_the_middle() -> None:
    route = compile_template("site/{floor:f?}/{device}")

    assert route.filter == "site/+/+"
    assert route.match("site/f1/d7") == {"floor": "f1", "device": "d7"}
    assert route.match("site/f12/d7") is None
    assert route.match("site/g1/d7") is None


def test_an_empty_level_does_not_match_even_a_star_glob() -> None:
    route = compile_template("a/{x:*}/b")

    assert route.match("a//b") is None
    assert route.match("a/anything/b") == {"x": "anything"}


def test_a_glob_capture_other_than_device_or_metric_is_an_attribute() -> None:
    assert compile_template("site/{floor:f*}/{device}").attributes is True
    assert compile_template("{device:d*}/{metric:m*}").attributes is False


@pytest.mark.parametrize(
    ("template", "message_part"),
    [
        ("a/{x:}/b", "'{x:}'"),  # an empty glob
        ("a/{x:a+b}", "'{x:a+b}'"),  # '+' may not be in a glob
        ("a/{x:a#}", "'{x:a#}'"),
        ("a/{x:{y}}", "'{x:{y}}'"),
        ("a/{x:a}b", "'{x:a}b'"),
        ("a/{x:y}/{x:z}", "captures {x} twice"),
    ],
)
def test_bad_glob_levels_are_refused(template: str, message_part: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message_part)):
        compile_template(template)


def test_a_glob_mismatch_falls_to_the_next_route() -> None:
    router = Router([
        compile_template("{device:sensor-*}/data", "sensors"),
        compile_template("{device}/data", "others"),
    ])

    found = router.route("sensor-1/data")
    assert found is not None
    assert (found[0].source, found[1]) == ("sensors", {"device": "sensor-1"})

    found = router.route("pump-1/data")
    assert found is not None
    assert (found[0].source, found[1]) == ("others", {"device": "pump-1"})


def test_a_glob_mismatch_falls_to_a_later_literal_first_route() -> None:
    router = Router([
        compile_template("{device:shelly*}/status/{metric}", "shelly"),
        compile_template("plug/status/{metric}", "plugs"),
    ])

    found = router.route("plug/status/switch:0")
    assert found is not None
    assert (found[0].source, found[1]) == ("plugs", {"metric": "switch:0"})


def test_a_glob_mismatch_with_no_other_route_is_unrouted() -> None:
    router = Router([compile_template("{device:shelly*}/events/rpc", "shelly.rpc")])

    assert router.route("tasmota/events/rpc") is None


# --- a final {name#} -----------------------------------------------------------------------------


def test_a_rest_capture_subscribes_to_hash() -> None:
    route = compile_template("zigbee2mqtt/{device#}", "z2m")

    assert route.filter == "zigbee2mqtt/#"
    assert route.rest is True
    assert route.rest_name == "device"
    assert route.levels == ("zigbee2mqtt",)
    assert route.names == (None,)
    assert route.device_level is None  # the device is not one level
    assert route.attributes is False


@pytest.mark.parametrize(
    ("topic", "device"),
    [
        ("zigbee2mqtt/lamp", "lamp"),
        ("zigbee2mqtt/Living Room/lamp", "Living Room/lamp"),
        ("zigbee2mqtt/Ground floor/Hall way/motion 1", "Ground floor/Hall way/motion 1"),
        ("zigbee2mqtt/ spaced ", " spaced "),  # spaces kept verbatim
    ],
)
def test_a_rest_capture_takes_the_rest_with_its_slashes_and_spaces(topic: str, device: str) -> None:
    assert compile_template("zigbee2mqtt/{device#}").match(topic) == {"device": device}


@pytest.mark.parametrize("topic", ["zigbee2mqtt", "zigbee2mqtt/", "zigbee2mqtt//", "zigbee2mqtt///"])
def test_a_rest_capture_refuses_an_empty_rest(topic: str) -> None:
    route = compile_template("zigbee2mqtt/{device#}")

    assert route.match(topic) is None
    assert route.match_filter(topic) is None


def test_a_plain_hash_still_takes_an_empty_rest() -> None:
    # MQTT: "a/#" matches "a" itself; a named rest asks for one level or more.
    assert compile_template("a/#").match("a") == {"#": ""}
    assert compile_template("a/{rest#}").match("a") is None


def test_a_rest_capture_after_other_captures() -> None:
    route = compile_template("gw/{gateway}/{path#}")

    assert route.filter == "gw/+/#"
    assert route.match("gw/g1/a/b") == {"gateway": "g1", "path": "a/b"}
    assert route.match("gw/g1") is None
    assert route.attributes is True  # {gateway} and {path} are device attributes


def test_a_rest_capture_alone_subscribes_to_everything() -> None:
    route = compile_template("{device#}")

    assert route.filter == "#"
    assert route.match("a/b c/d") == {"device": "a/b c/d"}


@pytest.mark.parametrize(
    ("template", "message_part"),
    [
        ("a/{x#}/b", "must be the last level"),
        ("{x#}/b", "must be the last level"),
        ("a/{x}/{x#}", "captures {x} twice"),
        ("a/{x#}#", "'{x#}#'"),
        ("a/{#}", "'{#}'"),
    ],
)
def test_bad_rest_captures_are_refused(template: str, message_part: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message_part)):
        compile_template(template)


# --- exclude -------------------------------------------------------------------------------------


def _z2m() -> Route:
    return compile_template("zigbee2mqtt/{device#}", "z2m", ["zigbee2mqtt/bridge", "zigbee2mqtt/bridge/*",
                                                            "zigbee2mqtt/*/set"])


@pytest.mark.parametrize(
    "topic", ["zigbee2mqtt/bridge", "zigbee2mqtt/bridge/state", "zigbee2mqtt/bridge/log/x", "zigbee2mqtt/lamp/set",
              "zigbee2mqtt/Living Room/lamp/set"],
)
def test_excluded_topics_are_not_the_routes(topic: str) -> None:
    route = _z2m()

    assert route.match(topic) is None
    assert route.match_filter(topic) is not None  # its filter brings them in


@pytest.mark.parametrize(
    ("topic", "device"),
    [("zigbee2mqtt/bridgehead", "bridgehead"), ("zigbee2mqtt/lamp/settings", "lamp/settings"),
     ("zigbee2mqtt/lamp/set/x", "lamp/set/x"), ("zigbee2mqtt/Bridge", "Bridge")],
)
def test_exclude_globs_match_the_whole_topic_case_sensitively(topic: str, device: str) -> None:
    assert _z2m().match(topic) == {"device": device}


def test_an_exclude_star_spans_levels_and_question_mark_is_one_character() -> None:
    route = compile_template("a/{device}/#", "a", ["a/*/$*", "a/?/x"])

    assert route.match("a/d/$state") is None
    assert route.match("a/d/node/$name") is None  # '*' spans levels
    assert route.match("a/d/x") is None
    assert route.match("a/dd/x") == {"device": "dd", "#": "x"}
    assert route.match("a/d/node/temp") == {"device": "d", "#": "node/temp"}


def test_no_exclude_compiles_to_none() -> None:
    assert compile_template("a/{device}").exclude is None
    assert compile_template("a/{device}", "a", []).exclude is None


def test_an_excluded_topic_goes_to_the_next_route() -> None:
    router = Router([_z2m(), compile_template("zigbee2mqtt/bridge/{metric}", "bridge")])

    found = router.route("zigbee2mqtt/bridge/state")
    assert found is not None
    assert (found[0].source, found[1]) == ("bridge", {"metric": "state"})

    found = router.route("zigbee2mqtt/lamp")
    assert found is not None
    assert found[0].source == "z2m"


# --- Router order --------------------------------------------------------------------------------


def _source(found: tuple[Route, dict[str, str]] | None) -> str | None:
    return None if found is None else found[0].source


def test_first_route_in_config_order_wins_literal_first_before_wildcard_first() -> None:
    router = Router([
        compile_template("tele/{device}/SENSOR", "literal"),
        compile_template("{prefix}/{device}/SENSOR", "wild"),
    ])

    assert _source(router.route("tele/d1/SENSOR")) == "literal"
    assert _source(router.route("stat/d1/SENSOR")) == "wild"


def test_first_route_in_config_order_wins_wildcard_first_before_literal_first() -> None:
    router = Router([
        compile_template("{prefix}/{device}/SENSOR", "wild"),
        compile_template("tele/{device}/SENSOR", "literal"),
    ])

    found = router.route("tele/d1/SENSOR")
    assert found is not None
    assert (found[0].source, found[1]) == ("wild", {"prefix": "tele", "device": "d1"})


def test_among_literal_first_routes_the_earlier_wins() -> None:
    router = Router([
        compile_template("tele/{device}/#", "broad"),
        compile_template("tele/{device}/SENSOR", "narrow"),
    ])

    assert _source(router.route("tele/d1/SENSOR")) == "broad"


def test_among_wildcard_first_routes_the_earlier_wins() -> None:
    router = Router([
        compile_template("+/sensor/{name}/state", "first"),
        compile_template("{device}/sensor/+/state", "second"),
    ])

    found = router.route("node/sensor/t/state")
    assert found is not None
    assert (found[0].source, found[1]) == ("first", {"name": "t"})


def test_the_wildcard_prefilter_checks_level_count_and_its_literal() -> None:
    router = Router([
        compile_template("{device}/sensor/+/state", "esphome"),
        compile_template("{device}/#", "rest"),
    ])

    assert _source(router.route("n/sensor/t/state")) == "esphome"
    assert _source(router.route("n/sensor/t/state/x")) == "rest"  # one level too many
    assert _source(router.route("n/sensor/t")) == "rest"  # one level short
    assert _source(router.route("n/switch/t/state")) == "rest"  # its literal level differs


def test_a_wildcard_first_route_without_any_literal_level() -> None:
    router = Router([compile_template("{a}/{device}", "two"), compile_template("x/{device}/y", "three")])

    assert _source(router.route("p/q")) == "two"
    assert _source(router.route("x/q/y")) == "three"
    assert router.route("p") is None


def test_filters_are_listed_once_in_config_order() -> None:
    router = Router([
        compile_template("zigbee2mqtt/{device#}", "a"),
        compile_template("{device:shelly*}/events/rpc", "b"),
        compile_template("zigbee2mqtt/#", "c"),
        compile_template("{device}/events/rpc", "d"),
    ])

    assert router.filters == ["zigbee2mqtt/#", "+/events/rpc"]


# --- Router.excluded -----------------------------------------------------------------------------


def test_excluded_names_the_source_that_excludes_the_topic() -> None:
    router = Router([compile_template("other/{device}", "other"), _z2m()])

    assert router.excluded("zigbee2mqtt/bridge/state") == "z2m"
    assert router.excluded("zigbee2mqtt/lamp/set") == "z2m"


def test_excluded_names_the_source_whose_glob_level_refuses_the_topic() -> None:
    router = Router([compile_template("{device:[Ss]helly*}/events/rpc", "shelly.rpc")])

    assert router.excluded("tasmota-1/events/rpc") == "shelly.rpc"


@pytest.mark.parametrize(
    "topic",
    [
        "zigbee2mqtt/lamp",  # taken by the route
        "shelly1/events/rpc",  # taken by the glob route
        "elsewhere/x",  # no filter brings it in
        "zigbee2mqtt",  # the filter matches, but an empty rest is no match of the filter either
        "shelly1/events/rpc/extra",  # the glob route's filter does not bring it in
    ],
)
def test_excluded_is_none_for_topics_no_route_excludes(topic: str) -> None:
    router = Router([_z2m(), compile_template("{device:[Ss]helly*}/events/rpc", "shelly.rpc")])

    assert router.excluded(topic) is None


def test_excluded_ignores_routes_without_exclude_or_globs() -> None:
    router = Router([compile_template("a/{device}", "plain")])

    assert router.route("a/b/c") is None
    assert router.excluded("a/b/c") is None


def test_excluded_names_the_first_such_source_in_config_order() -> None:
    router = Router([
        compile_template("a/{device}/#", "first", ["a/*/x"]),
        compile_template("a/+/#", "second", ["a/*"]),
    ])

    assert router.excluded("a/d/x") == "first"
