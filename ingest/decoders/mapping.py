"""A source's mapping: how decoded metric names and values become stored ones. Pure.

A decoder names each reading by where it found it (a JSON path, ``<measurement>.<field>``, a topic's
levels); the mapping, keyed by that *decoded* name, then says per metric:

- ``ignore``: the leaf is not a reading (counted as ignored, not stored);
- ``value_map``: a string becomes a number or boolean ({"ON": 1, "OFF": 0});
- ``state``: its strings are text states (stored in ``states``);
- ``scale`` and ``offset``: a number becomes ``value * scale + offset`` (booleans are left alone);
- ``unit``: the unit of the stored value (after scale and offset), replacing the payload's;
- ``rename``: the stored metric name.

Rules are exact names or globs (fnmatch, case-sensitive, ``*`` also matches '.'). What an exact name's
rule says wins over any glob's; the globs that match complete it field by field, the earlier first
(``metrics`` tables in the order written, then ``rename``, ``ignore`` and ``states``). A name listed
exactly is a reading even when an ignore glob matches it, unless its own rule ignores it.
Decoders ask ``text()`` what a string leaf becomes while they walk the payload; ``apply()`` does
the rest to every decoder's readings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Final

from ingest.model import Reading, Rejection

__all__ = ["EMPTY", "MetricRule", "SourceMapping", "apply", "number_of_text"]

_GLOB = re.compile(r"[*?\[]")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_CACHE_LIMIT = 65536  # decoded names remembered per source; cleared when full (publishers choose names)
_CACHED_NAME = 200  # validate.MAX_NAME: a longer name is rejected anyway, and is not worth memory


def _quote(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")


def number_of_text(text: str) -> float | None:
    """A string-encoded decimal number ("18.83", " -4", "1e3") as a float, else None.

    Only plain decimal notation counts: "nan", "inf", "0x1A", "1_000" and "" are not numbers.
    """
    s = text.strip()
    if not s or not _NUMBER.fullmatch(s):  # linear; float() of a long digit string is too
        return None
    value = float(s)
    return value if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class MetricRule:
    """What the mapping says about one decoded metric name. None: this rule does not say."""

    rename: str | None = None
    ignore: bool | None = None
    state: bool | None = None
    scale: float | None = None
    offset: float | None = None
    unit: str | None = None
    value_map: MappingABC[str, float | bool] | None = None

    @property
    def changes_value(self) -> bool:
        return (self.scale is not None and self.scale != 1.0) or (self.offset is not None and self.offset != 0.0)


_NO_RULE: Final = MetricRule()


def _merge(a: MetricRule, b: MetricRule) -> MetricRule:
    """``a`` completed by ``b``: each field ``a`` does not set takes ``b``'s."""
    return MetricRule(
        rename=a.rename if a.rename is not None else b.rename,
        ignore=a.ignore if a.ignore is not None else b.ignore,
        state=a.state if a.state is not None else b.state,
        scale=a.scale if a.scale is not None else b.scale,
        offset=a.offset if a.offset is not None else b.offset,
        unit=a.unit if a.unit is not None else b.unit,
        value_map=a.value_map if a.value_map is not None else b.value_map,
    )


