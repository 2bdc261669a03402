"""The metric catalog: which quantity a stored metric measures, in which unit, within which ranges.

Pure: readings in, readings and rejections out. A metric is bound to a quantity once, by its name,
by an alias the catalog lists, or by the longest dotted or slashed suffix of its name that is one
(``AM2301.Temperature`` -> temperature, ``SDS0X1.PM2.5`` -> pm2_5, ``thermostat/temperature``); the
stored name stays as decoded or renamed. Then, per reading: its type must fit the quantity's kind
(a value of another kind is stored unbound: Tasmota's ``POWER`` is a relay's ON/OFF, not a power in
W), its unit must convert to the quantity's (``bad_unit``; the stored unit is the
quantity's), the converted value must lie in the possible range (``out_of_range``), and outside the
plausible range it is stored with the suspect flag. A metric bound to no quantity is stored as it came
and counted as unbound.

Bindings and conversions are computed once per metric name and per (metric, unit) and cached; the
per-reading cost is two dictionary lookups and two comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ingest.catalog.model import Quantity, normalize
from ingest.catalog.quantities import BUILTIN
from ingest.catalog.units import MAX_PARSED_PER_MESSAGE, Conversion, GasReference, conversion
from ingest.model import FLAG_SUSPECT, Reading, Rejection

__all__ = ["BUILTIN", "Catalog", "CatalogError", "GasReference", "MetricRow", "Quantity", "in_unit", "normalize"]

_INF = math.inf
# Metric names and units come from payloads: the caches of bindings and conversions are bounded
# (past the bound, a binding is computed again each time, never stored), so that a publisher whose
# names change per message cannot grow them without end.
MAX_CACHED_METRICS = 20_000
MAX_UNITS_PER_METRIC = 16


class CatalogError(ValueError):
    """Two quantities claim one alias, or an entry is inconsistent."""


@dataclass(frozen=True, slots=True)
class MetricRow:
    """What the metrics table records about a stored metric name."""

    unit: str | None
    kind: str
    quantity: str | None = None
    valid_min: float | None = None
    valid_max: float | None = None
    plausible_min: float | None = None
    plausible_max: float | None = None
    range_source: str | None = None


@dataclass(slots=True)
class _Bound:
    quantity: Quantity
    lo: float
    hi: float
    plo: float
    phi: float
    units: dict[str, Conversion | str] = field(default_factory=dict)


def _bounds(r: tuple[float | None, float | None] | None) -> tuple[float, float]:
    if r is None:
        return -_INF, _INF
    lo, hi = r
    return (-_INF if lo is None else float(lo)), (_INF if hi is None else float(hi))


def in_unit(q: Quantity, unit: str, gas: GasReference | None = None) -> Quantity | str:
    """``q`` stored in ``unit`` instead, its ranges converted; or why it cannot be."""
    if unit == q.unit or q.unit is None:
        return replace(q, unit=unit)
    conv = conversion(q.unit, replace(q, unit=unit), gas or GasReference())
    if isinstance(conv, str):
        return conv

    def span(r: tuple[float | None, float | None] | None) -> tuple[float | None, float | None] | None:
        if r is None:
            return None
        lo, hi = (None if x is None else round(x * conv.scale + conv.offset, 10) for x in r)
        return (lo, hi) if conv.scale > 0 else (hi, lo)

    return replace(q, unit=unit, possible=span(q.possible), plausible=span(q.plausible))


def _show(x: float) -> str:
    return f"{x:g}"


def _range(lo: float, hi: float) -> str:
    return f"{_show(lo)}..{_show(hi)}"


class Catalog:
    def __init__(self, quantities: Iterable[Quantity] = BUILTIN, gas: GasReference | None = None,
                 overrides: Iterable[Quantity] = ()) -> None:
        """``quantities``: the base set; ``overrides``: entries that replace a base quantity of the
        same name, or add one; their aliases take an alias over from a base quantity."""
        self.gas = gas or GasReference()
        self.quantities: dict[str, Quantity] = {}
        self._alias: dict[str, str] = {}
        self._exact: dict[str, str] = {}
        for q in quantities:
            self._add(q, take_over=False)
        # An override's own aliases (not those it keeps from the quantity it overrides) take an
        # alias over from any other quantity; two overrides may not claim one.
        overrides = list(overrides)
        claimed: dict[str, str] = {}
        for q in overrides:
            base = self.quantities.get(q.name)
            kept = {normalize(a) for a in base.aliases} if base is not None else set()
            for a in (q.name, *q.aliases):
                key = normalize(a)
                if key in kept:
                    continue
                if claimed.get(key, q.name) != q.name:
                    raise CatalogError(f"[[metrics]] {claimed[key]!r} and {q.name!r} both claim the alias {a!r}")
                claimed[key] = q.name
        for q in overrides:
            self._add(q, take_over=True, claimed=claimed)
        self._bound: dict[str, _Bound | None] = {}
        # Metrics whose stored history is in another unit than their quantity's (see pin()).
        self._pinned: dict[str, Quantity | None] = {}

    def _add(self, q: Quantity, *, take_over: bool, claimed: dict[str, str] | None = None) -> None:
        old = self.quantities.get(q.name)
        if old is not None:  # an override: the old aliases of this name go with it
            for a in (old.name, *old.aliases):
                if self._alias.get(normalize(a)) == old.name:
                    del self._alias[normalize(a)]
            for e in old.exact:
                if self._exact.get(e) == old.name:
                    del self._exact[e]
        for lo, hi in (_bounds(q.possible), _bounds(q.plausible)):
            if lo > hi:
                raise CatalogError(f"quantity {q.name!r}: a range's low end {lo:g} is above its high end {hi:g}")
        self.quantities[q.name] = q
        for e in q.exact:
            owner = self._exact.get(e)
            if owner is not None and owner != q.name and not take_over:
                raise CatalogError(f"quantities {owner!r} and {q.name!r} both claim the exact name {e!r}")
            self._exact[e] = q.name
        for a in (q.name, *q.aliases):
            key = normalize(a)
            owner = self._alias.get(key)
            if owner is not None and owner != q.name and not take_over:
                raise CatalogError(f"quantities {owner!r} and {q.name!r} both claim the alias {a!r}")
            if claimed is not None and claimed.get(key, q.name) != q.name:
                continue  # kept from the overridden quantity, but another override claims it
            self._alias[key] = q.name

    # -- binding ----------------------------------------------------------------------------------

    def quantity_of(self, metric: str) -> Quantity | None:
        """The quantity ``metric`` is bound to: an exact name, else its whole name, else its longest
        dotted or slashed suffix, that the catalog lists; else the same without trailing index levels
        (``ENERGY.Power.0``, a channel of a list)."""
        if metric in self._pinned:
            return self._pinned[metric]
        name = self._exact.get(metric) or self._alias.get(normalize(metric))
        if name is None:
            parts = metric.replace("/", ".").split(".")
            while len(parts) > 1 and parts[-1].isdigit():
                # A trailing index: first the suffixes with it (SDS0X1.PM2.5 ends in "5"), then
                # without it (ENERGY.Power.0, pm10.1).
                name = self._suffix(parts)
                if name is not None:
                    break
                parts = parts[:-1]
                name = self._exact.get(".".join(parts)) or self._alias.get(normalize(".".join(parts)))
                if name is not None:
                    break
            if name is None:
                name = self._suffix(parts)
        return None if name is None else self.quantities[name]

    def _suffix(self, parts: list[str]) -> str | None:
        for i in range(1, len(parts)):
            name = self._alias.get(normalize(".".join(parts[i:])))
            if name is not None:
                return name
        return None

    def _bind(self, metric: str) -> _Bound | None:
        q = self.quantity_of(metric)
        b = None
        if q is not None:
            lo, hi = _bounds(q.possible)
            plo, phi = _bounds(q.plausible)
            b = _Bound(q, lo, hi, plo, phi)
        if len(self._bound) < MAX_CACHED_METRICS:
            self._bound[metric] = b
        return b

    def pin(self, metric: str, unit: str | None) -> Quantity | None:
        """``metric`` keeps ``unit``, the unit its stored history is in (its metrics row's), when that
        is not its quantity's: its readings are converted to that unit instead, with the ranges
        converted too; when they cannot be, it is unbound (stored as it comes). Returns what it is
        bound to now. Run at start-up, before any reading (a stored series never changes unit)."""
        q = self.quantity_of(metric)
        if q is None or unit is None or unit == q.unit:
            return q
        conv = conversion(unit, q, self.gas)
        if not isinstance(conv, str) and conv.identity:
            return q  # C for degC: the same unit, spelled otherwise
        moved = in_unit(q, unit, self.gas)
        pinned = None if isinstance(moved, str) else moved
        self._pinned[metric] = pinned
        self._bound.pop(metric, None)
        return pinned

    def row(self, metric: str, unit: str | None, kind: str) -> MetricRow:
        """The metrics-table row of ``metric``: its quantity's unit, kind and ranges when it is bound;
        else the unit and kind of the first reading."""
        q = self.quantity_of(metric)
        if q is None or (q.kind != kind and not (q.kind == "bool" and kind == "number")):
            return MetricRow(unit, kind)
        (lo, hi), (plo, phi) = (q.possible or (None, None)), (q.plausible or (None, None))
        return MetricRow(q.unit, q.kind, q.name, _finite(lo), _finite(hi), _finite(plo), _finite(phi),
                         q.source or None)

    def warm(self) -> None:
        """Load the units library now (the first conversion would, on the ingest path)."""
        from ingest.catalog.units import warm

        warm()

    # -- the per-reading check --------------------------------------------------------------------

    def check(self, readings: list[Reading]) -> tuple[list[Reading], list[Rejection], int]:
        """(kept readings, converted and flagged; problems; how many readings were unbound)."""
        kept: list[Reading] = []
        problems: list[Rejection] = []
        unbound = 0
        parsed = 0  # conversions computed for this message (see units.MAX_PARSED_PER_MESSAGE)
        cache = self._bound
        for r in readings:
            b = cache[r.metric] if r.metric in cache else self._bind(r.metric)
            if b is None:
                unbound += 1
                kept.append(r)
                continue
            q = b.quantity
            v = r.value
            if q.kind != "number" or isinstance(v, bool | str):
                # A value of another kind than the quantity's is not that quantity, whatever its name
                # (Tasmota's POWER is a relay's ON/OFF, not a power in W): stored unbound.
                if not _fits(q.kind, v):
                    unbound += 1
                kept.append(r)
                continue
            unit = r.unit
            if unit is None or unit == q.unit:
                x = v
            else:
                conv = b.units.get(unit)
                if conv is None:
                    parse = parsed < MAX_PARSED_PER_MESSAGE
                    parsed += 1
                    conv = conversion(unit, q, self.gas, parse=parse)
                    if parse and len(b.units) < MAX_UNITS_PER_METRIC:
                        b.units[unit] = conv
                if isinstance(conv, str):
                    problems.append(Rejection("bad_unit", f"{r.metric}: {conv}", r.device))
                    continue
                # 10 decimals: a sensor is never more precise, and 300 K is then 26.85 degC, not
                # 26.850000000000023 (the float arithmetic's noise), 32 degF 0, not 3.5e-15.
                x = round(v * conv.scale + conv.offset, 10)
                if not math.isfinite(x):
                    problems.append(Rejection("not_finite", f"{r.metric}: {v:g} {unit} is {x} in {q.unit}",
                                              r.device))
                    continue
            if not b.lo <= x <= b.hi:
                was = "" if x == v and unit in (None, q.unit) else f" ({_show(v)} {unit})"
                problems.append(Rejection(
                    "out_of_range", f"{r.metric}: {_show(x)} {q.unit}{was} is outside the possible range "
                    f"{_range(b.lo, b.hi)} {q.unit} of {q.name}", r.device))
                continue
            flags = r.flags
            if not b.plo <= x <= b.phi:
                flags |= FLAG_SUSPECT
            if x is v and flags == r.flags and r.unit == q.unit:
                kept.append(r)
            else:
                kept.append(Reading(r.device, r.metric, r.time, float(x), q.unit, flags))
        return kept, problems, unbound


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _fits(kind: str, v: float | bool | str) -> bool:
    if kind == "bool":
        return isinstance(v, bool) or (isinstance(v, float) and v in (0.0, 1.0))
    if kind == "state":
        return isinstance(v, str)
    return not isinstance(v, bool | str)

