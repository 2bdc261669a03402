"""`sensor-ingest devices ...`: the device register and its calibrations.

- import, list, show: ingest.register.devices;
- calibrate, calibrations, recalibrate: ingest.register.calibrate.
"""

from __future__ import annotations

import argparse

from ingest.register import calibrate, devices

__all__ = ["add_devices_parsers", "cmd_devices"]

DESCRIPTION = """\
The device register: what each device is (make, model, the source that writes it), where it is
(district, lat/lon, installation height and any attribute of your own) and how often it reports
(expected_interval, for data quality), and the calibrations applied to its readings.

  sensor-ingest devices import FILE.csv          add or update devices from a CSV file (all or nothing)
  sensor-ingest devices list [--where k=v]       the devices, filtered on their attributes
  sensor-ingest devices show DEVICE              one device: its attributes, series and calibrations
  sensor-ingest devices calibrate DEVICE METRIC --scale S --offset O --from T
                                                 add or correct a calibration, and rewrite the stored
                                                 readings it concerns
  sensor-ingest devices calibrations [DEVICE]    the calibrations and how far each is applied
  sensor-ingest devices recalibrate DEVICE METRIC
                                                 finish applying a series' calibrations to its stored
                                                 readings (resumes an interrupted calibrate)
"""


def add_devices_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "devices", help="the device register: import, list, show; calibrations and recalibration",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment (overrides the file):\n"
        "  SENSOR_INGEST_DATABASE_URL        database.url\n"
        "  SENSOR_INGEST_DATABASE_PASSWORD   the database password (only from the environment)",
    )
    actions = p.add_subparsers(dest="devices_command", metavar="ACTION", required=True)
    devices.add_register_actions(actions)
    calibrate.add_calibration_actions(actions)


def cmd_devices(args: argparse.Namespace) -> int:
    if args.devices_command in devices.ACTIONS:
        return devices.cmd_register(args)
    return calibrate.cmd_calibration(args)
