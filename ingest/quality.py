"""Data quality per device: `sensor-ingest quality` and the fleet gauges (being written)."""

from __future__ import annotations

import argparse


def add_quality_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    return None


def cmd_quality(args: argparse.Namespace) -> int:
    return 2