@dataclass(slots=True, eq=False)  # one per source, compared by identity
class SourceMapping:
    """Compiled once per source. ``rules``: (name or glob, rule), in config order.

    ``value_map`` applies to every string leaf that has no value_map of its own.
    ``time_field`` and ``device_field``: dotted payload paths, read by the decoders that have them.
    """

    rules: tuple[tuple[str, MetricRule], ...] = ()
    value_map: MappingABC[str, float | bool] | None = None
    time_field: str | None = None
    device_field: str | None = None
    _exact: dict[str, MetricRule] = field(default_factory=dict, init=False, repr=False)
    _globs: tuple[tuple[str, MetricRule], ...] = field(default=(), init=False, repr=False)
    _cache: dict[str, MetricRule] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        exact: dict[str, MetricRule] = {}
        globs: list[tuple[str, MetricRule]] = []
        for pattern, rule in self.rules:
            if _GLOB.search(pattern):
                globs.append((pattern, rule))
            else:
                exact[pattern] = _merge(exact[pattern], rule) if pattern in exact else rule
        self._exact = exact
        self._globs = tuple(globs)

    @property
    def empty(self) -> bool:
        return not self.rules and self.value_map is None

    def rule(self, metric: str) -> MetricRule:
        """The rule of a decoded metric name: its exact rule, completed field by field by every
        matching glob in order. A name listed exactly is a reading unless its own rule ignores it."""
        found = self._cache.get(metric)
        if found is not None:
            return found
        exact = self._exact.get(metric)
        rule = exact if exact is not None else _NO_RULE
        if exact is not None and exact.ignore is None:
            rule = replace(exact, ignore=False)
        for pattern, glob_rule in self._globs:
            if fnmatchcase(metric, pattern):
                rule = _merge(rule, glob_rule)
        # Publishers choose names: only names that can be stored are remembered, and only so many.
        if len(metric) <= _CACHED_NAME:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[metric] = rule
        return rule

    def listed(self, metric: str) -> bool:
        """Whether the mapping names this metric exactly (not only through a glob)."""
        return metric in self._exact

    def expects_number(self, metric: str) -> bool:
        """Whether the mapping declares this metric a number (a unit, scale or offset, and neither a
        state nor a value map): a string that is no number there is a wrong type, not a leaf to skip."""
        if not self.rules:
            return False
        rule = self.rule(metric)
        return (not rule.state and rule.value_map is None and self.value_map is None
                and (rule.unit is not None or rule.scale is not None or rule.offset is not None))

    def wrong_type(self, metric: str, raw: str, device: str | None) -> Rejection:
        return Rejection("wrong_type", f"{metric}: {_quote(raw)} is not a number, and the source's mapping gives "
                         "this metric a unit, scale or offset (list it in states, or map its words in value_map)",
                         device)

    def ignored(self, metric: str) -> bool:
        return bool(self.rules) and bool(self.rule(metric).ignore)

    def text(self, metric: str, raw: str, *, numbers: bool = True) -> float | bool | str | None:
        """What a string leaf of ``metric`` is: a value_map's number or boolean, the text itself when
        the metric is a state, a number when it is a decimal number written as a string (and
        ``numbers`` is set), else None: not a reading."""
        rule = self.rule(metric) if self.rules else _NO_RULE
        table = rule.value_map if rule.value_map is not None else self.value_map
        if table is not None and raw in table:
            return table[raw]
        if rule.state:
            return raw
        if numbers:
            return number_of_text(raw)
        return None


EMPTY: Final = SourceMapping()


def apply(readings: Iterable[Reading], mapping: SourceMapping) -> tuple[list[Reading], int]:
    """The readings as the mapping says to store them, and how many it ignored.

    A text reading (SenML vs, native text) goes through the same order as a string leaf: the value
    map first, then a state keeps it. A value-map entry is the stored value as written (not scaled).
    """
    if mapping.empty:
        return list(readings), 0
    out: list[Reading] = []
    ignored = 0
    for r in readings:
        rule = mapping.rule(r.metric) if mapping.rules else _NO_RULE
        if rule is _NO_RULE and mapping.value_map is None:
            out.append(r)
            continue
        if rule.ignore:
            ignored += 1
            continue
        value = r.value
        if isinstance(value, str):
            table = rule.value_map if rule.value_map is not None else mapping.value_map
            if table is not None and value in table:
                value = table[value]
        elif rule.changes_value and not isinstance(value, bool):
            value = float(value) * (1.0 if rule.scale is None else rule.scale) + (rule.offset or 0.0)
        unit = rule.unit if rule.unit is not None else r.unit
        metric = rule.rename if rule.rename is not None else r.metric
        if value is not r.value or unit is not r.unit or metric is not r.metric:
            r = Reading(r.device, metric, r.time, value, unit, r.flags)
        out.append(r)
    return out, ignored
