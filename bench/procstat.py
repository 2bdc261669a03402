"""CPU and memory of the processes under test, read from /proc (Linux only).

CPU is utime + stime, counting the children a process has reaped (PostgreSQL's exited backends) and
the live ones (its current backends), so the database's figure covers the whole cluster. Memory is
the peak, sampled every ``interval`` seconds, of the summed Pss (proportional set size) of the
process tree: Pss splits shared pages (PostgreSQL's shared buffers) between the processes mapping
them, so the sum does not count them once per backend. For a single process the kernel's own
high-water mark (VmHWM) is reported as well.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Usage", "Watch"]

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; everything after its closing parenthesis is fixed.
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def cpu_seconds(pid: int, tree: bool) -> float:
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # Fields 14-17 of stat(5) (utime, stime, cutime, cstime), counted from field 3 here.
    total = sum(int(x) for x in fields[11:15]) / _TICK
    if tree:
        for kid in _children(pid):
            kf = _stat(kid)
            if kf is not None:
                total += (int(kf[11]) + int(kf[12])) / _TICK
    return total


def _kb(pid: int, file: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class Usage:
    cpu_percent: float  # of one core: 150 means one and a half cores busy
    peak_mb: float  # peak summed Pss of the tree, sampled
    hwm_mb: float  # the kernel's VmHWM of the top process (for a single process, exact)


class Watch:
    """Measure one process (or its whole tree) from construction until ``stop()``."""

    def __init__(self, pid: int, tree: bool = False, interval: float = 0.25) -> None:
        self.pid, self.tree, self.interval = pid, tree, interval
        self._cpu0 = cpu_seconds(pid, tree)
        self._t0 = time.monotonic()
        self._peak_kb = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stopped.is_set():
            pids = [self.pid] + (_children(self.pid) if self.tree else [])
            self._peak_kb = max(self._peak_kb, sum(_kb(p, "smaps_rollup", "Pss") for p in pids))
            self._stopped.wait(self.interval)

    def stop(self) -> Usage:
        cpu = cpu_seconds(self.pid, self.tree) - self._cpu0
        wall = time.monotonic() - self._t0
        hwm = _kb(self.pid, "status", "VmHWM")
        self._stopped.set()
        self._thread.join()
        return Usage(cpu_percent=100 * cpu / wall if wall else 0.0, peak_mb=self._peak_kb / 1024, hwm_mb=hwm / 1024)

