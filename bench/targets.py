"""Issue #17's drain targets: the rule set they run with, and the check of the stored set.

The rules (``target_rules``): 20 threshold rules on ``temperature``, ``above`` 30, 31, ... 49 degC,
each clearing 0.5 below, with no webhook (the events are recorded, not notified: a drain measures
the write path, which evaluates them, not the dispatcher). The scope selects the devices:

- ``fleet`` (the default): every device of the run, as a city's rule on a metric covers its whole
  fleet; each message's temperature readings touch 20 series, whose alert_state rows the batch
  locks and updates;
- ``few``: 4 devices (d0000 and d0100 of each publisher process), as ingest-alerts;
- ``none``: no rule, to measure what the rules cost.

The messages (bench.shapes) stay below every threshold except a spike every 997th message, so the
events are few and their number is known in advance (``expected_events``); with one worker the run
fails unless exactly those were recorded.

The stored set (``verify_messages``): each acknowledged message's readings, found through their
time (bench.shapes.message_key), all stored, each once, under the device the message was sent for;
a missing or incomplete message fails the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Literal

from bench.errors import VerificationError
from bench.loadgen import LoadResult, device_uid
from bench.shapes import SPIKE_EVERY, STEP_MS

__all__ = ["RULE_SCOPES", "TARGET_HYSTERESIS", "TARGET_THRESHOLDS", "MessageGroups", "Scope", "expected_events",
           "group", "groups_sql", "rule_devices", "target_rules", "verify_messages"]

TARGET_THRESHOLDS = tuple(float(t) for t in range(30, 50))  # degC: above every normal reading, below the spike
TARGET_HYSTERESIS = 0.5
Scope = Literal["fleet", "few", "none"]
RULE_SCOPES: tuple[Scope, ...] = ("fleet", "few", "none")

# (process, seq) -> (readings stored, device index they were stored under or -1 if under several)
MessageGroups = dict[tuple[int, int], tuple[int, int]]


def rule_devices(run: str, scope: Scope) -> list[str]:
    """The device globs of the rules of ``scope``."""
    if scope == "fleet":
        return [f"{run}-*"]
    if scope == "few":
        return [f"{run}-p*-d0[0-1]00"]
    return []


def target_rules(run: str, scope: Scope) -> str:
    """The [[rules]] TOML of the drain targets (none for scope ``none``)."""
    if scope == "none":
        return ""
    globs = ", ".join(f'"{g}"' for g in rule_devices(run, scope))
    return "".join(f"""
[[rules]]
name = "temperature-above-{t:g}"
metric = "temperature"
devices = [{globs}]
above = {t}
clear = {t - TARGET_HYSTERESIS}
summary = "{{device}}: temperature {{value}} {{unit}} (threshold {{threshold}})"
""" for t in TARGET_THRESHOLDS)


def groups_sql(baseline: bool) -> str:
    """Per stored message (device, seq): its readings and the first and last commit holding them.
    Parameters: base_ms (bench.shapes' base in ms), run (a LIKE pattern)."""
    key = f"(round(extract(epoch FROM r.time) * 1000)::bigint - %(base_ms)s) / {STEP_MS}"
    if baseline:
        return f"""
SELECT r.device, {key}, count(*), min(pg_xact_commit_timestamp(r.xmin)), max(pg_xact_commit_timestamp(r.xmin))
FROM baseline_readings r WHERE r.device LIKE %(run)s GROUP BY 1, 2
"""
    return f"""
SELECT d.uid, {key}, count(*), min(pg_xact_commit_timestamp(r.xmin)), max(pg_xact_commit_timestamp(r.xmin))
FROM readings r JOIN devices d ON d.id = r.device_id WHERE d.uid LIKE %(run)s GROUP BY 1, 2
"""


def group(rows: Sequence[tuple[str, int, int]], run: str) -> MessageGroups:
    """(uid, seq, readings) rows of groups_sql -> MessageGroups."""
    out: MessageGroups = {}
    for uid, seq, n in rows:
        proc, _, dev = uid[len(run) + 2 :].partition("-d")
        key = (int(proc), int(seq))
        had = out.get(key)
        out[key] = (n, int(dev)) if had is None else (had[0] + n, -1)
    return out


def verify_messages(groups: MessageGroups, load: LoadResult, run: str, per_message: int, devices: int) -> str:
    """Stored == acknowledged: each acknowledged message with its ``per_message`` readings, once each,
    under device ``seq % devices`` of its process. Raises VerificationError, loudly, otherwise."""
    acked = {(p, s) for p, seqs in enumerate(load.acked) for s in seqs}
    missing = sorted(acked - groups.keys())
    incomplete = sorted((k, n) for k, (n, _) in groups.items() if n < per_message)
    doubled = sorted((k, n) for k, (n, _) in groups.items() if n > per_message)
    misplaced = sorted(k for k, (_, d) in groups.items() if d != k[1] % devices)
    unacked = len(groups.keys() - acked)  # possible only if a PUBACK was lost: allowed, reported
    problems = []
    if missing:
        problems.append(f"{len(missing)} acknowledged messages missing (e.g. {missing[:5]})")
    if incomplete:
        problems.append(f"{len(incomplete)} stored with fewer than {per_message} readings (e.g. {incomplete[:5]})")
    if doubled:
        problems.append(f"{len(doubled)} stored more than once: more than {per_message} readings (e.g. {doubled[:5]})")
    if misplaced:
        problems.append(f"{len(misplaced)} stored under another device (e.g. {misplaced[:5]})")
    if problems:
        raise VerificationError(f"{run}: " + "; ".join(problems))
    return (f"ok: {len(acked)} acknowledged, {len(acked)} stored once each ({per_message} readings each), "
            f"{unacked} stored unacked")


def expected_events(load: LoadResult, run: str, scope: Scope, devices: int, resolved_in_message: bool
                    ) -> dict[str, int]:
    """The events the run's messages must raise: 20 firing per spike on a device the rules select, and 20
    resolved when a later reading of that device exists (in the same message: ``resolved_in_message``)."""
    if scope == "none":
        return {"firing": 0, "resolved": 0}
    globs = rule_devices(run, scope)
    firing = resolved = 0
    for proc, seqs in enumerate(load.acked):
        stored = set(seqs)
        for seq in seqs:
            if seq % SPIKE_EVERY or not any(fnmatchcase(device_uid(run, proc, seq % devices), g) for g in globs):
                continue
            firing += len(TARGET_THRESHOLDS)
            if resolved_in_message or any(s in stored for s in range(seq + devices, max(stored) + 1, devices)):
                resolved += len(TARGET_THRESHOLDS)
    return {"firing": firing, "resolved": resolved}
