"""Silences, the pure part (ingest/alerts/silence.py) and the CLI's checks of its arguments
(ingest/alerts/silence_cli.py): what a silence matches, which events the stage holds back, and
every wrong argument refused before the database is touched, with what to write instead."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest

from ingest.alerts.model import Rule
from ingest.alerts.silence import Candidate, Hold, Silence, decide, event_labels, glob_pattern
from ingest.alerts.silence_cli import _until
from ingest.cli import main

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
LEVEL = Rule("level-high", "level", "above", 5.0, severity="critical", labels=(("team", "hydro"),))
A = ("level-high", 1, 7)
B = ("level-high", 2, 7)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


# --- what a silence matches ------------------------------------------------------------------------


@pytest.mark.parametrize(("glob", "device", "matches"), [
    ("hn-aq-*", "hn-aq-01", True),
    ("hn-aq-*", "hn-aq-", True),
    ("hn-aq-*", "hn-lv-01", False),
    ("hn-aq-?1", "hn-aq-01", True),
    ("hn-aq-?1", "hn-aq-001", False),
    ("*-01", "hn-aq-01", True),
    ("hn-aq-01", "hn-aq-01", True),
    ("hn-aq-01", "hn-aq-012", False),  # a whole match, not a prefix
    ("a[1]", "a[1]", True),  # only * and ? are special: [ is itself (not fnmatch's class)
    ("a[1]", "a1", False),
    ("50%_x", "50%_x", True),  # and so are % and _ (not LIKE's)
    ("50%_x", "50abx", False),
    ("gw/*", "gw/line\nbreak", True),  # * runs over any character
])
def test_a_device_glob_has_two_wildcards(glob: str, device: str, matches: bool) -> None:
    assert bool(glob_pattern(glob).fullmatch(device)) is matches


def test_an_events_labels_are_the_attributes_under_the_rules_labels_under_its_own() -> None:
    attributes: dict[str, object] = {"district": "hoan-kiem", "team": "roads", "device": "spoofed", "floor": 3,
                                     "height": 1.5, "indoor": True, "where": {"lat": 21.0}, "none": None}
    assert event_labels(LEVEL, "hn-lv-01", attributes) == {
        "district": "hoan-kiem", "floor": "3", "height": "1.5", "indoor": "true",  # as `where` reads them
        "team": "hydro",  # the rule's label wins over the attribute
        "device": "hn-lv-01",  # and the event's own over both
        "alertname": "level-high", "rule": "level-high", "metric": "level", "severity": "critical",
    }
    assert event_labels(LEVEL, "x", None)["device"] == "x"


def test_a_silence_matches_when_each_of_its_matchers_holds() -> None:
    labels = event_labels(LEVEL, "hn-lv-01", {"district": "hoan-kiem"})
    assert Silence(1, rule="level-high").matches(labels)
    assert not Silence(1, rule="pm25-high").matches(labels)
    assert Silence(1, device="hn-lv-*").matches(labels)
    assert not Silence(1, device="hn-aq-*").matches(labels)
    assert Silence(1, labels=(("district", "hoan-kiem"), ("team", "hydro"))).matches(labels)
    assert not Silence(1, labels=(("district", "hoan-kiem"), ("team", "roads"))).matches(labels)
    assert not Silence(1, labels=(("zone", "north"),)).matches(labels)  # an absent label is no match
    assert Silence(1, labels=(("severity", "critical"), ("metric", "level"))).matches(labels)
    assert Silence(1, "level-high", "hn-lv-0?", (("alertname", "level-high"),)).matches(labels)
    assert not Silence(1, "level-high", "hn-lv-1?", (("alertname", "level-high"),)).matches(labels)


# --- which events are held back --------------------------------------------------------------------


def _never() -> dict[str, str]:
    raise AssertionError("the labels were computed without any active silence")


def ev(series: tuple[str, int, int], status: Literal["firing", "resolved"], starts: float, *, young: bool = True,
       device: str = "hn-lv-01") -> Candidate:
    return Candidate(series, status, at(starts), young, lambda: event_labels(LEVEL, device, {}))


ANY_LEVEL = Silence(3, rule="level-high")


def test_a_young_firing_event_that_a_silence_matches_is_held() -> None:
    assert decide([ev(A, "firing", 1)], [ANY_LEVEL], {}) == ([3], {A: 0}, [])


def test_without_a_silence_nothing_is_held_and_no_labels_are_computed() -> None:
    events = [Candidate(A, "firing", at(1), True, _never), Candidate(B, "resolved", at(0), True, _never)]
    assert decide(events, [], {}) == ([None, None], {}, [])


def test_an_event_too_old_to_notify_is_not_held() -> None:
    # It would never be sent: holding it would send history when the silence ends.
    assert decide([ev(A, "firing", 1, young=False)], [ANY_LEVEL], {}) == ([None], {}, [])


def test_the_oldest_matching_silence_holds_it() -> None:
    silences = [Silence(2, device="hn-aq-*"), Silence(5, labels=(("team", "hydro"),)), Silence(9, rule="level-high")]
    assert decide([ev(A, "firing", 1)], silences, {}) == ([5], {A: 0}, [])


def test_the_resolved_event_of_a_held_episode_follows_its_firing_and_the_hold_goes() -> None:
    held = {A: Hold(event_id=40, silence=3, starts_at=at(1))}
    # Whether the silence is still active or not: the receivers never heard of the episode.
    for silences in ([ANY_LEVEL], []):
        assert decide([ev(A, "resolved", 1, young=False)], silences, held) == ([3], {}, [40])


def test_the_resolved_event_of_a_notified_episode_is_not_held_even_while_a_silence_matches() -> None:
    assert decide([ev(A, "resolved", 1)], [ANY_LEVEL], {}) == ([None], {}, [])


def test_a_hold_of_another_episode_is_stale_and_dropped() -> None:
    held = {A: Hold(40, 3, at(0)), B: Hold(41, 3, at(0))}
    by, now_held, dropped = decide([ev(A, "resolved", 1), ev(B, "firing", 2, device="hn-lv-02")], [], held)
    assert (by, now_held, sorted(dropped)) == ([None, None], {}, [40, 41])


def test_episodes_within_one_batch() -> None:
    silence = Silence(3, device="hn-lv-01")
    events = [ev(A, "firing", 1), ev(A, "resolved", 1), ev(A, "firing", 3),
              ev(B, "firing", 1, device="hn-lv-02"), ev(B, "resolved", 1, device="hn-lv-02")]
    by, now_held, dropped = decide(events, [silence], {})
    assert by == [3, 3, 3, None, None]
    assert now_held == {A: 2}  # the last episode's firing event
    assert dropped == []
    # A held firing event and its resolved one in the same batch: nothing is held afterwards.
    assert decide(events[:2], [silence], {}) == ([3, 3], {}, [])


def test_a_new_held_episode_replaces_a_stored_hold() -> None:
    held = {A: Hold(40, 3, at(0))}
    assert decide([ev(A, "resolved", 0), ev(A, "firing", 2)], [Silence(7, rule="level-high")], held) == (
        [3, 7], {A: 1}, [40])


# --- the CLI refuses wrong arguments before any database work ---------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> str:
    """A database URL nobody listens at: any command that reached the database would exit 2 with
    "cannot use the database"."""
    url = f"postgresql://ingest@127.0.0.1:{_closed_port()}/sensor_ingest"
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", url)
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_PASSWORD", "pg-password-never-shown")
    return url


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


ADD = ["silences", "add", "--until", "2h", "--comment", "maintenance"]


@pytest.mark.parametrize(("extra", "says"), [
    (["--device", "*"], "matches every device: put a fixed part of the device id in it"),
    (["--device", "**"], "matches every device: put a fixed part"),
    (["--device", "?*"], "matches every device: put a fixed part"),
    (["--device", "*?*"], "matches every device: put a fixed part"),
    (["--device", "???"], "matches every device whose id has 3 characters"),
    (["--device", ""], "is not a device glob"),
    (["--device", "hn-\x07"], "is not a device glob"),
    (["--rule", "pm 25"], "is not a rule name"),
    (["--label", "district"], "is not a label matcher: write k=v"),
    (["--label", "district="], "is not a label matcher"),
    (["--label", "=hoan-kiem"], "is not a label matcher"),
    (["--label", "my key=x"], "is not a label matcher"),
    (["--rule", "level-high", "--by", " "], "is not a name"),
])
def test_add_refuses_a_bad_matcher(extra: list[str], says: str, nowhere: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert says in _usage_error([*ADD, *extra], capsys)


@pytest.mark.parametrize(("until", "says"), [
    ("2020-01-01T00:00:00Z", "is in the past"),
    ("2099-01-01T00:00:00", "has no UTC offset; add Z or +hh:mm"),
    ("tomorrow", "is neither an RFC 3339 time"),
    ("0s", "is no time at all"),
    ("999999999d", "is longer than a silence may last (10 years, 3650d)"),  # was an OverflowError
    ("9" * 400 + "d", "is longer than a silence may last"),  # an infinite float
    ("3651d", "is longer than a silence may last"),
    ("2200-01-01T00:00:00Z", "is further ahead than a silence may last"),
])
def test_add_refuses_a_bad_until(until: str, says: str, nowhere: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert says in _usage_error(["silences", "add", "--rule", "r", "--until", until, "--comment", "c"], capsys)


def test_add_needs_a_comment_and_an_until(nowhere: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "the following arguments are required: --until, --comment" in _usage_error(
        ["silences", "add", "--rule", "r"], capsys)
    assert "a comment says why" in _usage_error(["silences", "add", "--rule", "r", "--until", "1h", "--comment", "  "],
                                                capsys)


def test_add_needs_a_matcher_and_one_value_per_label(nowhere: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(ADD) == 2
    assert "name at least one of --rule, --device and --label" in capsys.readouterr().err
    assert main([*ADD, "--label", "team=hydro", "--label", "team=roads"]) == 2
    assert "--label team is given two values" in capsys.readouterr().err


def test_until_is_a_time_or_a_duration_from_the_databases_now() -> None:
    assert _until("2h") == 7200.0  # seconds: `silences add` adds them to the database's now()
    assert _until("3650d") == 3650 * 86400.0
    year = datetime.now(UTC).year + 2
    assert _until(f"{year}-11-25T18:00:00+07:00") == datetime(year, 11, 25, 11, 0, tzinfo=UTC)
    assert _until(f"{year}-11-25T11:00:00z") == datetime(year, 11, 25, 11, 0, tzinfo=UTC)


def test_ack_refuses_an_alert_that_is_not_rule_slash_device(nowhere: str, capsys: pytest.CaptureFixture[str]) -> None:
    for alert in ("level-high", "/hn-lv-01", "level-high/"):
        assert main(["alerts", "ack", alert, "--comment", "on it"]) == 2
        assert "is not an alert: write RULE/DEVICE" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["silences", "add", "--rule", "r", "--until", "1h", "--comment", "c"],
    ["silences", "list"],
    ["silences", "expire", "3"],
    ["alerts", "ack", "level-high/hn-lv-01", "--comment", "on it"],
])
def test_a_database_that_cannot_be_reached_exits_2_without_the_password(
        argv: list[str], nowhere: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the database at {nowhere}" in err
    assert "pg-password-never-shown" not in err


@pytest.mark.parametrize("command", [["silences"], ["silences", "add"], ["silences", "list"], ["silences", "expire"],
                                     ["alerts", "ack"]])
def test_help_explains_each_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sensor-ingest {' '.join(command)}")
    assert "SENSOR_INGEST_DATABASE_URL" in out
    if command != ["silences"]:
        assert "Exit 0" in " ".join(out.split())
