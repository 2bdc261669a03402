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
from dataclasses import dataclass, field

from ingest.catalog.model import Quantity, normalize
from ingest.catalog.quantities import BUILTIN
from ingest.catalog.units import Conversion, GasReference, conversion
from ingest.model import FLAG_SUSPECT, Reading, Rejection

__all__ = ["BUILTIN", "Catalog", "CatalogError", "GasReference", "MetricRow", "Quantity", "normalize"]

_INF = math.inf


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
        claimed: dict[str, str] = {}
        for q in overrides:
            for a in (q.name, *q.aliases):
                key = normalize(a)
                if claimed.get(key, q.name) != q.name:
                    raise CatalogError(f"[[metrics]] {claimed[key]!r} and {q.name!r} both claim the alias {a!r}")
                claimed[key] = q.name
            self._add(q, take_over=True)
        self._bound: dict[str, _Bound | None] = {}

    def _add(self, q: Quantity, *, take_over: bool) -> None:
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
            self._alias[key] = q.name

    # -- binding ----------------------------------------------------------------------------------

    def quantity_of(self, metric: str) -> Quantity | None:
        """The quantity ``metric`` is bound to: an exact name, else its whole name, else its longest
        dotted or slashed suffix, that the catalog lists; else the same without trailing index levels
        (``ENERGY.Power.0``, a channel of a list)."""
        name = self._exact.get(metric) or self._alias.get(normalize(metric))
        if name is None:
            parts = metric.replace("/", ".").split(".")
            while len(parts) > 1 and parts[-1].isdigit() and not parts[-2][-1:].isdigit():
                # A trailing index: first try the suffixes with it (SDS0X1.PM2.5 ends in "5"), then
                # without it; PM2.5's "5" follows a digit, so it is never taken for an index.
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
        self._bound[metric] = b
        return b

    def row(self, metric: str, unit: str | None, kind: str) -> MetricRow:
        """The metrics-table row of ``metric``: its quantity's unit, kind and ranges when it is bound;
        else the unit and kind of the first reading."""
        q = self.quantity_of(metric)
        if q is None or (q.kind != kind and not (q.kind == "bool" and kind == "number")):
            return MetricRow(unit, kind)
        (lo, hi), (plo, phi) = (q.possible or (None, None)), (q.plausible or (None, None))
        return MetricRow(q.unit, q.kind, q.name, _finite(lo), _finite(hi), _finite(plo), _finite(phi),
                         q.source or None)

    # -- the per-reading check --------------------------------------------------------------------

    def check(self, readings: list[Reading]) -> tuple[list[Reading], list[Rejection], int]:
        """(kept readings, converted and flagged; problems; how many readings were unbound)."""
        kept: list[Reading] = []
        problems: list[Rejection] = []
        unbound = 0
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
                    conv = b.units[unit] = conversion(unit, q, self.gas)
                if isinstance(conv, str):
                    problems.append(Rejection("bad_unit", f"{r.metric}: {conv}", r.device))
                    continue
                # 10 decimals and 12 significant digits: a sensor is never more precise, and 300 K is
                # then 26.85 degC, not 26.850000000000023 (the float arithmetic's noise).
                x = float(f"{round(v * conv.scale + conv.offset, 10):.12g}")
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

