"""Topic templates, compiled once at start-up: template -> subscription filter and captures.

A template is an MQTT topic whose levels may be ``{name}`` (captures that level), ``+`` (matches one
level, no capture) or a final ``#`` (matches the rest). ``city/{district}/{device}/up`` subscribes to
``city/+/+/up`` and turns ``city/hoan-kiem/aq-7/up`` into {"district": "hoan-kiem", "device": "aq-7"}.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Route", "Router", "compile_template"]

_CAPTURE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


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

    def match(self, topic: str) -> dict[str, str] | None:
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
            captures["#"] = "/".join(parts[n:])
        return captures


def compile_template(template: str, source: str = "") -> Route:
    """Compile a template; raise ValueError saying what is wrong with it."""
    if not template or template.startswith("$"):
        raise ValueError("must be a non-empty topic that does not start with '$'")
    raw = template.split("/")
    rest = raw[-1] == "#"
    if rest:
        raw = raw[:-1]
    levels: list[str | None] = []
    names: list[str | None] = []
    filt: list[str] = []
    seen: set[str] = set()
    for level in raw:
        m = _CAPTURE.match(level)
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
        elif any(c in level for c in "{}+#"):
            raise ValueError(f"level {level!r}: use {{name}} for a whole level, '+' or a final '#'")
        else:
            levels.append(level)
            names.append(None)
            filt.append(level)
    if rest:
        filt.append("#")
    device_level = names.index("device") if "device" in names else None
    attributes = any(n not in (None, "device", "metric") for n in names)
    return Route(source, template, "/".join(filt), tuple(levels), tuple(names), rest, device_level, attributes)


class Router:
    """Finds the source of a topic: the first route, in config order, that matches."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        # Exact-literal first levels narrow the search for large configs.
        self._by_first: dict[str, list[Route]] = {}
        self._wild_first: list[Route] = []
        for r in self.routes:
            if r.levels and r.levels[0] is not None:
                self._by_first.setdefault(r.levels[0], []).append(r)
            else:
                self._wild_first.append(r)

    @property
    def filters(self) -> list[str]:
        """The subscription filters, each once, in config order."""
        return list(dict.fromkeys(r.filter for r in self.routes))

    def route(self, topic: str) -> tuple[Route, dict[str, str]] | None:
        first = topic.split("/", 1)[0]
        candidates = self._by_first.get(first, [])
        best: tuple[int, Route, dict[str, str]] | None = None
        for r in (*candidates, *self._wild_first):
            caps = r.match(topic)
            if caps is not None:
                order = self.routes.index(r)
                if best is None or order < best[0]:
                    best = (order, r, caps)
        return None if best is None else (best[1], best[2])
