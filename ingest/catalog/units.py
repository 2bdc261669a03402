"""Unit conversion: a reading's unit to its quantity's unit, as ``stored = value * scale + offset``.

Physical units are converted by pint. What pint does not hold is kept here as tables:

- spellings seen in firmware and specifications (``C``, ``°C``, ``Cel`` (SenML, RFC 8428), ``ug/m3``,
  ``µg/m³``, ``%RH``...), each mapped to a pint expression;
- units that pint must not be asked about: percentages, angles, decibels and counts are all
  "dimensionless" to pint, which would happily turn a percentage into degrees; a quantity in one of
  them accepts only the spellings listed for it;
- gases given as mole fractions (ppm, ppb), turned into a mass concentration through the gas's molar
  mass and the molar volume at a reference temperature and pressure (default 25 °C, 1013.25 hPa:
  24.465 L/mol; ug/m3 = ppb x M / Vm).

A conversion is computed once per (unit, quantity) by the catalog and cached there; this module is
never on the per-reading path. pint's registry is built on the first conversion that needs it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pint

    from ingest.catalog.model import Quantity

__all__ = ["GAS_CONSTANT", "Conversion", "GasReference", "conversion", "normalize_unit", "warm"]

# Units no table holds that one message may have parsed (a payload could name a new one per record).
MAX_PARSED_PER_MESSAGE = 16
GAS_CONSTANT = 8.314462618  # J/(mol K), CODATA 2018 (exact since the 2019 SI)

# Stored units that are also the pint expressions of themselves, or that need one. SenML names (RFC 8428
# section 12.1, and RFC 8798 with its secondary units) are listed beside firmware spellings.
# In SenML "C" is the coulomb and "F" the farad; here they are degrees Celsius and Fahrenheit on purpose:
# firmware writes them so (Tasmota's TempUnit "C"/"F"), and no sensor here reports a charge or a
# capacitance. SenML's own Celsius is "Cel".
_PINT: dict[str, str] = {
    # temperature
    "degC": "degC", "C": "degC", "°C": "degC", "℃": "degC", "ºC": "degC", "Cel": "degC", "deg C": "degC",
    "celsius": "degC", "Celsius": "degC",
    "degF": "degF", "F": "degF", "°F": "degF", "℉": "degF", "ºF": "degF", "deg F": "degF",
    "fahrenheit": "degF", "Fahrenheit": "degF",
    "K": "kelvin", "kelvin": "kelvin", "Kelvin": "kelvin",
    # mass concentration (after normalize_unit: µ/μ -> u, ³ -> 3, ^ and ** dropped); SenML: kg/m3 (RFC
    # 8798), ug/m3 (RFC 8798 secondary)
    "ug/m3": "microgram/meter**3", "mg/m3": "milligram/meter**3", "ng/m3": "nanogram/meter**3",
    "g/m3": "gram/meter**3", "kg/m3": "kilogram/meter**3",
    # pressure; SenML: Pa, hPa (RFC 8798 secondary); Tasmota PressureUnit: hPa, mmHg, inHg
    "Pa": "pascal", "hPa": "hectopascal", "hpa": "hectopascal", "kPa": "kilopascal", "MPa": "megapascal",
    "mbar": "millibar", "mb": "millibar", "bar": "bar", "mmHg": "millimeter_Hg", "inHg": "inch_Hg",
    "psi": "psi", "atm": "atmosphere",
    # length; SenML: m, mm, cm, km (RFC 8798 secondary)
    "m": "meter", "cm": "centimeter", "mm": "millimeter", "km": "kilometer", "ft": "foot", "in": "inch",
    # rain rate and speed; SenML: m/s, mm/h, m/h, km/h (RFC 8798 secondary); Tasmota SpeedUnit: m/s,
    # km/h, kn, mph, ft/s, yd/s (xsns_35_tx20)
    "mm/h": "millimeter/hour", "mm/hr": "millimeter/hour", "mm/hour": "millimeter/hour",
    "mm/min": "millimeter/minute", "in/h": "inch/hour", "in/hr": "inch/hour", "m/h": "meter/hour",
    "m/s": "meter/second", "km/h": "kilometer/hour", "kmh": "kilometer/hour", "kph": "kilometer/hour",
    "km/hr": "kilometer/hour", "mph": "mile/hour", "kn": "knot", "kt": "knot", "kts": "knot",
    "knot": "knot", "knots": "knot", "ft/s": "foot/second", "yd/s": "yard/second",
    # energy, power, electricity; SenML: J, W, V, A, kW, Wh, kWh, mV, mA (RFC 8798 secondary);
    # Shelly Gen2: mWh (aenergy.by_minute)
    "kWh": "kilowatt_hour", "kwh": "kilowatt_hour", "Wh": "watt_hour", "MWh": "megawatt_hour",
    "mWh": "milliwatt_hour", "J": "joule", "kJ": "kilojoule", "MJ": "megajoule",
    "W": "watt", "kW": "kilowatt", "mW": "milliwatt", "MW": "megawatt",
    "V": "volt", "mV": "millivolt", "kV": "kilovolt", "uV": "microvolt",
    "A": "ampere", "mA": "milliampere", "uA": "microampere", "kA": "kiloampere",
    # illuminance; SenML: lx
    "lx": "lux", "lux": "lux", "Lux": "lux", "klx": "kilolux",
}

# Stored units pint must not convert into (dimensionless to it, or logarithmic): the spellings each
# accepts, with their factor (a scale only: dBW cannot become dBm, which needs an offset of 30).
# "%": firmware's "%" is a percentage, so it is taken as one, although RFC 8428 (section 12.1, its note on
# "/") defines SenML's "%" as the same ratio as "/" (0..1); SenML's percentages are "%RH", "%EL" and "/100"
# (RFC 8798 secondary unit), its permille "/1000". Every percentage quantity accepts all of them.
_ONLY: dict[str, dict[str, float]] = {
    "%": {"%": 1.0, "%RH": 1.0, "%rh": 1.0, "RH": 1.0, "% RH": 1.0, "%EL": 1.0, "percent": 1.0, "pct": 1.0,
          "/": 100.0, "/100": 1.0, "/1000": 0.1},  # SenML "/" is a ratio (0..1)
    # SenML: rad (RFC 8428), deg (RFC 8798)
    "deg": {"deg": 1.0, "°": 1.0, "º": 1.0, "degree": 1.0, "degrees": 1.0, "rad": 180.0 / math.pi},
    # SenML: dB, Bspl (bel of sound pressure level, RFC 8428); the weighting of a bare dB is unknown
    "dB(A)": {"dB(A)": 1.0, "dBA": 1.0, "dBa": 1.0, "dB A": 1.0, "dB": 1.0, "db": 1.0, "Bspl": 10.0},
    "dB": {"dB": 1.0, "db": 1.0},
    # SenML: dBm (RFC 8798 secondary)
    "dBm": {"dBm": 1.0, "dbm": 1.0},
    # SenML: count (RFC 8428)
    "count": {"count": 1.0, "counts": 1.0, "vehicles": 1.0, "veh": 1.0, "1": 1.0},
}

# Mole fractions of a gas: converted through its molar mass. SenML: ppm (RFC 8798 secondary), ppb (a
# secondary unit registered later). SenML's "ppt" (1e-12) is left out: firmware also writes it for
# parts per thousand.
_FRACTION: dict[str, float] = {"ppm": 1e-6, "ppmv": 1e-6, "ppb": 1e-9, "ppbv": 1e-9}



@dataclass(frozen=True, slots=True)
class GasReference:
    """Reference conditions of the ppm/ppb conversions: degC and hPa."""

    temperature: float = 25.0
    pressure: float = 1013.25

    @property
    def molar_volume(self) -> float:
        """m3/mol of an ideal gas at these conditions (0.024465 at 25 °C and 1 atm)."""
        return GAS_CONSTANT * (self.temperature + 273.15) / (self.pressure * 100.0)


@dataclass(frozen=True, slots=True)
class Conversion:
    scale: float
    offset: float

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.offset == 0.0


IDENTITY = Conversion(1.0, 0.0)


def normalize_unit(unit: str) -> str:
    """One spelling for the variants of a glyph: µ and μ -> u, ³ -> 3, ² -> 2, no ^ or **."""
    u = unit.strip()
    if not u.isascii():
        u = u.replace("µ", "u").replace("μ", "u").replace("³", "3").replace("²", "2")
    return u.replace("**", "").replace("^", "")


@functools.cache
def _registry() -> pint.UnitRegistry[Any]:
    import pint

    return pint.UnitRegistry()


def warm() -> None:
    _registry()


@functools.lru_cache(maxsize=4096)
def _pint_units(unit: str) -> pint.Unit | None:
    """The pint unit of a spelling in the table, else of what pint itself reads (l/s, m3/h, GJ),
    unless pint calls it dimensionless: percentages, angles and counts are only the table's."""
    expr = _PINT.get(unit)
    try:
        if expr is not None:
            return _registry().parse_units(expr)
        parsed = _registry().parse_units(unit)
    except Exception:  # pint's parser meets payload text here: anything it raises means "not a unit"
        return None
    return None if parsed.dimensionless else parsed


