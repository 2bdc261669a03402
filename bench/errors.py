"""The benchmark's one error of its own: the stored set (or the alerts) did not match what was sent."""

from __future__ import annotations

__all__ = ["VerificationError"]


class VerificationError(RuntimeError):
    """A run whose figures must not be kept: a message missing, doubled or misplaced, an event not delivered
    exactly once. The runner prints it and exits 1."""
