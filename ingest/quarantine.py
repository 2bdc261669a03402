"""Quarantine: `sensor-ingest rejected` and `sensor-ingest replay` (being written)."""

from __future__ import annotations

import argparse


def add_quarantine_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    return None


def cmd_rejected(args: argparse.Namespace) -> int:
    return 2


def cmd_replay(args: argparse.Namespace) -> int:
    return 2
