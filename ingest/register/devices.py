"""The device register: CSV import, list, show (being written)."""

from __future__ import annotations

import argparse

ACTIONS = frozenset({"import", "list", "show"})


def add_register_actions(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    return None


def cmd_register(args: argparse.Namespace) -> int:
    return 2
