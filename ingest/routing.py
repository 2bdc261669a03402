"""Topic templates, compiled once at start-up: template -> subscription filter and captures.

A template is an MQTT topic whose levels may be ``{name}`` (captures that level), ``{name:glob}``
(captures a level that matches the glob, e.g. ``{device:shelly*}``), ``+`` (matches one level, no
capture), a final ``#`` (matches the rest) or a final ``{name#}`` (captures the rest, one level or
more, with its '/': Zigbee2MQTT's friendly names). ``city/{district}/{device}/up`` subscribes to
``city/+/+/up`` and turns ``city/hoan-kiem/aq-7/up`` into {"district": "hoan-kiem", "device": "aq-7"}.

A route may also exclude topics (``exclude``: globs on the whole topic, where ``*`` spans levels):
an excluded topic is not this route's, though its filter brings it in (Zigbee2MQTT's ``bridge/``).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase, translate

__all__ = ["Route", "Router", "compile_template", "filter_matches", "filters_overlap", "subscription_ids"]

_CAPTURE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(?::([^{}/+#]+))?\}$")
_REST_CAPTURE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)#\}$")


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled template. ``levels[i]`` is a literal, or None for a wildcard level."""

    source: str
    template: str
    filter: str
    levels: tuple[str | None, ...]
    names: tuple[str | None, ...]  # capture name of each level, or None
    rest: bool  # ends with '#'
    device_level: int | None = None  # the index of the level captured as {device}
    attributes: bool = False  # captures other than device and metric (device attributes)
    patterns: tuple[str | None, ...] = ()  # the glob of each {name:glob} level, else None
    rest_name: str | None = None  # the name of a final {name#}
    exclude: re.Pattern[str] | None = None  # topics that are not this route's

    def match(self, topic: str, parts: list[str] | None = None) -> dict[str, str] | None:
        """The captures of ``topic``, or None when it is not this route's (excluded ones included).
        ``parts``: the topic split at '/', when the caller has it."""
        captures = self.match_filter(topic, parts)
        if captures is None or (self.exclude is not None and self.exclude.match(topic)):
            return None
        if self.patterns:
            for name, pattern in zip(self.names, self.patterns, strict=True):
                if pattern is not None and not fnmatchcase(captures[name or ""], pattern):
                    return None
        return captures

    def match_filter(self, topic: str, parts: list[str] | None = None) -> dict[str, str] | None:
        """The captures of ``topic`` when the subscription filter matches it (exclusions and level
        globs not applied)."""
        if parts is None:
            parts = topic.split("/")
        n = len(self.levels)
        if len(parts) < n or (not self.rest and len(parts) != n):
            return None
        captures: dict[str, str] = {}
        for part, literal, name in zip(parts, self.levels, self.names, strict=False):
            if literal is not None:
                if part != literal:
                    return None
            elif name is not None:
                if not part:
                    return None
                captures[name] = part
        if self.rest:
            rest = "/".join(parts[n:])
            if self.rest_name is not None:
                if not rest.strip("/"):
                    return None
                captures[self.rest_name] = rest
            else:
                captures["#"] = rest
        return captures


def _levels_overlap(a: list[str], b: list[str]) -> bool:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x == "#" or y == "#":
            # '#' matches the rest, the parent level included: a/# matches a, and a/+/# matches a/b.
            return True
        if x != y and x != "+" and y != "+":
            return False
        if i == min(len(a), len(b)) - 1 and len(a) != len(b):
            longer = a if len(a) > len(b) else b
            return longer[i + 1] == "#" and len(longer) == i + 2
    return len(a) == len(b)


def filters_overlap(filters: Sequence[str]) -> bool:
    """Whether some topic matches two of the (distinct) subscription filters."""
    split = [f.split("/") for f in dict.fromkeys(filters)]
    return any(_levels_overlap(a, b) for i, a in enumerate(split) for b in split[i + 1:])


def filter_matches(filter_: str, topic: str) -> bool:
    """Whether the subscription filter matches the topic (MQTT's rules: '+' one level, a final '#'
    the rest including its parent level)."""
    levels, parts = filter_.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(parts) or (level != "+" and level != parts[i]):
            return False
    return len(parts) == len(levels)


_MAX_SUBSCRIPTION_ID = 268_435_455  # MQTT v5: a Variable Byte Integer of 1 to 268,435,455


