"""The pure parts of `sensor-ingest rejected` and `replay`: payload display, filters to SQL, arguments."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.cli import build_parser, main
from ingest.quarantine import Filters, as_text, hexdump, replay_status
from ingest.replay import ReplayTally


def test_the_hex_dump_is_hexdump_c() -> None:
    data = b'{"a": 1}\n\x00\xff\x1bABCDEFGHIJKLMNOPQRSTUVWXYZ'
    # What `printf ... | hexdump -C` prints for these bytes.
    assert hexdump(data) == (
        '00000000  7b 22 61 22 3a 20 31 7d  0a 00 ff 1b 41 42 43 44  |{"a": 1}....ABCD|\n'
        "00000010  45 46 47 48 49 4a 4b 4c  4d 4e 4f 50 51 52 53 54  |EFGHIJKLMNOPQRST|\n"
        "00000020  55 56 57 58 59 5a                                 |UVWXYZ|\n"
        "00000026"
    )


def test_the_hex_dump_of_short_and_empty_payloads() -> None:
    assert hexdump(b"") == "00000000"
    assert hexdump(b"\x7f\x80 ~") == "00000000  7f 80 20 7e" + " " * 39 + "|.. ~|\n00000004"
    eight = hexdump(bytes(range(0x30, 0x38))).splitlines()[0]
    assert eight == "00000000  30 31 32 33 34 35 36 37" + " " * 27 + "|01234567|"  # as hexdump -C


@pytest.mark.parametrize(("payload", "text"), [
    (b'{"pm25": 12.5}', '{"pm25": 12.5}'),
    (b"line one\r\n\tline two\n", "line one\r\n\tline two\n"),
    ("Hà Nội, 30 °C".encode(), "Hà Nội, 30 °C"),
    (b"", ""),
])
def test_valid_utf8_without_control_characters_is_text(payload: bytes, text: str) -> None:
    assert as_text(payload) == text


@pytest.mark.parametrize("payload", [
    b'{"a": 1}\x00',  # NUL
    b"\x1b[31mred\x1b[0m",  # a terminal escape sequence
    b"bell\x07",
    b"del\x7f",
    "next line\u0085".encode(),  # a C1 control, valid UTF-8
    b"\xff\xfe{}",  # not UTF-8
    b"\xed\xa0\x80",  # an encoded surrogate: not valid UTF-8
    b"cut \xe1\xbb",  # a truncated multi-byte sequence (a too_large row's cut)
    b"\x0bvertical tab, \x0cform feed",
])
def test_control_characters_or_invalid_utf8_are_binary(payload: bytes) -> None:
    assert as_text(payload) is None


def test_no_filter_is_no_condition() -> None:
    assert Filters().conditions(numbered=True) == ([], [])
    assert Filters().shown() == ""


def test_filters_become_parameterised_conditions_for_either_driver() -> None:
    t = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
    f = Filters(("no_source", "bad_unit"), ("city",), t, "hn_aq-*", replayed=False)
    sql, params = f.conditions(numbered=True, first=3)
    assert sql == ["reason = ANY($3::text[])", "source = ANY($4::text[])", "received_at >= $5",
                   "device_uid LIKE $6", "replayed_at IS NULL"]
    # The glob's _ is a literal underscore, not LIKE's any-character.
    assert params == [["no_source", "bad_unit"], ["city"], t, "hn\\_aq-%"]
    psql, pparams = f.conditions(numbered=False)
    assert psql == [s.replace("$3", "%s").replace("$4", "%s").replace("$5", "%s").replace("$6", "%s") for s in sql]
    assert pparams == params
    assert f.shown() == " (reason no_source, bad_unit; source city; since 2026-11-25 03:00:00Z; device hn_aq-*; " \
        "not replayed)"


def test_a_value_never_enters_the_sql_text() -> None:
    evil = "x'; DROP TABLE readings; --"
    sql, params = Filters((), (evil,), None, evil, replayed=True).conditions(numbered=True)
    assert all(evil not in s and "DROP" not in s for s in sql)
    assert sql[-1] == "replayed_at IS NOT NULL"
    assert params == [[evil], evil]


def test_filters_from_the_command_line() -> None:
    args = build_parser().parse_args(["rejected", "--reason", "no_source", "--reason", "malformed", "--source", "a",
                                      "--device", "hn-*", "--since", "2026-11-25T10:00:00+07:00", "--replayed"])
    f = Filters.of(args)
    assert f == Filters(("no_source", "malformed"), ("a",), datetime(2026, 11, 25, 3, 0, tzinfo=UTC), "hn-*", True)
    args = build_parser().parse_args(["replay", "--since", "2h", "--batch", "7", "--dry-run"])
    f = Filters.of(args)
    assert f.replayed is None
    assert f.since is not None
    assert args.batch == 7
    assert args.dry_run
    assert (datetime.now(UTC) - f.since).total_seconds() == pytest.approx(7200, abs=60)


def test_config_and_json_are_read_before_or_after_show() -> None:
    parse = build_parser().parse_args
    for argv in (["rejected", "-c", "f.toml", "--json", "show", "5"],
                 ["rejected", "show", "5", "-c", "f.toml", "--json"]):
        args = parse(argv)
        assert (args.rejected_command, args.id, args.config, args.json, args.hex) == ("show", 5, Path("f.toml"), True,
                                                                                      False)
    args = parse(["rejected", "show", "5"])
    assert (args.config, args.json) == (None, False)
    assert parse(["rejected"]).rejected_command is None


@pytest.mark.parametrize("argv", [
    ["rejected", "--replayed", "--not-replayed"],
    ["rejected", "--reason", "no-such-reason"],
    ["rejected", "--since", "yesterday"],
    ["rejected", "--limit", "0"],
    ["rejected", "show", "abc"],
    ["replay", "--batch", "0"],
    ["replay", "--replayed"],  # replay takes only rows not yet replayed
])
def test_bad_arguments_exit_2_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_replay_status_of_a_row() -> None:
    t = datetime(2026, 11, 25, tzinfo=UTC)
    assert replay_status(None, None, None) == "not_replayed"
    assert replay_status(t, None, None) == "stored"
    assert replay_status(t, None, "nothing to store: ...") == "skipped"
    assert replay_status(t, "out_of_range", "temperature 149 degC ...") == "still_rejected"


def test_the_summary_json_names_its_figures() -> None:
    t = ReplayTally(matching=5, not_replayable=1, replayed=5, batches=1, stored=7, duplicates=2, rows_stored=3)
    t.still["out_of_range"] += 2
    t.partly = 1
    assert t.as_json() == {"dry_run": False, "matching": 5, "not_replayable": 1, "rows_replayed": 5, "batches": 1,
                           "readings_stored": 7, "duplicates": 2, "rows_stored": 3, "rows_skipped": {},
                           "rows_still_rejected": {"out_of_range": 2}, "rows_partly_stored": 1, "interrupted": False}
    dry = ReplayTally(dry_run=True, stored=4).as_json()
    assert dry["readings_valid"] == 4
    assert "readings_stored" not in dry
    assert "duplicates" not in dry


def test_a_config_that_fails_to_load_is_the_config_error_path(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nname = "city"\ntopic = "city/{device}"\nformat = "no-such-format"\n')
    assert main(["replay", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err
    assert "no-such-format" in err
