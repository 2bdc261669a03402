"""The register's CSV file, read and checked without a database (`sensor-ingest devices import`).

``parse_register`` reports every problem of a file at once, each on the physical line where its row
starts (a quoted cell may span lines); ``plan_import`` says what an import would add and change
against what the register holds. ingest.register.devices runs them before it touches the database.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ingest.validate import MAX_NAME, unstorable

__all__ = ["FIELDS", "Entry", "Plan", "Problem", "Stored", "parse_register", "plan_import"]

Attribute = str | int | float
Change = tuple[Any, Any]  # (stored value or None, the file's value)

MAX_SOURCE = 64  # [[sources]] name's limit in ingest.settings
MAX_VALUE = 1000  # an attribute's text
FIELDS = ("make", "model", "source", "expected_interval")  # the devices columns a file may set
_NUMBERS = {"lat": (-90.0, 90.0), "lon": (-180.0, 180.0), "installation_height": (-math.inf, math.inf)}
_RESERVED = {
    "id": "the register's own row number",
    "first_seen": "set by the service",
    "last_seen": "set by the service",
    "attributes": "each attribute is a column of its own",
}
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong on a line of the file, and how to fix it."""

    line: int
    text: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.text}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One device of the file: None (and an absent attribute) leaves the stored value as it is."""

    line: int
    uid: str
    make: str | None = None
    model: str | None = None
    source: str | None = None
    expected_interval: float | None = None
    attributes: Mapping[str, Attribute] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Stored:
    """A device as the register holds it."""

    make: str | None = None
    model: str | None = None
    source: str | None = None
    expected_interval: float | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    """What an import changes: new devices, existing ones with their changes, how many it leaves as they are."""

    added: list[Entry]
    updated: list[tuple[Entry, dict[str, Change]]]
    unchanged: int


# -- the file, pure -----------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


def _bad_text(text: str, limit: int, controls: bool = False) -> str | None:
    if len(text) > limit:
        return f"is {len(text)} characters long (limit {limit})"
    if not controls and _CONTROL.search(text):
        return "holds a control character (a tab, a line break, ...): remove it"
    return unstorable(text)


def _number(text: str, column: str) -> tuple[float | int | None, str | None]:
    if not _NUMBER.match(text):
        hint = f" with a decimal point ({text.replace(',', '.')})" if re.fullmatch(r"[+-]?\d+,\d+", text) else ""
        return None, f"{column} {_quote(text)} is not a number: write a plain number{hint}, e.g. 21.0285"
    value = float(text)
    low, high = _NUMBERS[column]
    if not math.isfinite(value):
        return None, f"{column} {_quote(text)} is too large"
    if not low <= value <= high:
        return None, f"{column} {text} is out of range: {column} lies between {low:g} and {high:g}"
    # 3 and 3.0 are both stored as 3, so that --where installation_height=3 finds either.
    return (int(value) if value.is_integer() and abs(value) < 2**53 else value), None


def _interval(text: str) -> tuple[float | None, str | None]:
    from ingest.alerts.model import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError:
        return None, (f"expected_interval {_quote(text)} is not a duration: write seconds (300) or a duration "
                      "such as 90s, 5m, 1h")
    if not 0 < seconds < math.inf:
        return None, f"expected_interval {_quote(text)} must be more than 0 seconds"
    return seconds, None


def _header(cells: list[str], line: int, delimiter: str) -> tuple[list[str], list[Problem]]:
    """The columns' names (lower case, "" for an unnamed column; uid becomes device), and the header's problems."""
    names: list[str] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(cells, 1):
        name = raw.strip().lower()
        why = _bad_text(name, MAX_NAME)
        if why:
            problems.append(Problem(line, f"column {n}'s name {_quote(name)} {why}"))
        elif name in _RESERVED:
            problems.append(Problem(line, f"column {n} ({name!r}) cannot be imported ({_RESERVED[name]}): "
                                          "delete the column"))
        key = "device" if name == "uid" else name
        if key and key in seen:
            also = " (uid is another name of device)" if key == "device" else " (names are case-insensitive)"
            problems.append(Problem(line, f"columns {seen[key]} and {n} both name {key!r}{also}: "
                                          "delete or rename one"))
        seen.setdefault(key, n)
        names.append(key)
    if "device" not in seen:
        guess = next((d for d in (";", "\t", ",", "|") if d != delimiter and len(cells) == 1 and d in cells[0]), None)
        hint = (f"; the header is one column {_quote(cells[0])}: is the delimiter {guess!r}? Use "
                f"--delimiter {'tab' if guess == chr(9) else repr(guess)}") if guess else ""
        problems.append(Problem(line, "the header has no 'device' column (or 'uid'): the first line must name the "
                                      f"columns, one of them 'device', the device id{hint}"))
    return names, problems


def _entry(names: list[str], cells: list[str], line: int) -> tuple[Entry | None, list[Problem]]:
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    attributes: dict[str, Attribute] = {}
    extra = [c for c in cells[len(names):] if c.strip()]
    if extra:
        problems.append(Problem(line, f"has {len(cells)} cells but the header names {len(names)} columns: quote a "
                                      "cell that holds the delimiter (\"Hoan Kiem, Hanoi\"), or name the extra column "
                                      "in the header"))
    for n, (name, raw) in enumerate(zip(names, cells, strict=False), 1):
        text = raw.strip()
        if not text or name == "device":
            continue
        if not name:
            problems.append(Problem(line, f"cell {n} ({_quote(text)}) is in a column without a name: name the column "
                                          "in the header, or empty the cell"))
            continue
        why: str | None
        if name in ("make", "model", "source"):
            why = _bad_text(text, MAX_SOURCE if name == "source" else MAX_NAME)
            values[name] = text
            why = f"{name} {_quote(text)} {why}" if why else None
        elif name == "expected_interval":
            values[name], why = _interval(text)
        elif name in _NUMBERS:
            number, why = _number(text, name)
            if number is not None:
                attributes[name] = number
        else:
            why = _bad_text(text, MAX_VALUE, controls=True)
            attributes[name] = text
            why = f"{name} {_quote(text)} {why}" if why else None
        if why:
            problems.append(Problem(line, why))
    device = names.index("device")
    uid = cells[device].strip() if device < len(cells) else ""
    if not uid:
        problems.append(Problem(line, "no device id: fill the device column, or delete the row"))
    elif why := _bad_text(uid, MAX_NAME):
        problems.append(Problem(line, f"device id {_quote(uid)} {why}; the service refuses such ids (bad_device)"))
    if problems:
        return None, problems
    return Entry(line, uid, attributes=attributes, **values), []


def parse_register(text: str, delimiter: str = ",") -> tuple[list[Entry], list[Problem]]:
    """The devices of a register CSV (``text`` already decoded; a leading BOM is ignored) and every
    problem of the file, each on the physical line where its row starts (a quoted cell may span lines).
    A row of empty cells is skipped. Entries are only meaningful when there is no problem."""
    text = text.removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True, strict=True)
    names: list[str] | None = None
    entries: list[Entry] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    device = 0  # the device column's index
    start = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if "end of data" in str(exc):
                why = "a quoted cell is never closed (it runs to the end of the file): close it with \""
            elif "field larger" in str(exc):
                why = f"a cell is longer than {csv.field_size_limit()} characters: is a quote never closed?"
            else:
                why = f"{exc}: a cell that holds a quote must be quoted whole, its quotes doubled (\"12\"\" pipe\")"
            problems.append(Problem(start, why))
            break
        line, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if names is None:
            names, header_problems = _header(cells, line, delimiter)
            if header_problems:
                return [], header_problems
            device = names.index("device")
            continue
        entry, row_problems = _entry(names, cells, line)
        problems.extend(row_problems)
        uid = cells[device].strip() if device < len(cells) else ""
        if uid in first_line:
            problems.append(Problem(line, f"device {_quote(uid)} is also on line {first_line[uid]}: keep one row per "
                                          "device"))
        elif uid:
            first_line[uid] = line
        if entry is not None:
            entries.append(entry)
    if names is None and not problems:
        problems.append(Problem(1, "the file is empty: its first line must name the columns, e.g. device,make,model"))
    return entries, problems


def _changes(entry: Entry, stored: Stored) -> dict[str, Change]:
    out: dict[str, Change] = {}
    for name in FIELDS:
        new = getattr(entry, name)
        if new is not None and new != getattr(stored, name):
            out[name] = (getattr(stored, name), new)
    for key, value in entry.attributes.items():
        old = stored.attributes.get(key)
        if old != value or isinstance(old, bool):  # JSON true is not the number 1
            out[key] = (old, value)
    return out


def plan_import(entries: Sequence[Entry], stored: Mapping[str, Stored]) -> Plan:
    """What importing ``entries`` changes in a register that holds ``stored`` (uid -> device)."""
    added: list[Entry] = []
    updated: list[tuple[Entry, dict[str, Change]]] = []
    for entry in entries:
        if entry.uid not in stored:
            added.append(entry)
        elif changes := _changes(entry, stored[entry.uid]):
            updated.append((entry, changes))
    return Plan(added, updated, len(entries) - len(added) - len(updated))