def subscription_ids(filters: Sequence[str]) -> list[int]:
    """The subscription identifier of each filter, or 0 for one that overlaps no other (subscribed
    without one, so that its messages carry no identifier property, which paho parses at a cost).

    An identifier is derived from the filter's text, not its position: a message queued in the
    broker's session keeps the identifier it was matched with, and that must still name the same
    filter after a restart with sources or presets added or removed. Every filter of an overlapping
    pair gets one, so that a broker that sends a topic once with the identifiers of all its
    subscriptions (MQTT v5 allows that instead of a copy per subscription) names the routed one too.
    """
    split = [f.split("/") for f in filters]
    ids: list[int] = []
    used: set[int] = set()
    for i, levels in enumerate(split):
        others = (other for j, other in enumerate(split) if filters[j] != filters[i])
        if not any(_levels_overlap(levels, other) for other in others):
            ids.append(0)
            continue
        sid = zlib.crc32(filters[i].encode()) % _MAX_SUBSCRIPTION_ID + 1
        while sid in used:  # another filter's text hashed here: the next free one
            sid = sid % _MAX_SUBSCRIPTION_ID + 1
        used.add(sid)
        ids.append(sid)
    return ids


def compile_exclude(globs: Sequence[str]) -> re.Pattern[str] | None:
    """One pattern for topic globs (fnmatch: ``*`` spans levels, ``?`` one character), or None."""
    if not globs:
        return None
    return re.compile("|".join(f"(?:{translate(g)})" for g in globs))


def compile_template(template: str, source: str = "", exclude: Sequence[str] = ()) -> Route:
    """Compile a template; raise ValueError saying what is wrong with it."""
    if not template or template.startswith("$"):
        raise ValueError("must be a non-empty topic that does not start with '$'")
    raw = template.split("/")
    rest = raw[-1] == "#"
    rest_match = _REST_CAPTURE.match(raw[-1])
    rest_name = rest_match.group(1) if rest_match else None
    if rest or rest_match:
        raw = raw[:-1]
        rest = True
    levels: list[str | None] = []
    names: list[str | None] = []
    patterns: list[str | None] = []
    filt: list[str] = []
    seen: set[str] = {rest_name} if rest_name else set()
    for level in raw:
        m = _CAPTURE.match(level)
        patterns.append(m.group(2) if m else None)
        if m:
            name = m.group(1)
            if name in seen:
                raise ValueError(f"captures {{{name}}} twice")
            seen.add(name)
            levels.append(None)
            names.append(name)
            filt.append("+")
        elif level == "+":
            levels.append(None)
            names.append(None)
            filt.append("+")
        elif _REST_CAPTURE.match(level):
            raise ValueError(f"level {level!r}: a capture of several levels ({{name#}}) must be the last level")
        elif any(c in level for c in "{}+#"):
            raise ValueError(f"level {level!r}: use {{name}} or {{name:glob}} for a whole level, '+', "
                             "or a final '#' or {name#}")
        else:
            levels.append(level)
            names.append(None)
            filt.append(level)
    if rest:
        filt.append("#")
    device_level = names.index("device") if "device" in names else None
    attributes = any(n not in (None, "device", "metric") for n in (*names, rest_name))
    return Route(source, template, "/".join(filt), tuple(levels), tuple(names), rest, device_level, attributes,
                 tuple(patterns) if any(patterns) else (), rest_name, compile_exclude(exclude))


class Router:
    """Finds the source of a topic: the first route, in config order, that matches."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        # Exact-literal first levels narrow the search for large configs; each entry keeps its
        # config order. A wildcard-first route keeps the index and text of its first literal level.
        self._by_first: dict[str, list[tuple[int, Route]]] = {}
        self._wild_first: list[tuple[int, Route, int, str]] = []
        for order, r in enumerate(self.routes):
            if r.levels and r.levels[0] is not None:
                self._by_first.setdefault(r.levels[0], []).append((order, r))
            else:
                at = next((i for i, level in enumerate(r.levels) if level is not None), -1)
                self._wild_first.append((order, r, at, (r.levels[at] or "") if at >= 0 else ""))

    @property
    def filters(self) -> list[str]:
        """The subscription filters, each once, in config order."""
        return list(dict.fromkeys(r.filter for r in self.routes))

    def route(self, topic: str) -> tuple[Route, dict[str, str]] | None:
        """The first route in config order that takes ``topic``, with its captures."""
        parts = topic.split("/")
        found: tuple[Route, dict[str, str]] | None = None
        limit = len(self.routes)
        for order, r in self._by_first.get(parts[0], ()):  # in config order: the first match wins
            caps = r.match(topic, parts)
            if caps is not None:
                found, limit = (r, caps), order
                break
        n = len(parts)
        # A route whose first level is a wildcard wins only when it comes earlier in config order.
        # A cheap test first: its level count and one literal level (most such routes have one).
        for order, r, at, literal in self._wild_first:
            if order >= limit:
                break
            if (n < len(r.levels) or (n != len(r.levels) and not r.rest)) or (at >= 0 and parts[at] != literal):
                continue
            caps = r.match(topic, parts)
            if caps is not None:
                return r, caps
        return found

    def excluded(self, topic: str) -> str | None:
        """The first source whose filter brings ``topic`` in though the source excludes it (its
        ``exclude`` globs, or a level glob); asked only for topics no other route takes."""
        for r in self.routes:
            if (r.exclude is not None or r.patterns) and r.match_filter(topic) is not None and r.match(topic) is None:
                return r.source
        return None
