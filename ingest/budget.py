"""Pure admission of new series: a bound on what one publisher can create.

Device and metric ids come from payloads. A misconfigured or hostile publisher that sends a fresh
device id (or metric name) in every message would otherwise grow the devices and metrics tables,
and the id cache of every worker, without bound. Each source may therefore create at most ``limit``
new keys of a kind per window; beyond that, the readings of further new keys are rejected
(``too_many_new_series``) and can be replayed once the cause is understood. Known keys are never
limited, so a large fleet is never throttled after its first minutes.
"""

from __future__ import annotations

__all__ = ["NewKeyBudget"]


class NewKeyBudget:
    """At most ``limit`` new keys per source in each fixed window of ``window`` seconds."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._used: dict[str, tuple[float, int]] = {}  # source -> (window start, keys admitted)

    def admit(self, source: str, now: float) -> bool:
        """Take one new key for ``source`` at monotonic time ``now``; False when the window is spent."""
        start, used = self._used.get(source, (now, 0))
        if now - start >= self.window:
            start, used = now, 0
        if used >= self.limit:
            self._used[source] = (start, used)
            return False
        self._used[source] = (start, used + 1)
        return True
