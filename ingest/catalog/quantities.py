"""The built-in quantities: data, not code.

Each quantity names its stored unit, its kind, a *possible* range (outside it a reading is rejected,
``out_of_range``: no working sensor of that quantity reports it) and a *plausible* range (outside it a
reading is stored with the suspect flag and still reaches the alert rules: a record flood or a
wildfire's smoke is exactly when an alert matters), and where each range comes from. Plausible ranges
are set for Hanoi's climate and a city's street-level sensors; a city elsewhere overrides them with
``[[metrics]]`` entries in its config (see the README, "Metric catalog").

Aliases are matched after normalisation (ingest.catalog.model.normalize: lower case, ``_ - .`` and
spaces removed, except that a separator between two digits is a decimal point), so ``pm2_5``,
``PM2.5`` and ``pm25`` are one alias but ``pm1_0`` is not ``pm10``. A whole-name alias wins over a
suffix (``ESP32.Temperature`` is device_temperature although its last segment is ``Temperature``).
An alias is added only for a field whose firmware documents what it measures and in which unit the
preset (or the format) delivers it.

Names left unbound on purpose (a reading of them is stored as it came, counted as unbound):

- airrohr ``P1``/``P2`` (bare): the firmware's PPD42NS particle counts ("PM10 Count", pcs per 0.01
  cu ft), not ug/m3; ``SDS_P1``/``SDS_P2`` etc. are the mass concentrations (P1 = PM10, P2 = PM2.5).
  ``SPS30_P4`` (PM4: there is no pm4 quantity), ``SPS30_N*``/``IPS_N*``/``NPM_N*`` (number
  concentrations, #/cm3), ``SPS30_TS`` (typical particle size, um), ``HECA_*`` (the SHT31 of the Nettigo
  NAMF heater control, in the heated inlet, not the ambient air), ``SCD30_co2_ppm`` (no CO2 quantity), ``GPS_*``.
- Tasmota ``POWER``/``POWER<n>`` (a relay's ON/OFF; the catalog stores a bool under ``power``
  unbound by kind), ``*.DewPoint`` (a dew point, not the air temperature), ``ENERGY.Today``/
  ``Yesterday``/``Period`` (per-day and per-period energy, not the cumulative register),
  ``ENERGY.ApparentPower``/``ReactivePower``/``Factor`` (no VA/var/cos phi quantity),
  ``*.CarbonDioxide``/``*.eCO2``, ``ANALOG.Temperature1``/``ANALOG.A0`` (an ADC input: what it
  measures depends on the wiring), ``TX2x.Dir.Range`` (a spread, not a bearing).
- Zigbee2MQTT ``linkquality`` (an LQI of 0-255, neither a percentage nor dBm).
- Shelly ``*.temperature.tF``/``temperature:<n>.tF`` (the Fahrenheit copy of tC; a reading without
  its preset's unit would be taken as Celsius), Shelly Gen1 ``tmp.value`` (its unit is the sibling
  ``tmp.units``, C or F), ``aenergy.by_minute.*`` (per-minute energy, not cumulative),
  ``emeter.<n>.total`` (a cumulative Wh register, but its name has only an index between the
  component and ``total``).
- LoRaWAN codec fields without a unit in their name or a documented unit: ``Bat_mV``/``ACI1_mA``
  (mV and mA: an alias cannot carry a unit, and a reading without one is taken in V or A),
  ``targetTemperature`` (a set point), ``soil*`` (soil, not air), ``luminosity``.

Bound by name although the firmware means something else, which data cannot undo (a binding is per
metric name, whatever the source): Zigbee2MQTT ``voltage`` (mV on battery devices, V on plugs, no
unit), Shelly Gen1 ``temperature`` (the device's own temperature, bound to air temperature), Shelly
Gen2 ``wifi.rssi`` is dBm while Tasmota's ``Wifi.RSSI`` is a percentage: the two normalise alike, so
Tasmota's is an ``exact`` (case-sensitive) name of signal_quality and Shelly's binds to rssi.
"""

from __future__ import annotations

from ingest.catalog.model import Quantity

__all__ = ["BUILTIN"]

# The Tasmota TX20/TX23 anemometer leaves (Tasmota xsns_35_tx20: {"TX23":{"Speed":{"Act":...},
# "Dir":{"Deg":...}}}), spelled out: a bare "Speed.Avg" or "Dir.Min" is too generic to bind.
_TX2X = ("TX20", "TX23")
_TX2X_SPEED = tuple(f"{s}.Speed.{k}" for s in _TX2X for k in ("Act", "Avg", "Min", "Max"))
_TX2X_DIR = tuple(f"{s}.Dir.{k}" for s in _TX2X for k in ("Deg", "Avg", "Min", "Max"))