def conversion(unit: str, quantity: Quantity, gas: GasReference, *, parse: bool = True) -> Conversion | str:
    """How a value in ``unit`` becomes one in the quantity's unit, or why it cannot (for bad_unit).
    ``parse``: a unit that no table holds may be read by pint's parser (about 40 us a string);
    without it, such a unit is not known."""
    import pint

    target = quantity.unit
    if target is None or unit == target:
        return IDENTITY
    spelled = normalize_unit(unit)
    shown = f"unit {unit!r} cannot be converted to {target} (the unit of {quantity.name})"
    only = _ONLY.get(target)
    if only is not None:
        factor = only.get(spelled)
        if factor is None:
            return f"{shown}; accepted: {', '.join(sorted(only))}"
        return Conversion(factor, 0.0)
    goal = _pint_units(normalize_unit(target)) or _pint_units(target)
    if goal is None:
        return f"{shown}: this service cannot convert into {target!r}; list it in [[metrics]] with a unit it knows"
    reg = _registry()
    fraction = _FRACTION.get(spelled)
    if fraction is not None:
        if quantity.molar_mass is None or reg.Quantity(1, goal).dimensionality != reg.parse_units(
                "gram/meter**3").dimensionality:
            return f"{shown}: a mole fraction converts only to the mass concentration of a gas with a molar mass"
        grams_per_m3 = fraction * quantity.molar_mass / gas.molar_volume
        return Conversion(float(reg.Quantity(grams_per_m3, "gram/meter**3").to(goal).magnitude), 0.0)
    source = _PINT.get(spelled) and _pint_units(spelled)
    if source is None and parse:
        source = _pint_units(spelled) or _pint_units(unit.strip())  # as written: pint reads m**3/h
    if source is None:
        return f"{shown}: {unit!r} is not a unit this service knows" + (
            "" if parse else f" (more than {MAX_PARSED_PER_MESSAGE} units in one message needed pint's parser)")
    try:
        zero = float(reg.Quantity(0.0, source).to(goal).magnitude)
        far = float(reg.Quantity(1000.0, source).to(goal).magnitude)
    except pint.errors.DimensionalityError:
        return shown
    # Two points far apart, then the nearest simple fraction: pint's arithmetic leaves noise in the
    # last digits (0 degF is -17.777777777777743 degC), and 32 degF must be 0 degC, not -3e-13.
    return Conversion(_snap((far - zero) / 1000.0), _snap(zero))


def _snap(x: float) -> float:
    """``x``, or the fraction with a denominator up to 10,000 within 1e-12 of it (5/9, -160/9, -273.15)."""
    near = float(Fraction(x).limit_denominator(10_000))
    return near if abs(near - x) <= 1e-12 * max(1.0, abs(x)) else x
