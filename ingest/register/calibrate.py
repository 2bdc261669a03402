"""Calibrations from the command line: calibrate, calibrations, recalibrate (being written)."""

from __future__ import annotations

import argparse


def add_calibration_actions(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    return None


def cmd_calibration(args: argparse.Namespace) -> int:
    return 2