BUILTIN: tuple[Quantity, ...] = (
    Quantity(
        "pm1", "PM1 mass concentration", "ug/m3", possible=(0, 2000), plausible=(0, 500),
        aliases=("pm1", "pm1.0", "pm_1", "pm1_0", "pm01", "SPS30_P0", "PMS_P0", "NPM_P0", "IPS_P0"),
        source="possible: above the range of common optical PM sensors (Plantower PMS5003 data manual: "
        "maximum range at least 1,000 ug/m3; Sensirion SPS30 datasheet: 0-1,000 ug/m3) with margin; "
        "plausible: 500 ug/m3 as for PM2.5, which PM1 cannot exceed"),
    Quantity(
        "pm2_5", "PM2.5 mass concentration", "ug/m3", possible=(0, 2000), plausible=(0, 500),
        aliases=("pm2.5", "pm25", "pm2_5", "pm2p5", "SDS_P2", "SPS30_P2", "PMS_P2", "HPM_P2", "NPM_P2",
                 "IPS_P2"),
        source="possible: above the range of common optical PM sensors (Plantower PMS5003 data manual: "
        "maximum range at least 1,000 ug/m3; Nova SDS011 specification: 0-999.9 ug/m3) with margin; "
        "plausible: 500 ug/m3, above the US EPA AQI's 'hazardous' PM2.5 threshold (225.5 ug/m3 since the "
        "2024 revision, EPA-454/B-24-002) and the old scale's top (500.4); WHO 2021 24-hour guideline: 15 ug/m3"),
    Quantity(
        "pm10", "PM10 mass concentration", "ug/m3", possible=(0, 2000), plausible=(0, 600),
        aliases=("pm10", "pm_10", "pm10_0", "SDS_P1", "SPS30_P1", "PMS_P1", "HPM_P1", "NPM_P1", "IPS_P1"),
        source="possible: above the range of common optical PM sensors (Nova SDS011 specification: "
        "0-999.9 ug/m3) with margin; plausible: about the top of the US EPA AQI PM10 scale (604 ug/m3, "
        "40 CFR 58 Appendix G); WHO 2021 24-hour guideline: 45 ug/m3"),
    Quantity(
        "no2", "nitrogen dioxide", "ug/m3", possible=(0, 40000), plausible=(0, 1000), molar_mass=46.0055,
        aliases=("no2", "nitrogen_dioxide"),
        source="possible: 40,000 ug/m3 (about 21 ppm at 25 C), ten times the top of the US EPA AQI NO2 "
        "scale (2,049 ppb), a bound against garbage; plausible: 1,000 ug/m3 (about 530 ppb), inside the "
        "AQI's 1-hour 'unhealthy' band (361-649 ppb); WHO 2021 24-hour guideline: 25 ug/m3"),
    Quantity(
        "o3", "ozone", "ug/m3", possible=(0, 40000), plausible=(0, 800), molar_mass=47.9982,
        aliases=("o3", "ozone"),
        source="possible: 40,000 ug/m3 (about 20 ppm at 25 C), over 30 times the top of the US EPA AQI's "
        "1-hour O3 scale (0.604 ppm), a bound against garbage; plausible: 800 ug/m3, about where the AQI's "
        "1-hour 'hazardous' band starts (405 ppb, about 795 ug/m3)"),
    Quantity(
        "so2", "sulphur dioxide", "ug/m3", possible=(0, 150000), plausible=(0, 2000), molar_mass=64.064,
        aliases=("so2", "sulfur_dioxide", "sulphur_dioxide"),
        source="possible: above the full scale of an Alphasense SO2-A4 cell (datasheet: 50 ppm, about "
        "131,000 ug/m3 at 25 C); plausible: 2,000 ug/m3 (about 760 ppb), above the US EPA AQI SO2 "
        "'unhealthy' band (186-304 ppb, up to about 800 ug/m3) with margin for an industrial plume"),
    Quantity(
        "co", "carbon monoxide", "mg/m3", possible=(0, 1200), plausible=(0, 60), molar_mass=28.010,
        aliases=("co", "carbon_monoxide"),
        source="possible: the full scale of an Alphasense CO-B4 cell (datasheet: 1,000 ppm, about 1,145 "
        "mg/m3 at 25 C) with margin; plausible: 60 mg/m3 (about 52 ppm), above where the US EPA AQI's "
        "8-hour CO 'hazardous' band starts (30.5 ppm, about 35 mg/m3)"),
    Quantity(
        "temperature", "air temperature", "degC", possible=(-60, 70), plausible=(-10, 50),
        aliases=("temperature", "temp", "air_temperature", "ambient_temperature", "local_temperature",
                 "BME280_temperature", "BMP280_temperature", "BMP_temperature", "SHT3X_temperature",
                 "HTU21D_temperature", "SCD30_temperature", "DS18B20_temperature", "temperature:0.tC"),
        source="possible: 70 C is above the WMO world record (56.7 C, Death Valley, 10 July 1913) and -60 C "
        "far below any tropical city (world record -89.2 C, Vostok, 21 July 1983); plausible: Hanoi's "
        "recorded extremes (about 2.7 C in 1955 and 42.8 C in 1926) with margin"),
    Quantity(
        "device_temperature", "a device's or chip's own temperature", "degC", possible=(-60, 150),
        plausible=(-10, 100),
        aliases=("device_temperature", "internal_temperature", "chip_temperature", "cpu_temperature",
                 "ESP32.Temperature", "ANALOG.Temperature", "temperature.tC", "temp.temp",
                 "smart_device.temp_c"),
        source="possible: the storage limit of ESP32 modules (ESP32-WROOM-32D datasheet: -40 to 150 C) "
        "with margin below; plausible: their operating range (-40 to 85 C) trimmed to Hanoi's climate "
        "below and widened to 100 C above, as a chip runs hotter than its ambient (ESP-IDF temperature "
        "sensor docs)"),
    Quantity(
        "humidity", "relative humidity", "%", possible=(0, 100), plausible=(5, 100),
        aliases=("humidity", "hum", "rh", "relative_humidity", "air_humidity", "BME280_humidity",
                 "SHT3X_humidity", "HTU21D_humidity", "SCD30_humidity", "hum.value"),
        source="possible: relative humidity is 0-100 % by definition; plausible: from 5 %, since a reading "
        "near 0 % outdoors in a humid subtropical city such as Hanoi more likely means a failed sensor"),
    Quantity(
        "pressure", "atmospheric pressure", "hPa", possible=(300, 1100), plausible=(870, 1085),
        aliases=("pressure", "press", "baro", "air_pressure", "barometric_pressure", "atmospheric_pressure",
                 "BME280_pressure", "BMP280_pressure", "BMP_pressure"),
        source="possible: the Bosch BME280 datasheet's operating range (300-1,100 hPa); plausible: the "
        "recorded extremes of sea-level pressure (870 hPa, Typhoon Tip, 1979; 1,083.8 hPa, Agata, Russia, "
        "1968, WMO archive), which station pressure at Hanoi's low altitude follows closely"),
    Quantity(
        "noise", "sound level, A-weighted", "dB(A)", possible=(0, 194), plausible=(25, 130),
        aliases=("noise", "sound_level", "laeq", "noise_laeq", "noise_la_max", "noise_la_min",
                 "DNMS_noise_LAeq", "DNMS_noise_LA_min", "DNMS_noise_LA_max"),
        source="possible: 194 dB, one atmosphere of sound pressure, is the loudest undistorted sound in "
        "air; plausible: a recording studio is about 30 dB(A) and the threshold of pain about 135 dB "
        "(Everest, The Master Handbook of Acoustics, table 2-5)"),
    Quantity(
        "illuminance", "illuminance", "lx", possible=(0, 200000), plausible=(0, 150000),
        aliases=("illuminance", "illuminance_lux", "lux", "ambient_light", "lux.value"),
        source="possible: above any daylight with margin; plausible: above the solar illuminance constant "
        "(about 128,000 lx outside the atmosphere), while direct sunlight at the ground gives up to about "
        "100,000 lx"),
    Quantity(
        "water_level", "water level", "m", possible=(-20, 100), plausible=(-5, 20),
        aliases=("water_level", "waterlevel", "river_level", "stage", "gauge_height"),
        source="possible: a bound for gauge datums of rivers and drains; plausible: up to 20 m for street "
        "flood sensors and river gauges (the Red River at the Hanoi gauge peaked at about 11.3 m in "
        "September 2024, Typhoon Yagi, its highest since 2004; alert level 3 is 11.5 m): override per city"),
    Quantity(
        "rainfall", "rainfall depth", "mm", possible=(0, 2000), plausible=(0, 500),
        aliases=("rainfall", "precipitation", "rain_mm", "rain_total"),
        source="possible: above the world record 24-hour rainfall (1,825 mm, Foc-Foc, La Reunion, 7-8 "
        "January 1966, WMO archive); plausible: 500 mm in one report, over a quarter of Hanoi's annual "
        "rainfall (about 1,800 mm)"),
    Quantity(
        "rain_rate", "rain rate", "mm/h", possible=(0, 2000), plausible=(0, 300),
        aliases=("rain_rate", "rainrate", "rain_intensity", "precipitation_rate"),
        source="possible: above the world record one-minute rainfall (31.2 mm, Unionville, Maryland, 1956, "
        "about 1,870 mm/h; WMO archive); plausible: about the world record one-hour rainfall (305 mm, "
        "Holt, Missouri, 1947; WMO archive)"),
    Quantity(
        "wind_speed", "wind speed", "m/s", possible=(0, 120), plausible=(0, 70),
        aliases=("wind_speed", "windspeed", "wind_speed_avg", "wspd", *_TX2X_SPEED),
        source="possible: above the highest measured surface gust (113 m/s, 408 km/h, Barrow Island, "
        "10 April 1996; WMO); plausible: about where hurricane Category 5 begins (sustained winds above "
        "249 km/h, 69 m/s; WMO info note 58)"),
    Quantity(
        "wind_direction", "wind direction", "deg", possible=(0, 360), plausible=(0, 360),
        aliases=("wind_direction", "winddirection", "wind_dir", "winddir", "wdir", *_TX2X_DIR),
        source="a compass bearing in degrees, 0-360 by definition"),
    Quantity(
        "traffic_count", "vehicles counted in a report interval", "count", possible=(0, 1000000),
        plausible=(0, 20000),
        aliases=("traffic_count", "vehicle_count", "vehicles"),
        source="possible: a bound against counter garbage; plausible: ten lane-hours at a multilane "
        "road's basic capacity (about 2,000 passenger cars per lane per hour, US Highway Capacity Manual)"),
    Quantity(
        "energy", "energy, cumulative", "kWh", possible=(0, 1e9), plausible=(0, 1e8),
        aliases=("energy", "energy_total", "total_energy", "kwh", "aenergy.total", "ret_aenergy.total"),
        source="possible and plausible: bounds for a register of a city's meters (a street light cabinet "
        "or a building); Shelly Gen2 aenergy.total and ret_aenergy.total are such registers in Wh"),
    Quantity(
        "power", "active power", "W", possible=(-1e7, 1e7), plausible=(-1e6, 1e6),
        aliases=("power", "active_power", "activepower", "apower", "watts"),
        source="possible: 10 MW either way (negative: export); plausible: 1 MW, a large building's feed"),
    Quantity(
        "voltage", "voltage", "V", possible=(-50000, 50000), plausible=(0, 500),
        aliases=("voltage", "volt", "volts", "battery_voltage", "BatV", "battery.V", "AVI1_V", "AVI2_V"),
        source="possible: a 35 kV distribution line with margin; plausible: low-voltage mains (220-230 V "
        "phase voltage in Vietnam) and battery voltages"),
    Quantity(
        "current", "electric current", "A", possible=(-10000, 10000), plausible=(-1000, 1000),
        aliases=("current", "amps", "ampere"),
        source="possible: above a distribution transformer's secondary current; plausible: a building's "
        "main feed"),
    Quantity(
        "battery", "battery charge", "%", possible=(0, 100), plausible=(0, 100),
        aliases=("battery", "battery_level", "bat", "batt", "battery_percent", "bat.value"),
        source="a state of charge in percent, 0-100 by definition"),
    Quantity(
        "rssi", "received signal strength", "dBm", possible=(-200, 30), plausible=(-150, 0),
        aliases=("rssi", "signal", "signal_strength", "wifi_rssi"),
        source="possible: a bound around the SX1276's -148 dBm sensitivity and +30 dBm (1 W), ten times its "
        "+20 dBm maximum output (Semtech SX1276 datasheet); plausible: from just below that sensitivity to "
        "0 dBm, as received power stays below a milliwatt"),
    Quantity(
        "signal_quality", "Wi-Fi link quality in percent", "%", possible=(0, 100), plausible=(0, 100),
        aliases=("signal_quality",), exact=("Wifi.RSSI",),  # exact: Shelly's wifi.rssi is dBm
        source="a percentage, 0-100 by definition; Tasmota's STATE Wifi.RSSI is one (2 x (dBm + 100), "
        "clipped to 0-100: WifiGetRssiAsQuality), its Wifi.Signal the dBm"),
    Quantity(
        "snr", "signal-to-noise ratio", "dB", possible=(-50, 60), plausible=(-25, 30),
        aliases=("snr", "lora_snr", "signal_to_noise"),
        source="LoRa demodulates down to -20 dB SNR at SF12 and the SX1276 reports packet SNR in "
        "quarter dB as a signed byte, -32 to +31.75 dB (Semtech SX1276 datasheet); wider is garbage"),
)
