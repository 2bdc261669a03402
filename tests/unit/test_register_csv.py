"""The register CSV, read and checked without a database (ingest.register.devices)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.cli import main
from ingest.register.csvfile import Entry, Problem, Stored, parse_register, plan_import

HANOI = (
    "device,make,model,source,expected_interval,district,lat,lon,installation_height\n"
    "hn-aq-001,Sensirion,SPS30,hanoi-air,5m,Hoan Kiem,21.0285,105.8542,3.5\n"
    "hn-aq-002,Sensirion,SPS30,hanoi-air,300,Ba Dinh,21.0341,105.8372,4\n"
    "hn-wl-001,Vega,Puls 31,hanoi-water,60s,Tay Ho,21.0590,105.8210,-1.25\n"
)


def problems(text: str, delimiter: str = ",") -> list[str]:
    _, found = parse_register(text, delimiter)
    assert found, "expected problems"
    return [str(p) for p in found]


def test_a_good_file_gives_every_field_and_attribute_typed() -> None:
    entries, found = parse_register(HANOI)
    assert found == []
    assert entries == [
        Entry(2, "hn-aq-001", "Sensirion", "SPS30", "hanoi-air", 300.0,
              {"district": "Hoan Kiem", "lat": 21.0285, "lon": 105.8542, "installation_height": 3.5}),
        Entry(3, "hn-aq-002", "Sensirion", "SPS30", "hanoi-air", 300.0,
              {"district": "Ba Dinh", "lat": 21.0341, "lon": 105.8372, "installation_height": 4}),
        Entry(4, "hn-wl-001", "Vega", "Puls 31", "hanoi-water", 60.0,
              {"district": "Tay Ho", "lat": 21.059, "lon": 105.821, "installation_height": -1.25}),
    ]
    # An integral number is stored as an integer: --where installation_height=4 finds "4" and "4.0".
    assert type(entries[1].attributes["installation_height"]) is int


def test_header_names_are_case_insensitive_trimmed_and_uid_is_device() -> None:
    entries, found = parse_register(" UID , Make ,Expected_Interval\nx-1 ,  Acme  , 1.5h \n")
    assert found == []
    assert entries == [Entry(2, "x-1", make="Acme", expected_interval=5400.0)]


def test_a_bom_is_ignored() -> None:
    entries, found = parse_register("\ufeffdevice,make\nhn-1,Acme\n")
    assert found == []
    assert entries == [Entry(2, "hn-1", make="Acme")]


def test_empty_cells_leave_fields_and_attributes_out_and_short_rows_are_empty_cells() -> None:
    entries, found = parse_register("device,make,model,district,lat\nhn-1,,M,,\nhn-2\nhn-3,,,,21\n")
    assert found == []
    assert entries == [Entry(2, "hn-1", model="M"), Entry(3, "hn-2"), Entry(4, "hn-3", attributes={"lat": 21})]


def test_unknown_columns_become_text_attributes_under_their_lower_case_name() -> None:
    entries, found = parse_register("device,Owner,Pole ID,street\nhn-1,URENCO,P-17,12\n")
    assert found == []
    assert entries == [Entry(2, "hn-1", attributes={"owner": "URENCO", "pole id": "P-17", "street": "12"})]


def test_blank_rows_are_skipped_and_keep_the_line_count() -> None:
    entries, found = parse_register("\n\ndevice\n\nhn-1\n,\n  ,  \nhn-2\n")
    assert found == []
    assert [(e.line, e.uid) for e in entries] == [(5, "hn-1"), (8, "hn-2")]


def test_a_quoted_cell_with_line_breaks_shifts_the_following_line_numbers() -> None:
    text = ('device,notes,lat\n'
            'hn-1,"on the pole\nby the lake\r\nnorth side",21\n'  # lines 2-4
            'hn-2,,x\n'                                             # line 5
            '"hn\n3",,\n'                                           # lines 6-7: a line break in the id
            'hn-4,,91\n')                                           # line 8
    entries, found = parse_register(text)
    assert [str(p) for p in found] == [
        "line 5: lat 'x' is not a number: write a plain number, e.g. 21.0285",
        "line 6: device id 'hn\\n3' holds a control character (a tab, a line break, ...): remove it; the service "
        "refuses such ids (bad_device)",
        "line 8: lat 91 is out of range: lat lies between -90 and 90",
    ]
    assert entries[0] == Entry(2, "hn-1", attributes={"notes": "on the pole\nby the lake\r\nnorth side", "lat": 21})


def test_a_quoted_delimiter_and_doubled_quotes_are_one_cell() -> None:
    entries, found = parse_register('device, district, model\nhn-1, "Hoan Kiem, Hanoi", "12"" pipe"\n')
    assert found == []
    assert entries == [Entry(2, "hn-1", model='12" pipe', attributes={"district": "Hoan Kiem, Hanoi"})]


def test_another_delimiter() -> None:
    entries, found = parse_register("device;lat;district\nhn-1;21,03;Ba Dinh\n", ";")
    assert [str(p) for p in found] == [
        "line 2: lat '21,03' is not a number: write a plain number with a decimal point (21.03), e.g. 21.0285"]
    entries, found = parse_register("device\tlat\nhn-1\t21.03\n", "\t")
    assert (entries, found) == ([Entry(2, "hn-1", attributes={"lat": 21.03})], [])


@pytest.mark.parametrize(("cell", "why"), [
    ("abc", "lon 'abc' is not a number: write a plain number, e.g. 21.0285"),
    ("1_000", "lon '1_000' is not a number: write a plain number, e.g. 21.0285"),
    ("nan", "lon 'nan' is not a number: write a plain number, e.g. 21.0285"),
    ("inf", "lon 'inf' is not a number: write a plain number, e.g. 21.0285"),
    ("105.8E", "lon '105.8E' is not a number: write a plain number, e.g. 21.0285"),
    ("180.5", "lon 180.5 is out of range: lon lies between -180 and 180"),
    ("-181", "lon -181 is out of range: lon lies between -180 and 180"),
    ("1e999", "lon '1e999' is too large"),
])
def test_bad_numbers(cell: str, why: str) -> None:
    assert problems(f"device,lon\nhn-1,{cell}\n") == [f"line 2: {why}"]


def test_numbers_in_every_accepted_spelling() -> None:
    entries, found = parse_register("device,lat,lon,installation_height\nhn-1,-90,+180,1e2\nhn-2,.5,-0.25,0\n")
    assert found == []
    assert [dict(e.attributes) for e in entries] == [
        {"lat": -90, "lon": 180, "installation_height": 100},
        {"lat": 0.5, "lon": -0.25, "installation_height": 0},
    ]


@pytest.mark.parametrize(("cell", "why"), [
    ("0", "expected_interval '0' must be more than 0 seconds"),
    ("0s", "expected_interval '0s' must be more than 0 seconds"),
    ("-5", "expected_interval '-5' is not a duration: write seconds (300) or a duration such as 90s, 5m, 1h"),
    ("5 minutes", "expected_interval '5 minutes' is not a duration: write seconds (300) or a duration such as 90s, "
                  "5m, 1h"),
])
def test_bad_expected_intervals(cell: str, why: str) -> None:
    assert problems(f"device,expected_interval\nhn-1,{cell}\n") == [f"line 2: {why}"]


def test_device_ids_that_the_service_would_refuse() -> None:
    long_id = "d" * 201
    text = f"device,make\n,Acme\n{long_id},Acme\n\"a\tb\",Acme\n\"a\x00b\",Acme\n{'e' * 200},Acme\n"
    assert problems(text) == [
        "line 2: no device id: fill the device column, or delete the row",
        f"line 3: device id '{'d' * 40}…' is 201 characters long (limit 200); the service refuses such ids "
        "(bad_device)",
        "line 4: device id 'a\\tb' holds a control character (a tab, a line break, ...): remove it; the service "
        "refuses such ids (bad_device)",
        "line 5: device id 'a\\x00b' holds a control character (a tab, a line break, ...): remove it; the service "
        "refuses such ids (bad_device)",
    ]


def test_texts_that_cannot_be_stored() -> None:
    text = (f"device,make,source,notes\nhn-1,{'m' * 201},,\nhn-2,,{'s' * 65},\nhn-3,,,\"a\x00b\"\n"
            f"hn-4,,,{'n' * 1001}\nhn-5,,,\"a\tb\"\n")
    assert problems(text) == [
        f"line 2: make '{'m' * 40}…' is 201 characters long (limit 200)",
        f"line 3: source '{'s' * 40}…' is 65 characters long (limit 64)",
        "line 4: notes 'a\\x00b' holds a NUL character",
        f"line 5: notes '{'n' * 40}…' is 1001 characters long (limit 1000)",
    ]  # hn-5: a tab in an attribute's text is kept


def test_the_same_device_twice_names_both_lines_also_when_the_first_row_is_bad() -> None:
    assert problems("device,lat\nhn-1,1\nhn-2,2\nhn-1,3\nhn-3,x\nhn-3,4\n") == [
        "line 4: device 'hn-1' is also on line 2: keep one row per device",
        "line 5: lat 'x' is not a number: write a plain number, e.g. 21.0285",
        "line 6: device 'hn-3' is also on line 5: keep one row per device",
    ]


def test_more_cells_than_the_header_names() -> None:
    assert problems("device,district\nhn-1,Hoan Kiem,Hanoi\nhn-2,Ba Dinh,,\n") == [
        "line 2: has 3 cells but the header names 2 columns: quote a cell that holds the delimiter (\"Hoan Kiem, "
        "Hanoi\"), or name the extra column in the header"]  # hn-2's extra cells are empty: no problem


def test_a_cell_in_a_column_without_a_name() -> None:
    entries, found = parse_register("device,,make,\nhn-1,,Acme,\n")  # Excel's empty trailing columns
    assert (entries, found) == ([Entry(2, "hn-1", make="Acme")], [])
    assert problems("device,,make\nhn-1,x,Acme\n") == [
        "line 2: cell 2 ('x') is in a column without a name: name the column in the header, or empty the cell"]


def test_every_problem_of_every_row_is_reported() -> None:
    assert problems("device,lat,lon,expected_interval\nhn-1,x,200,0\n,1,1,1\n") == [
        "line 2: lat 'x' is not a number: write a plain number, e.g. 21.0285",
        "line 2: lon 200 is out of range: lon lies between -180 and 180",
        "line 2: expected_interval '0' must be more than 0 seconds",
        "line 3: no device id: fill the device column, or delete the row",
    ]


def test_a_header_without_device() -> None:
    assert problems("name,make\nhn-1,Acme\n") == [
        "line 1: the header has no 'device' column (or 'uid'): the first line must name the columns, one of them "
        "'device', the device id"]


def test_a_header_without_device_in_another_delimiter_suggests_it() -> None:
    assert problems("device;make\nhn-1;Acme\n") == [
        "line 1: the header has no 'device' column (or 'uid'): the first line must name the columns, one of them "
        "'device', the device id; the header is one column 'device;make': is the delimiter ';'? Use --delimiter ';'"]
    assert problems("device\tmake\n").pop().endswith("is the delimiter '\\t'? Use --delimiter tab")


def test_duplicate_and_reserved_header_names() -> None:
    assert problems("device,Make,make ,uid,last_seen,id\nhn-1\n") == [
        "line 1: columns 2 and 3 both name 'make' (names are case-insensitive): delete or rename one",
        "line 1: columns 1 and 4 both name 'device' (uid is another name of device): delete or rename one",
        "line 1: column 5 ('last_seen') cannot be imported (set by the service): delete the column",
        "line 1: column 6 ('id') cannot be imported (the register's own row number): delete the column",
    ]


def test_a_header_name_with_a_control_character() -> None:
    assert problems('device,"a\x01b"\nhn-1,x\n') == [
        "line 1: column 2's name 'a\\x01b' holds a control character (a tab, a line break, ...): remove it"]


def test_an_empty_file() -> None:
    for text in ("", "\ufeff", "\n \n,,\n"):
        assert problems(text) == [
            "line 1: the file is empty: its first line must name the columns, e.g. device,make,model"]


def test_a_header_only_file_has_no_device_and_no_problem() -> None:
    assert parse_register("device,make\n") == ([], [])


def test_quotes_that_break_the_csv() -> None:
    assert problems('device,notes\nhn-1,ok\nhn-2,"never closed\nhn-3,x\n') == [
        'line 3: a quoted cell is never closed (it runs to the end of the file): close it with "']
    assert problems('device,notes\nhn-1,"a"b\n') == [
        "line 2: ',' expected after '\"': a cell that holds a quote must be quoted whole, its quotes doubled "
        "(\"12\"\" pipe\")"]


def test_problems_before_a_broken_quote_are_kept() -> None:
    assert problems('device,lat\nhn-1,x\nhn-2,"1\n') == [
        "line 2: lat 'x' is not a number: write a plain number, e.g. 21.0285",
        'line 3: a quoted cell is never closed (it runs to the end of the file): close it with "',
    ]


def test_problem_text() -> None:
    assert str(Problem(7, "what")) == "line 7: what"


# -- the plan ----------------------------------------------------------------------------------------------


def test_plan_adds_updates_and_counts_the_unchanged() -> None:
    entries, _ = parse_register("device,make,model,district,lat\nnew,A,,,\nsame,A,M,Ba Dinh,21\nmoved,,,Tay Ho,\n"
                                "more,,M2,,21.5\n")
    stored = {
        "same": Stored("A", "M", None, None, {"district": "Ba Dinh", "lat": 21, "owner": "x"}),
        "moved": Stored("A", "M", "native", 60.0, {"district": "Ba Dinh"}),
        "more": Stored("A", None, None, None, {"lat": "21.5"}),
    }
    plan = plan_import(entries, stored)
    assert [e.uid for e in plan.added] == ["new"]
    assert [(e.uid, changes) for e, changes in plan.updated] == [
        ("moved", {"district": ("Ba Dinh", "Tay Ho")}),
        ("more", {"model": (None, "M2"), "lat": ("21.5", 21.5)}),  # text "21.5" becomes the number
    ]
    assert plan.unchanged == 1


def test_plan_compares_fields_and_attributes_by_value() -> None:
    entries, _ = parse_register("device,expected_interval,height,lat\na,5m,,\nb,,x,\nc,,,1\n")
    plan = plan_import(entries, {
        "a": Stored(expected_interval=300.0),
        "b": Stored(attributes={"height": "x"}),
        "c": Stored(attributes={"lat": True}),  # JSON true is not the number 1
    })
    assert (plan.added, plan.unchanged) == ([], 2)
    assert [(e.uid, c) for e, c in plan.updated] == [("c", {"lat": (True, 1)})]


# -- the command, before any database ----------------------------------------------------------------------

NO_DATABASE = "postgresql://nobody@127.0.0.1:9/none"


@pytest.mark.usefixtures("_restore_logging")
def test_a_bad_file_is_refused_before_the_database_is_reached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", NO_DATABASE)
    bad = tmp_path / "bad.csv"
    bad.write_text("device,lat\nhn-1,91\nhn-1,1\n", encoding="utf-8")
    assert main(["devices", "import", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == (f"sensor-ingest: {bad}: 2 problem(s); nothing imported:\n"
                   "  line 2: lat 91 is out of range: lat lies between -90 and 90\n"
                   "  line 3: device 'hn-1' is also on line 2: keep one row per device\n")


@pytest.mark.usefixtures("_restore_logging")
def test_a_file_that_is_not_utf8_or_not_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", NO_DATABASE)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("device,district\nhn-1,Hoan Kiem\nhn-2,Café\n".encode("latin-1"))
    assert main(["devices", "import", str(latin)]) == 1
    assert capsys.readouterr().err == (
        f"sensor-ingest: {latin}: line 3: not UTF-8 text (byte 0xe9); nothing imported. Save the file as UTF-8 "
        "(in Excel: CSV UTF-8)\n")
    assert main(["devices", "import", str(tmp_path / "missing.csv")]) == 2
    assert capsys.readouterr().err == (
        f"sensor-ingest: {tmp_path / 'missing.csv'}: cannot read the file: No such file or directory\n")


@pytest.mark.usefixtures("_restore_logging")
def test_a_good_file_needs_the_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", NO_DATABASE)
    good = tmp_path / "good.csv"
    good.write_text(HANOI, encoding="utf-8")
    assert main(["devices", "import", str(good), "--dry-run"]) == 2
    assert "cannot reach the database at postgresql://nobody@127.0.0.1:9/none" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["import", "f.csv", "--delimiter", "ab"], "'ab' is not a delimiter"),
    (["import", "f.csv", "--delimiter", '"'], "is not a delimiter"),
    (["list", "--where", "district"], "'district': write KEY=VALUE"),
    (["list", "--where", "=x"], "'=x': write KEY=VALUE"),
    (["list", "--limit", "0"], "0 is not positive"),
])
def test_argument_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["devices", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_help_says_what_an_empty_cell_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["devices", "import", "--help"])
    out = capsys.readouterr().out
    assert "An empty cell leaves that field or attribute as it is" in " ".join(out.split())
    assert "SENSOR_INGEST_DATABASE_URL" in out
