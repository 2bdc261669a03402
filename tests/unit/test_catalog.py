"""ingest.catalog: binding a metric to a quantity, converting its unit, checking its two ranges.

Every expected figure is computed here from the constants stated here, not copied from the code.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.catalog import BUILTIN, Catalog, MetricRow, Quantity, units
from ingest.errors import ConfigError, ConfigProblem
from ingest.model import FLAG_RECEIVE_TIME, FLAG_SUSPECT, RawMessage, Reading
from ingest.process import Processor
from ingest.settings import Settings, load_settings

T = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)

# The constants of the conversions, as the issue states them.
R = 8.314462618  # J/(mol K), the molar gas constant (exact since the 2019 SI)
ATM = 101325.0  # Pa: 1 atm = 1013.25 hPa
ZERO_C = 273.15  # K at 0 degC
M_NO2 = 46.0055  # g/mol
M_O3 = 47.9982  # g/mol
M_CO = 28.010  # g/mol


def molar_volume(celsius: float, pascal: float = ATM) -> float:
    """m3/mol of an ideal gas: Vm = R T / P (0.0244654 at 25 degC and 1 atm)."""
    return R * (celsius + ZERO_C) / pascal


def ug_per_m3_from_ppb(ppb: float, molar_mass: float, celsius: float = 25.0) -> float:
    # ppb is 1e-9 mol/mol; g/m3 = fraction * M / Vm; ug = 1e6 g
    return ppb * 1e-9 * molar_mass / molar_volume(celsius) * 1e6


def mg_per_m3_from_ppm(ppm: float, molar_mass: float, celsius: float = 25.0) -> float:
    # ppm is 1e-6 mol/mol; mg = 1e3 g
    return ppm * 1e-6 * molar_mass / molar_volume(celsius) * 1e3


def _r(metric: str, value: float | bool | str, unit: str | None = None, flags: int = 0) -> Reading:
    return Reading("aq-7", metric, T, value, unit, flags)


def _one(catalog: Catalog, metric: str, value: float | bool | str, unit: str | None = None) -> Reading:
    """The one reading ``catalog`` keeps of this one, bound."""
    kept, problems, unbound = catalog.check([_r(metric, value, unit)])
    assert problems == []
    assert unbound == 0
    assert len(kept) == 1
    return kept[0]


def _rejected(catalog: Catalog, metric: str, value: float, unit: str | None = None) -> tuple[str, str, str | None]:
    kept, problems, unbound = catalog.check([_r(metric, value, unit)])
    assert kept == []
    assert unbound == 0
    assert len(problems) == 1
    return problems[0].reason, problems[0].detail, problems[0].device


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sensor-ingest.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _settings(tmp_path: Path, text: str) -> Settings:
    return load_settings(_write(tmp_path, text))


def _problem(tmp_path: Path, text: str) -> ConfigProblem:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


# --- conversions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fahrenheit", "celsius"),
    [(95.0, 35.0), (32.0, 0.0), (-40.0, -40.0), (50.0, 10.0), (68.0, 20.0), (14.0, -10.0), (122.0, 50.0)],
)
def test_fahrenheit_becomes_celsius_exactly(fahrenheit: float, celsius: float) -> None:
    expected = (fahrenheit - 32.0) * 5.0 / 9.0
    assert expected == celsius

    kept = _one(Catalog(), "temperature", fahrenheit, "degF")

    # Exactly: 95 degF is 35, not 34.99999999999999, and freezing is 0, not -3e-13.
    assert kept.value == celsius
    assert kept.unit == "degC"
    # Air temperature is plausible in -10..50 degC: -40 degC is possible but suspect.
    assert kept.flags == (0 if -10.0 <= celsius <= 50.0 else FLAG_SUSPECT)


@pytest.mark.parametrize("spelling", ["degF", "F", "°F"])
def test_fahrenheit_spellings(spelling: str) -> None:
    assert _one(Catalog(), "temperature", 95.0, spelling).value == 35.0


@pytest.mark.parametrize(("kelvin", "celsius"), [(300.0, 26.85), (273.15, 0.0), (250.0, -23.15)])
def test_kelvin_becomes_celsius(kelvin: float, celsius: float) -> None:
    assert kelvin - ZERO_C == pytest.approx(celsius, abs=1e-12)

    kept = _one(Catalog(), "temperature", kelvin, "K")

    assert kept.value == pytest.approx(celsius, abs=1e-9)
    assert kept.unit == "degC"


def test_300_kelvin_is_stored_as_26_85_without_float_noise() -> None:
    # 300 - 273.15 is 26.850000000000023 in binary floating point; the catalog keeps 12 digits.
    assert _one(Catalog(), "temperature", 300.0, "K").value == 26.85


def test_pascal_becomes_hectopascal() -> None:
    kept = _one(Catalog(), "pressure", ATM, "Pa")

    assert kept.value == ATM / 100.0 == 1013.25
    assert kept.unit == "hPa"


def test_kilopascal_becomes_hectopascal() -> None:
    assert _one(Catalog(), "pressure", 101.325, "kPa").value == pytest.approx(1013.25, rel=1e-12)


def test_millimetre_becomes_metre() -> None:
    kept = _one(Catalog(), "water_level", 1234.0, "mm")

    assert kept.value == pytest.approx(1234.0 / 1000.0, rel=1e-12)
    assert kept.unit == "m"


def test_millivolt_becomes_volt() -> None:
    kept = _one(Catalog(), "voltage", 3300.0, "mV")

    assert kept.value == pytest.approx(3300.0 / 1000.0, rel=1e-12)
    assert kept.unit == "V"


def test_the_default_molar_volume_is_that_of_25_celsius_and_one_atmosphere() -> None:
    # The figure air-quality tables use: 24.45 L/mol.
    assert molar_volume(25.0) == pytest.approx(0.0244654, rel=1e-5)
    assert Catalog().gas.molar_volume == pytest.approx(molar_volume(25.0), rel=1e-12)


@pytest.mark.parametrize(("metric", "molar_mass"), [("no2", M_NO2), ("o3", M_O3)])
@pytest.mark.parametrize("ppb", [1.0, 10.0, 212.5])
def test_ppb_of_a_gas_becomes_micrograms_per_cubic_metre_at_25_celsius(metric: str, molar_mass: float,
                                                                        ppb: float) -> None:
    kept = _one(Catalog(), metric, ppb, "ppb")

    assert kept.value == pytest.approx(ug_per_m3_from_ppb(ppb, molar_mass), rel=1e-10)
    assert kept.unit == "ug/m3"


def test_ppb_of_no2_figures_by_hand() -> None:
    # 10 ppb NO2 at 25 degC, 1 atm: 10e-9 * 46.0055 g/mol / 0.0244654 m3/mol = 18.80 ug/m3.
    assert _one(Catalog(), "no2", 10.0, "ppb").value == pytest.approx(18.8043, abs=1e-4)
    # 10 ppb O3: 19.62 ug/m3.
    assert _one(Catalog(), "o3", 10.0, "ppb").value == pytest.approx(19.6188, abs=1e-4)


@pytest.mark.parametrize("ppm", [1.0, 9.0, 35.0])
def test_ppm_of_carbon_monoxide_becomes_milligrams_per_cubic_metre_at_25_celsius(ppm: float) -> None:
    kept = _one(Catalog(), "co", ppm, "ppm")

    assert kept.value == pytest.approx(mg_per_m3_from_ppm(ppm, M_CO), rel=1e-10)
    assert kept.unit == "mg/m3"


def test_ppm_of_no2_becomes_micrograms_too() -> None:
    # 1 ppm = 1000 ppb
    assert _one(Catalog(), "no2", 1.0, "ppm").value == pytest.approx(ug_per_m3_from_ppb(1000.0, M_NO2), rel=1e-10)


def test_gases_at_a_reference_temperature_of_20_celsius(tmp_path: Path) -> None:
    catalog = _settings(tmp_path, "[catalog]\nreference_temperature = 20\n").build_catalog()
    assert catalog is not None
    assert catalog.gas.temperature == 20.0
    assert catalog.gas.pressure == 1013.25

    no2 = _one(catalog, "no2", 10.0, "ppb").value
    o3 = _one(catalog, "o3", 10.0, "ppb").value
    co = _one(catalog, "co", 1.0, "ppm").value

    assert no2 == pytest.approx(ug_per_m3_from_ppb(10.0, M_NO2, celsius=20.0), rel=1e-10)
    assert o3 == pytest.approx(ug_per_m3_from_ppb(10.0, M_O3, celsius=20.0), rel=1e-10)
    assert co == pytest.approx(mg_per_m3_from_ppm(1.0, M_CO, celsius=20.0), rel=1e-10)
    # Colder gas is denser: the same mole fraction is more mass per m3 than at 25 degC.
    at_25 = float(_one(Catalog(), "no2", 10.0, "ppb").value)
    assert no2 == pytest.approx(at_25 * (25.0 + ZERO_C) / (20.0 + ZERO_C), rel=1e-10)


def test_the_reference_temperature_through_settings_kwargs() -> None:
    from ingest.settings import CatalogSettings

    catalog = Settings(catalog=CatalogSettings(reference_temperature=20.0)).build_catalog()
    assert catalog is not None
    assert _one(catalog, "co", 1.0, "ppm").value == pytest.approx(mg_per_m3_from_ppm(1.0, M_CO, celsius=20.0),
                                                                  rel=1e-10)


@pytest.mark.parametrize(
    ("metric", "spelling", "stored"),
    [
        ("temperature", "°C", "degC"),  # U+00B0 degree sign
        ("temperature", "\u2103", "degC"),  # ℃, the one-glyph degree Celsius
        ("temperature", "C", "degC"),
        ("temperature", "Cel", "degC"),  # SenML (RFC 8428)
        ("temperature", "degC", "degC"),
        ("pm2_5", "\u00b5g/m\u00b3", "ug/m3"),  # µg/m³ with the micro sign
        ("pm2_5", "\u03bcg/m3", "ug/m3"),  # μg/m3 with the Greek small letter mu
        ("pm2_5", "ug/m^3", "ug/m3"),
        ("pm2_5", "ug/m3", "ug/m3"),
        ("pm10", "\u00b5g/m3", "ug/m3"),
        ("humidity", "%RH", "%"),
        ("humidity", "%", "%"),
    ],
)
def test_spellings_of_the_stored_unit_keep_the_value_and_store_the_quantitys_unit(
        metric: str, spelling: str, stored: str) -> None:
    kept = _one(Catalog(), metric, 21.5, spelling)

    assert kept.value == 21.5
    assert kept.unit == stored
    assert kept.flags == 0


@pytest.mark.parametrize(
    ("metric", "value", "unit", "stored", "expected"),
    [
        ("co", 1500.0, "ug/m3", "mg/m3", 1500.0 / 1000.0),
        ("humidity", 0.55, "/", "%", 0.55 * 100.0),  # SenML "/" is a ratio
        ("wind_direction", math.pi, "rad", "deg", 180.0),
        ("wind_speed", 36.0, "km/h", "m/s", 36.0 * 1000.0 / 3600.0),
        ("rain_rate", 1.0, "in/h", "mm/h", 25.4),  # 1 in = 25.4 mm exactly
        ("energy", 1500.0, "Wh", "kWh", 1.5),
        ("power", 2.5, "kW", "W", 2500.0),
        ("current", 250.0, "mA", "A", 0.25),
    ],
)
def test_other_conversions(metric: str, value: float, unit: str, stored: str, expected: float) -> None:
    kept = _one(Catalog(), metric, value, unit)

    assert kept.value == pytest.approx(expected, rel=1e-12)
    assert kept.unit == stored


def test_a_reading_without_a_unit_is_taken_as_in_the_quantitys_and_stored_with_it() -> None:
    kept, problems, unbound = Catalog().check([_r("temperature", 21.5)])

    assert (kept, problems, unbound) == ([Reading("aq-7", "temperature", T, 21.5, "degC", 0)], [], 0)


@pytest.mark.parametrize(
    ("metric", "unit", "target"),
    [
        ("temperature", "hPa", "degC"),
        ("wind_direction", "%", "deg"),
        ("pm2_5", "ppb", "ug/m3"),  # a particle has no molar mass
        ("pm10", "ppm", "ug/m3"),
        ("humidity", "degC", "%"),
        ("pressure", "furlongs", "hPa"),
        ("rainfall", "mm/h", "mm"),
        ("noise", "%", "dB(A)"),
    ],
)
def test_a_unit_that_does_not_convert_is_bad_unit_naming_both_units(metric: str, unit: str, target: str) -> None:
    reason, detail, device = _rejected(Catalog(), metric, 12.0, unit)

    assert reason == "bad_unit"
    assert detail.startswith(f"{metric}: ")
    assert repr(unit) in detail
    assert target in detail
    assert device == "aq-7"


def test_a_bad_unit_reading_does_not_take_its_good_neighbours_with_it() -> None:
    kept, problems, unbound = Catalog().check([_r("temperature", 20.0, "hPa"), _r("pressure", 100000.0, "Pa")])

    assert [(r.metric, r.value, r.unit) for r in kept] == [("pressure", 1000.0, "hPa")]
    assert [p.reason for p in problems] == ["bad_unit"]
    assert unbound == 0


def test_a_conversion_is_computed_once_per_unit_not_per_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = units.conversion

    def counting(unit: str, quantity: Quantity, gas: object, parse: bool = True) -> object:
        calls.append((unit, quantity.name))
        return real(unit, quantity, gas, parse=parse)  # type: ignore[arg-type]

    monkeypatch.setattr("ingest.catalog.conversion", counting)
    catalog = Catalog()

    first, _, _ = catalog.check([_r("temperature", 95.0, "degF"), _r("temperature", 50.0, "degF")])
    second, _, _ = catalog.check([_r("temperature", -4.0, "degF")])

    assert [r.value for r in first + second] == [35.0, 10.0, -20.0]
    assert calls == [("degF", "temperature")]


def test_a_failed_conversion_is_cached_too(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = units.conversion

    def counting(unit: str, quantity: Quantity, gas: object, parse: bool = True) -> object:
        calls.append(unit)
        return real(unit, quantity, gas, parse=parse)  # type: ignore[arg-type]

    monkeypatch.setattr("ingest.catalog.conversion", counting)
    catalog = Catalog()

    _, problems, _ = catalog.check([_r("temperature", 1.0, "hPa"), _r("temperature", 2.0, "hPa")])
    _, more, _ = catalog.check([_r("temperature", 3.0, "hPa")])

    assert [p.reason for p in problems + more] == ["bad_unit"] * 3
    assert calls == ["hPa"]


def test_the_quantitys_own_unit_needs_no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = units.conversion

    def counting(unit: str, quantity: Quantity, gas: object, parse: bool = True) -> object:
        calls.append(unit)
        return real(unit, quantity, gas, parse=parse)  # type: ignore[arg-type]

    monkeypatch.setattr("ingest.catalog.conversion", counting)

    kept, _, _ = Catalog().check([_r("temperature", 20.0, "degC"), _r("temperature", 21.0)])

    assert [r.value for r in kept] == [20.0, 21.0]
    assert calls == []


def test_a_converted_value_is_checked_against_the_ranges_in_the_stored_unit() -> None:
    catalog = Catalog()
    # 131 degF = 55 degC: possible, but above the plausible 50 degC.
    suspect = _one(catalog, "temperature", 131.0, "degF")
    assert (suspect.value, suspect.unit, suspect.flags) == ((131.0 - 32.0) * 5.0 / 9.0, "degC", FLAG_SUSPECT)
    # 200 degF = 93.3 degC: beyond the possible 70 degC.
    reason, detail, _ = _rejected(catalog, "temperature", 200.0, "degF")
    assert reason == "out_of_range"
    assert detail == (f"temperature: {(200.0 - 32.0) * 5.0 / 9.0:g} degC (200 degF) is outside the possible range "
                      "-60..70 degC of temperature")


# --- the two ranges of every quantity -----------------------------------------------------------

NUMBERS = [q for q in BUILTIN if q.kind == "number"]


def _lo_hi(r: tuple[float | None, float | None] | None) -> tuple[float, float]:
    if r is None:
        return -math.inf, math.inf
    lo, hi = r
    return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))


def _inside(lo: float, hi: float) -> float:
    if math.isfinite(lo) and math.isfinite(hi):
        return (lo + hi) / 2.0
    if math.isfinite(lo):
        return lo + 1.0
    if math.isfinite(hi):
        return hi - 1.0
    return 0.0


def _gaps(q: Quantity) -> list[tuple[str, float]]:
    """A value between the plausible and the possible range, on each side where there is room."""
    lo, hi = _lo_hi(q.possible)
    plo, phi = _lo_hi(q.plausible)
    out = []
    if math.isfinite(phi) and hi > phi:
        out.append(("above", (phi + hi) / 2.0 if math.isfinite(hi) else phi + abs(phi) + 1.0))
    if math.isfinite(plo) and lo < plo:
        out.append(("below", (plo + lo) / 2.0 if math.isfinite(lo) else plo - abs(plo) - 1.0))
    return out


def _beyond(q: Quantity) -> list[tuple[str, float]]:
    lo, hi = _lo_hi(q.possible)
    out = []
    if math.isfinite(hi):
        out.append(("above", hi + max(1.0, abs(hi) * 0.1)))
    if math.isfinite(lo):
        out.append(("below", lo - max(1.0, abs(lo) * 0.1)))
    return out


@pytest.mark.parametrize("q", NUMBERS, ids=lambda q: q.name)
def test_every_quantity_has_ranges_a_unit_and_their_source(q: Quantity) -> None:
    lo, hi = _lo_hi(q.possible)
    plo, phi = _lo_hi(q.plausible)

    assert q.unit
    assert q.source.strip()
    assert q.possible is not None
    assert q.plausible is not None
    assert lo <= hi
    assert plo <= phi
    # The plausible range lies within the possible one: a plausible value is never rejected.
    assert lo <= plo <= phi <= hi


@pytest.mark.parametrize("unit", ["none", "its own"])
@pytest.mark.parametrize("q", NUMBERS, ids=lambda q: q.name)
def test_a_value_inside_the_plausible_range_is_kept_unflagged(q: Quantity, unit: str) -> None:
    value = _inside(*_lo_hi(q.plausible))

    kept, problems, unbound = Catalog().check([_r(q.name, value, None if unit == "none" else q.unit)])

    assert (kept, problems, unbound) == ([Reading("aq-7", q.name, T, value, q.unit, 0)], [], 0)


@pytest.mark.parametrize(
    ("q", "side", "value"),
    [pytest.param(q, side, v, id=f"{q.name}-{side}") for q in NUMBERS for side, v in _gaps(q)],
)
def test_a_value_between_plausible_and_possible_is_kept_with_the_suspect_flag(q: Quantity, side: str,
                                                                               value: float) -> None:
    kept = _one(Catalog(), q.name, value)

    assert (kept.metric, kept.value, kept.unit, kept.flags) == (q.name, value, q.unit, FLAG_SUSPECT)


@pytest.mark.parametrize(
    ("q", "side", "value"),
    [pytest.param(q, side, v, id=f"{q.name}-{side}") for q in NUMBERS for side, v in _beyond(q)],
)
def test_a_value_beyond_the_possible_range_is_out_of_range_naming_the_quantity_and_range(
        q: Quantity, side: str, value: float) -> None:
    lo, hi = _lo_hi(q.possible)

    reason, detail, device = _rejected(Catalog(), q.name, value)

    assert reason == "out_of_range"
    assert detail.startswith(f"{q.name}: ")
    assert f"{lo:g}..{hi:g} {q.unit}" in detail
    assert detail.endswith(f" of {q.name}")
    assert device == "aq-7"


@pytest.mark.parametrize("q", NUMBERS, ids=lambda q: q.name)
def test_the_possible_bounds_are_inclusive(q: Quantity) -> None:
    lo, hi = _lo_hi(q.possible)
    plo, phi = _lo_hi(q.plausible)
    bounds = [x for x in (lo, hi) if math.isfinite(x)]
    assert bounds

    kept, problems, unbound = Catalog().check([_r(q.name, x) for x in bounds])

    assert problems == []
    assert unbound == 0
    assert [(r.value, r.flags) for r in kept] == [(x, 0 if plo <= x <= phi else FLAG_SUSPECT) for x in bounds]


@pytest.mark.parametrize("q", NUMBERS, ids=lambda q: q.name)
def test_the_plausible_bounds_are_inclusive(q: Quantity) -> None:
    plo, phi = _lo_hi(q.plausible)
    bounds = [x for x in (plo, phi) if math.isfinite(x)]
    assert bounds

    kept, problems, _ = Catalog().check([_r(q.name, x) for x in bounds])

    assert problems == []
    assert [(r.value, r.flags) for r in kept] == [(x, 0) for x in bounds]


@pytest.mark.parametrize("q", NUMBERS, ids=lambda q: q.name)
def test_just_past_a_possible_bound_is_rejected(q: Quantity) -> None:
    lo, hi = _lo_hi(q.possible)
    past = [x for x in (math.nextafter(hi, math.inf), math.nextafter(lo, -math.inf)) if math.isfinite(x)]

    kept, problems, _ = Catalog().check([_r(q.name, x) for x in past])

    assert kept == []
    assert [p.reason for p in problems] == ["out_of_range"] * len(past)


def test_the_pm25_ranges_are_the_issues() -> None:
    q = Catalog().quantity_of("pm2_5")
    assert q is not None
    assert (q.unit, q.possible, q.plausible) == ("ug/m3", (0, 2000), (0, 500))

    catalog = Catalog()
    assert _one(catalog, "pm2_5", 500.0).flags == 0
    assert _one(catalog, "pm2_5", 500.5).flags == FLAG_SUSPECT
    assert _one(catalog, "pm2_5", 2000.0).flags == FLAG_SUSPECT
    assert _one(catalog, "pm2_5", 0.0).flags == 0
    assert _rejected(catalog, "pm2_5", 2000.5) == (
        "out_of_range", "pm2_5: 2000.5 ug/m3 is outside the possible range 0..2000 ug/m3 of pm2_5", "aq-7")
    assert _rejected(catalog, "pm2_5", -0.5) == (
        "out_of_range", "pm2_5: -0.5 ug/m3 is outside the possible range 0..2000 ug/m3 of pm2_5", "aq-7")


def test_the_air_temperature_ranges_are_the_issues() -> None:
    q = Catalog().quantity_of("temperature")
    assert q is not None
    assert (q.unit, q.possible, q.plausible) == ("degC", (-60, 70), (-10, 50))

    catalog = Catalog()
    kept, problems, _ = catalog.check([_r("temperature", v) for v in (-60.0, -10.5, -10.0, 50.0, 50.5, 70.0)])
    assert problems == []
    assert [(r.value, r.flags) for r in kept] == [
        (-60.0, FLAG_SUSPECT), (-10.5, FLAG_SUSPECT), (-10.0, 0), (50.0, 0), (50.5, FLAG_SUSPECT), (70.0, FLAG_SUSPECT)]
    # 900 degC is not an air temperature.
    assert _rejected(catalog, "temperature", 900.0) == (
        "out_of_range", "temperature: 900 degC is outside the possible range -60..70 degC of temperature", "aq-7")
    assert _rejected(catalog, "temperature", -60.5)[0] == "out_of_range"


def test_the_suspect_flag_is_added_to_the_flags_a_reading_has() -> None:
    kept, _, _ = Catalog().check([_r("pm2_5", 900.0, flags=FLAG_RECEIVE_TIME)])

    assert kept[0].flags == FLAG_RECEIVE_TIME | FLAG_SUSPECT


def test_a_suspect_value_still_keeps_its_device_metric_and_time() -> None:
    kept = _one(Catalog(), "SDS0X1.PM2.5", 900.0)

    assert (kept.device, kept.metric, kept.time, kept.value) == ("aq-7", "SDS0X1.PM2.5", T, 900.0)


# --- binding ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "unit"),
    [
        ("pm1", "ug/m3"), ("pm2_5", "ug/m3"), ("pm10", "ug/m3"), ("no2", "ug/m3"), ("o3", "ug/m3"),
        ("so2", "ug/m3"), ("co", "mg/m3"), ("temperature", "degC"), ("humidity", "%"), ("pressure", "hPa"),
        ("noise", "dB(A)"), ("illuminance", "lx"), ("water_level", "m"), ("rainfall", "mm"),
        ("rain_rate", "mm/h"), ("wind_speed", "m/s"), ("wind_direction", "deg"), ("traffic_count", "count"),
        ("energy", "kWh"), ("power", "W"), ("voltage", "V"), ("current", "A"), ("battery", "%"),
        ("rssi", "dBm"), ("snr", "dB"),
    ],
)
def test_the_issues_quantities_are_built_in_with_their_units(name: str, unit: str) -> None:
    q = Catalog().quantity_of(name)

    assert q is not None
    assert (q.name, q.unit, q.kind) == (name, unit, "number")


@pytest.mark.parametrize("q", BUILTIN, ids=lambda q: q.name)
def test_every_quantity_binds_by_its_name_and_each_alias(q: Quantity) -> None:
    catalog = Catalog()

    assert {a: getattr(catalog.quantity_of(a), "name", None) for a in (q.name, *q.aliases)} == {
        a: q.name for a in (q.name, *q.aliases)}


@pytest.mark.parametrize("metric", ["pm2_5", "PM2.5", "pm25", "PM25", "pm-2.5", "Pm2_5", "pm 2.5"])
def test_pm25_aliases_bind_to_pm2_5(metric: str) -> None:
    q = Catalog().quantity_of(metric)

    assert q is not None
    assert q.name == "pm2_5"


@pytest.mark.parametrize(
    ("metric", "quantity"),
    [
        ("AM2301.Temperature", "temperature"),
        ("SDS0X1.PM2.5", "pm2_5"),
        ("thermostat/temperature", "temperature"),
        ("BME280.Pressure", "pressure"),
        ("BME280.Humidity", "humidity"),
        ("ENERGY.Power", "power"),
        ("ENERGY.Voltage", "voltage"),
        ("a/b.c/pm10", "pm10"),
        ("station.rain_rate", "rain_rate"),
    ],
)
def test_a_metric_binds_by_its_last_path_segment(metric: str, quantity: str) -> None:
    q = Catalog().quantity_of(metric)

    assert q is not None
    assert q.name == quantity


def test_the_stored_name_stays_as_decoded() -> None:
    kept = _one(Catalog(), "AM2301.Temperature", 95.0, "F")

    assert (kept.metric, kept.value, kept.unit) == ("AM2301.Temperature", 35.0, "degC")


def test_the_whole_name_binds_before_a_suffix() -> None:
    room = Quantity("room_temperature", "indoor air temperature", "degC", possible=(-20, 60), plausible=(5, 40))
    catalog = Catalog(overrides=[room])

    # "room.temperature" is room_temperature as a whole; its last segment alone is the air temperature.
    assert getattr(catalog.quantity_of("room.temperature"), "name", None) == "room_temperature"
    # A slash is a path: "room/temperature" is the temperature of something called room.
    assert getattr(catalog.quantity_of("room/temperature"), "name", None) == "temperature"
    assert getattr(catalog.quantity_of("hall.temperature"), "name", None) == "temperature"
    # The longest suffix that is a quantity: "x.room.temperature" -> "room.temperature".
    assert getattr(catalog.quantity_of("x.room.temperature"), "name", None) == "room_temperature"


def test_pm1_0_is_pm1_not_pm10() -> None:
    catalog = Catalog()

    assert getattr(catalog.quantity_of("pm1_0"), "name", None) == "pm1"
    assert getattr(catalog.quantity_of("PM1.0"), "name", None) == "pm1"
    assert getattr(catalog.quantity_of("pm10"), "name", None) == "pm10"
    assert getattr(catalog.quantity_of("pm10_0"), "name", None) == "pm10"
    assert getattr(catalog.quantity_of("pm2_5"), "name", None) == "pm2_5"


def test_pm1_0_at_1500_is_checked_against_pm1_and_pm10_against_pm10() -> None:
    catalog = Catalog()
    pm10_plausible_high = _lo_hi(catalog.quantities["pm10"].plausible)[1]
    pm1_plausible_high = _lo_hi(catalog.quantities["pm1"].plausible)[1]
    assert pm1_plausible_high < pm10_plausible_high  # else this test shows nothing
    value = (pm1_plausible_high + pm10_plausible_high) / 2.0

    kept, problems, _ = catalog.check([_r("pm1_0", value), _r("pm10", value)])

    assert problems == []
    assert [(r.metric, r.flags) for r in kept] == [("pm1_0", FLAG_SUSPECT), ("pm10", 0)]


@pytest.mark.parametrize("metric", ["uptime", "Wifi.Channel", "pm", "temperatures", "x.y.z", "co2_ppm"])
def test_names_the_catalog_does_not_list_are_unbound(metric: str) -> None:
    assert Catalog().quantity_of(metric) is None


def test_unbound_readings_are_kept_as_they_came_and_counted() -> None:
    readings = [
        _r("uptime", 1e12, "s"),  # beyond any range: not checked, not converted
        _r("pm25", 12.0),
        _r("Wifi.Channel", 6.0),
        _r("temperature", 21.0),
        _r("firmware", "1.2.3"),
    ]

    kept, problems, unbound = Catalog().check(readings)

    assert kept == [readings[0], Reading("aq-7", "pm25", T, 12.0, "ug/m3"), readings[2],
                    Reading("aq-7", "temperature", T, 21.0, "degC"), readings[4]]
    assert problems == []
    assert unbound == 3


@pytest.mark.parametrize("value", ["ON", "OFF", True, False])
def test_a_boolean_or_text_for_a_number_quantity_is_stored_unbound(value: bool | str) -> None:
    # Tasmota's POWER is a relay's ON/OFF, not a power in W.
    reading = _r("POWER", value)

    kept, problems, unbound = Catalog().check([reading])

    assert (kept, problems, unbound) == ([reading], [], 1)


def test_the_metrics_row_of_a_metric_with_text_values_is_unbound() -> None:
    catalog = Catalog()

    assert catalog.row("POWER", None, "state") == MetricRow(None, "state")
    assert catalog.row("POWER", None, "bool") == MetricRow(None, "bool")
    assert catalog.row("tele/plug/POWER", "W", "state") == MetricRow("W", "state")


def test_the_metrics_row_of_an_unbound_metric_is_its_first_readings_unit_and_kind() -> None:
    assert Catalog().row("uptime", "s", "number") == MetricRow("s", "number")


@pytest.mark.parametrize("q", NUMBERS, ids=lambda q: q.name)
def test_the_metrics_row_of_a_bound_metric_is_its_quantitys(q: Quantity) -> None:
    lo, hi = _lo_hi(q.possible)
    plo, phi = _lo_hi(q.plausible)

    row = Catalog().row(f"dev.{q.name}", "whatever-the-first-reading-said", "number")

    def fin(x: float) -> float | None:
        return x if math.isfinite(x) else None

    assert row == MetricRow(q.unit, "number", q.name, fin(lo), fin(hi), fin(plo), fin(phi), q.source)


def test_the_metrics_row_of_am2301_temperature() -> None:
    row = Catalog().row("AM2301.Temperature", "F", "number")

    assert (row.unit, row.kind, row.quantity) == ("degC", "number", "temperature")
    assert (row.valid_min, row.valid_max, row.plausible_min, row.plausible_max) == (-60.0, 70.0, -10.0, 50.0)
    assert row.range_source


# --- config: [[metrics]] and [catalog] ----------------------------------------------------------


def test_metrics_entry_overrides_only_the_plausible_range_of_a_built_in(tmp_path: Path) -> None:
    builtin = {q.name: q for q in BUILTIN}["pm2_5"]
    catalog = _settings(tmp_path, '[[metrics]]\nname = "pm2_5"\nplausible = [0, 300]\n').build_catalog()
    assert catalog is not None

    q = catalog.quantities["pm2_5"]
    assert q.plausible == (0.0, 300.0)
    assert (q.unit, q.kind, q.possible, q.title, q.aliases) == (
        builtin.unit, builtin.kind, builtin.possible, builtin.title, builtin.aliases)
    # Its aliases still bind to it.
    assert getattr(catalog.quantity_of("PM2.5"), "name", None) == "pm2_5"
    kept, problems, _ = catalog.check([_r("pm25", v) for v in (300.0, 400.0, 2000.0)])
    assert problems == []
    assert [(r.value, r.flags) for r in kept] == [(300.0, 0), (400.0, FLAG_SUSPECT), (2000.0, FLAG_SUSPECT)]
    assert _rejected(catalog, "pm25", 2001.0)[0] == "out_of_range"
    row = catalog.row("pm25", None, "number")
    assert (row.plausible_min, row.plausible_max, row.valid_min, row.valid_max) == (0.0, 300.0, 0.0, 2000.0)
    # The built-in's source no longer describes the range: the config's is named.
    assert row.range_source == "this city's configuration"


def test_an_override_leaves_the_other_quantities_alone(tmp_path: Path) -> None:
    catalog = _settings(tmp_path, '[[metrics]]\nname = "pm2_5"\nplausible = [0, 300]\n').build_catalog()
    assert catalog is not None

    assert {n: q for n, q in catalog.quantities.items() if n != "pm2_5"} == {
        q.name: q for q in BUILTIN if q.name != "pm2_5"}


def test_metrics_entry_adds_a_quantity_with_its_aliases(tmp_path: Path) -> None:
    catalog = _settings(tmp_path, """
        [[metrics]]
        name = "canal_depth"
        unit = "cm"
        possible = [0, 1000]
        plausible = [0, 400]
        aliases = ["CanalGauge", "depth_cm"]
        source = "the city drainage office"
    """).build_catalog()
    assert catalog is not None

    for metric in ("canal_depth", "CanalGauge", "canalgauge", "depth_cm", "gauge-7.CanalGauge", "node/depth_cm"):
        assert getattr(catalog.quantity_of(metric), "name", None) == "canal_depth", metric
    kept, problems, unbound = catalog.check([
        _r("CanalGauge", 120.0), _r("CanalGauge", 1.5, "m"), _r("depth_cm", 450.0), _r("depth_cm", 1001.0)])
    assert [(r.value, r.unit, r.flags) for r in kept] == [
        (120.0, "cm", 0), (pytest.approx(150.0, rel=1e-12), "cm", 0), (450.0, "cm", FLAG_SUSPECT)]
    assert [(p.reason, p.detail) for p in problems] == [
        ("out_of_range", "depth_cm: 1001 cm is outside the possible range 0..1000 cm of canal_depth")]
    assert unbound == 0
    assert catalog.row("CanalGauge", None, "number") == MetricRow(
        "cm", "number", "canal_depth", 0.0, 1000.0, 0.0, 400.0, "the city drainage office")


def test_a_new_quantitys_alias_takes_it_over_from_a_built_in(tmp_path: Path) -> None:
    catalog = _settings(tmp_path, '[[metrics]]\nname = "river_stage"\nunit = "m"\naliases = ["stage"]\n'
                        ).build_catalog()
    assert catalog is not None

    assert getattr(catalog.quantity_of("stage"), "name", None) == "river_stage"
    assert getattr(catalog.quantity_of("water_level"), "name", None) == "water_level"


def test_an_alias_claimed_by_two_metrics_entries_is_a_config_error_naming_both(tmp_path: Path) -> None:
    p = _problem(tmp_path, """
        [[metrics]]
        name = "canal_a"
        unit = "m"
        aliases = ["gauge"]
        [[metrics]]
        name = "canal_b"
        unit = "m"
        aliases = ["Gauge"]
    """)

    assert "'canal_a'" in p.message
    assert "'canal_b'" in p.message
    assert "alias" in p.message
    assert "Gauge" in p.message
    assert "one quantity" in p.fix


def test_a_new_number_quantity_without_a_unit_is_a_config_error(tmp_path: Path) -> None:
    p = _problem(tmp_path, '[[metrics]]\nname = "canal_depth"\npossible = [0, 10]\n')

    assert p.message == "[[metrics]] 'canal_depth' is not a built-in quantity and has no unit"
    assert "unit =" in p.fix


def test_a_built_in_override_needs_no_unit(tmp_path: Path) -> None:
    catalog = _settings(tmp_path, '[[metrics]]\nname = "temperature"\nplausible = [0, 45]\n').build_catalog()
    assert catalog is not None

    assert catalog.quantities["temperature"].unit == "degC"


@pytest.mark.parametrize("key", ["plausible", "possible"])
def test_a_range_with_low_above_high_is_a_config_error_naming_the_key(tmp_path: Path, key: str) -> None:
    p = _problem(tmp_path, f'[[metrics]]\nname = "pm2_5"\n{key} = [500, 0]\n')

    assert p.key == f"metrics[0].{key}"
    assert p.message == f"{key} = [500, 0] has its low end above its high end"
    assert p.fix == "write [0, 500]"


def test_the_range_error_names_the_index_of_its_entry(tmp_path: Path) -> None:
    p = _problem(tmp_path, '[[metrics]]\nname = "pm10"\n[[metrics]]\nname = "pm2_5"\nplausible = [9, 1]\n')

    assert p.key == "metrics[1].plausible"


def test_metrics_naming_one_quantity_twice_is_a_config_error(tmp_path: Path) -> None:
    p = _problem(tmp_path, """
        [[metrics]]
        name = "pm2_5"
        plausible = [0, 300]
        [[metrics]]
        name = "pm2_5"
        possible = [0, 1000]
    """)

    assert "'pm2_5' twice" in p.message
    assert "merge" in p.fix


def test_the_catalog_switched_off_builds_none_and_the_processor_has_none(tmp_path: Path) -> None:
    settings = _settings(tmp_path, """
        [catalog]
        enabled = false
        [[sources]]
        name = "aq"
        topic = "city/{device}/up"
        format = "native"
    """)

    assert settings.build_catalog() is None
    processor = Processor.from_settings(settings)
    assert processor.catalog is None
    # Stored as decoded: no range check, no conversion.
    out = processor.process(RawMessage("city/aq-1/up", json.dumps(
        {"time": "2026-11-25T03:00:00Z", "readings": {"temperature": 900, "pressure": {"value": 101325, "unit": "Pa"}}}
    ).encode(), T))
    assert out.rejection is None
    assert sorted((r.metric, r.value, r.unit) for r in out.readings) == [
        ("pressure", 101325.0, "Pa"), ("temperature", 900.0, None)]


def test_the_catalog_is_on_by_default_in_the_processor(tmp_path: Path) -> None:
    settings = _settings(tmp_path, '[[sources]]\nname = "aq"\ntopic = "city/{device}/up"\nformat = "native"\n')
    processor = Processor.from_settings(settings)
    assert processor.catalog is not None

    out = processor.process(RawMessage("city/aq-1/up", json.dumps(
        {"time": "2026-11-25T03:00:00Z", "readings": {"temperature": 900, "AM2301.Temperature": 21, "uptime": 5}}
    ).encode(), T))

    assert sorted((r.metric, r.value) for r in out.readings) == [("AM2301.Temperature", 21.0), ("uptime", 5.0)]
    assert out.rejection is not None
    assert out.rejection.reason == "out_of_range"
    assert out.unbound == 1


# -- after the review of #13 ---------------------------------------------------------------------


def _single(c: Catalog, metric: str, value: float, unit: str | None) -> Reading | str:
    kept, problems, _ = c.check([Reading("d", metric, T, value, unit)])
    return kept[0] if kept else f"{problems[0].reason}: {problems[0].detail}"


def test_a_metric_pinned_to_its_stored_unit_is_converted_to_it_with_its_ranges() -> None:
    c = Catalog()
    q = c.pin("BME280_pressure", "Pa")  # the metrics row, made before the catalog, says Pa
    assert q is not None
    assert (q.name, q.unit, q.possible, q.plausible) == ("pressure", "Pa", (30000.0, 110000.0), (87000.0, 108500.0))
    got = _single(c, "BME280_pressure", 1010.0, "hPa")  # a reading in hPa is stored in Pa, like its history
    assert isinstance(got, Reading)
    assert (got.value, got.unit) == (101000.0, "Pa")
    assert _single(c, "BME280_pressure", 5.0, "Pa").startswith("out_of_range: BME280_pressure: 5 Pa is outside")
    assert c.row("BME280_pressure", "Pa", "number").unit == "Pa"
    # Another metric of the same quantity keeps the quantity's unit.
    other = _single(c, "pressure", 101000.0, "Pa")
    assert isinstance(other, Reading)
    assert (other.value, other.unit) == (1010.0, "hPa")


def test_a_pinned_unit_that_is_the_quantitys_spelled_otherwise_changes_nothing() -> None:
    c = Catalog()
    assert c.pin("BME280.Temperature", "C") is c.quantities["temperature"]
    assert c.pin("temperature", None) is c.quantities["temperature"]


def test_a_pinned_unit_that_cannot_be_converted_leaves_the_metric_unbound() -> None:
    c = Catalog()
    assert c.pin("Wifi.Signal", "%") is None
    kept, problems, unbound = c.check([Reading("d", "Wifi.Signal", T, 70.0, "%")])
    assert (kept, problems, unbound) == ([Reading("d", "Wifi.Signal", T, 70.0, "%")], [], 1)


def test_the_binding_cache_is_bounded_and_a_metric_past_the_bound_is_still_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ingest.catalog as catalog

    monkeypatch.setattr(catalog, "MAX_CACHED_METRICS", 3)
    c = Catalog()
    c.check([Reading("d", f"x{i}.temperature", T, 20.0, "degC") for i in range(10)])
    assert len(c._bound) == 3
    assert _single(c, "x9.temperature", 900.0, "degC").startswith("out_of_range")


def test_the_conversion_cache_of_a_metric_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import ingest.catalog as catalog

    monkeypatch.setattr(catalog, "MAX_UNITS_PER_METRIC", 2)
    c = Catalog()
    c.check([Reading("d", "temperature", T, 20.0, u) for u in ("C", "F", "K", f"junk{1}", "junk2")])
    assert len(c._bound["temperature"].units) == 2  # type: ignore[union-attr]
    assert _single(c, "temperature", 300.0, "K") == Reading("d", "temperature", T, 26.85, "degC")


def test_a_unit_override_converts_the_ranges_it_keeps() -> None:
    s = Settings.model_validate({"metrics": [{"name": "temperature", "unit": "degF"}]})
    q = s.build_catalog().quantities["temperature"]  # type: ignore[union-attr]
    # -60..70 degC and -10..50 degC, in degF: x * 9/5 + 32.
    assert (q.unit, q.possible, q.plausible) == ("degF", (-76.0, 158.0), (14.0, 122.0))
    c = s.build_catalog()
    assert c is not None
    got = _single(c, "temperature", 25.0, "degC")
    assert isinstance(got, Reading)
    assert (got.value, got.unit, got.flags) == (77.0, "degF", 0)


def test_a_unit_override_whose_ranges_cannot_follow_must_give_both(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[metrics]]\nname = "no2"\nunit = "ppb"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert "'no2' stores no2 in 'ppb'" in text
    assert "give both possible and plausible in ppb" in text
    path.write_text('[[metrics]]\nname = "no2"\nunit = "ppb"\npossible = [0, 20000]\nplausible = [0, 500]\n',
                    encoding="utf-8")
    q = load_settings(path).build_catalog().quantities["no2"]  # type: ignore[union-attr]
    assert (q.unit, q.possible, q.plausible) == ("ppb", (0.0, 20000.0), (0.0, 500.0))


def test_an_alias_an_override_keeps_yields_to_one_another_entry_lists() -> None:
    s = Settings.model_validate({"metrics": [{"name": "river", "unit": "m", "aliases": ["stage"]},
                                             {"name": "water_level", "plausible": [0, 14.5]}]})
    c = s.build_catalog()
    assert c is not None
    assert c.quantity_of("stage").name == "river"  # type: ignore[union-attr]
    assert c.quantity_of("river_level").name == "water_level"  # type: ignore[union-attr]


@pytest.mark.parametrize(("metric", "quantity"), [
    ("pm10.1", "pm10"), ("no2.1", "no2"), ("pm2_5.0", "pm2_5"), ("SDS011.PM10.2", "pm10"),
    ("ENERGY.Power.0", "power"), ("SDS0X1.PM2.5", "pm2_5"), ("x.0", None)])
def test_a_trailing_list_index_is_dropped_when_only_the_rest_binds(metric: str, quantity: str | None) -> None:
    q = Catalog().quantity_of(metric)
    assert (None if q is None else q.name) == quantity


def test_units_pint_reads_beyond_the_table_convert_and_dimensionless_ones_do_not() -> None:
    flow = Quantity("flow", "flow", "l/s", possible=(0, 1e6))
    c = Catalog(overrides=[flow])
    got = _single(c, "flow", 36.0, "m**3/hour")
    assert isinstance(got, Reading)
    assert (got.value, got.unit) == (10.0, "l/s")
    assert _single(c, "flow", 1.0, "1/0").startswith("bad_unit")  # pint's parser raises: not a unit
    assert _single(Catalog(), "temperature", 1.0, "radian").startswith("bad_unit")


def test_one_message_has_at_most_a_bound_of_units_parsed_by_pint_and_the_rest_are_not_cached() -> None:
    c = Catalog()
    n = units.MAX_PARSED_PER_MESSAGE
    readings = [Reading("d", "temperature", T, 20.0, f"zz{i}/s") for i in range(n + 3)]
    _, problems, _ = c.check(readings)
    assert [p.reason for p in problems] == ["bad_unit"] * (n + 3)
    assert all("needed pint's parser" not in p.detail for p in problems[:n])
    assert all(f"more than {n} units in one message needed pint's parser" in p.detail for p in problems[n:])
    assert len(c._bound["temperature"].units) == min(n, 16)  # type: ignore[union-attr]
    # A unit of the tables is never refused for that reason, and the next message parses afresh.
    kept, _, _ = c.check([*readings[: n + 1], Reading("d", "temperature", T, 68.0, "F")])
    assert [r.value for r in kept] == [20.0]
