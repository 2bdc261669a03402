"""Compiled alert rules and webhooks: frozen values built once from the settings (no I/O)."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

__all__ = ["VALUES", "Rule", "ValueRules", "Webhook", "decode_secret", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds of "90s", "2m", "1.5h", "24h", "7d" (a bare number is seconds)."""
    if isinstance(text, bool):
        raise ValueError("a duration is a number of seconds or a string such as \"2m\"")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"a duration cannot be negative ({text})")
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration; write e.g. \"30s\", \"2m\", \"1h\" or \"7d\"")
    return float(m.group(1)) * _UNIT[m.group(2)]


def decode_secret(secret: str) -> bytes:
    """The key of a Standard Webhooks secret "whsec_<base64>" (the prefix is optional)."""
    raw = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError as exc:
        raise ValueError("not a Standard Webhooks secret: expected whsec_ followed by base64") from exc
    if len(key) < 16:
        raise ValueError(f"the secret's key is {len(key)} bytes; use at least 16 (24 to 64 is usual)")
    return key


def _text(value: object) -> str | None:
    """An attribute as the config's ``where`` writes it (a JSON true is "true"; null matches nothing)."""
    if value is None:
        return None
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True, slots=True)
class Webhook:
    name: str
    url: str
    secret: bytes = field(repr=False)
    body: Literal["standard", "alertmanager"] = "standard"
    timeout: float = 5.0
    max_age: float = 86400.0  # seconds after which an undelivered event is marked failed
    external_url: str = ""  # body = "alertmanager": the payload's externalURL (compile_alerts fills it in)


Signal = Literal["value", "rate", "window", "no_data"]
Agg = Literal["avg", "min", "max", "count"]


_SELECTED_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Rule:
    """An alert rule. ``signal`` says what is judged (ingest.alerts.evaluate):

    - value: each reading's value;
    - rate: the rate of change per minute over ``over`` seconds, at each reading;
    - window: the aggregate ``agg`` (avg, min, max, count) of the readings of a window of ``over``
      seconds, clock-aligned (``align`` = "clock": judged once when the window has passed) or rolling
      (at each reading, over the ``over`` seconds up to it); a window with fewer than ``coverage`` x
      the readings the device's expected interval promises is not judged;
    - no_data: the series (``per`` = "series") or the device (``per`` = "device", any metric; then
      ``metric`` is "") silent for longer than ``threshold`` seconds fires; a reading resolves it.

    ``kind`` is the condition on what is judged: above (> threshold), below (< threshold) or outside
    (< low or > high). The episode ends when the judged value is back past ``clear`` (for outside:
    inside [clear_low, clear_high]); ``for_seconds``: the condition must hold this long in event time
    before the rule fires. A no_data rule is kind "above" with the silence in seconds as its value."""

    name: str
    metric: str
    kind: Literal["above", "below", "outside"]
    threshold: float  # above/below: the level; outside: low
    high: float | None = None  # outside: high
    clear: float | None = None  # above/below: the level that ends the episode; outside: clear low
    clear_high: float | None = None  # outside: clear high
    for_seconds: float = 0.0
    severity: str = "warning"
    webhooks: tuple[str, ...] = ()
    summary: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    devices: tuple[str, ...] = ()  # globs; empty: every device
    where: tuple[tuple[str, str], ...] = ()  # device attributes that must equal these
    signal: Signal = "value"
    over: float = 0.0  # rate, window: the span in seconds
    agg: Agg = "avg"  # window
    align: Literal["clock", "rolling"] = "clock"  # window
    coverage: float = 0.0  # window: the share of the expected readings a window needs to be judged
    per: Literal["series", "device"] = "series"  # no_data
    # Computed once (the alert stage asks for them per series and per reading): the fingerprint, and
    # the devices this rule's globs and attributes selected (bounded; emptied when full).
    _version: str = field(init=False, repr=False, compare=False, hash=False, default="")
    _selected: dict[str, bool] = field(init=False, repr=False, compare=False, hash=False,
                                                   default_factory=dict)

    def __post_init__(self) -> None:
        parts = (self.metric, self.kind, self.threshold, self.high, self.clear, self.clear_high, self.for_seconds,
                 self.devices, self.where, self.signal, self.over, self.agg, self.align, self.coverage, self.per)
        object.__setattr__(self, "_version", hashlib.sha256(repr(parts).encode()).hexdigest()[:16])

    @property
    def per_device(self) -> bool:
        """A no_data rule on the device: its state is keyed (rule, device, metric 0)."""
        return self.signal == "no_data" and self.per == "device"

    @property
    def version(self) -> str:
        """A fingerprint of what decides this rule's events (not its webhooks, summary or labels):
        stored with each series' state, so that workers holding different versions of the rule after a
        reload do not take turns on one series (ingest.alerts.versions)."""
        return self._version

    def selects(self, device: str, attributes: dict[str, object] | None) -> bool:
        if self.devices:
            memo = self._selected
            hit = memo.get(device)
            if hit is None:
                if len(memo) >= _SELECTED_MAX:
                    memo.clear()
                hit = memo[device] = any(fnmatchcase(device, g) for g in self.devices)
            if not hit:
                return False
        if self.where:
            attrs = attributes or {}
            return all(k in attrs and _text(attrs[k]) == v for k, v in self.where)
        return True

    def breached_within(self, low: float, high: float) -> bool:
        """Some value in [low, high] that is one of the judged values breaches: ``breached`` of the
        least and the greatest of them (the conditions are one-sided or outside a range)."""
        if self.kind == "above":
            return high > self.threshold
        if self.kind == "below":
            return low < self.threshold
        assert self.high is not None
        return low < self.threshold or high > self.high

    def breached(self, v: float) -> bool:
        if self.kind == "above":
            return v > self.threshold
        if self.kind == "below":
            return v < self.threshold
        assert self.high is not None
        return v < self.threshold or v > self.high

    def cleared(self, v: float) -> bool:
        """The value ends an episode: back past the clear level (default: the threshold itself)."""
        if self.kind == "above":
            return v <= (self.threshold if self.clear is None else self.clear)
        if self.kind == "below":
            return v >= (self.threshold if self.clear is None else self.clear)
        assert self.high is not None
        low = self.threshold if self.clear is None else self.clear
        high = self.high if self.clear_high is None else self.clear_high
        return low <= v <= high

    def threshold_of(self, v: float) -> float:
        """The bound a value is judged against (outside: the nearer one)."""
        if self.kind != "outside":
            return self.threshold
        assert self.high is not None
        return self.threshold if v < self.threshold or abs(v - self.threshold) <= abs(v - self.high) else self.high


VALUES = "*value"  # alert_state.rule of a series' shared row for its value rules (no rule name starts with *)


@dataclass(frozen=True, slots=True)
class ValueRules:
    """The value rules (``signal`` = "value") of a rule set, judged together per series: one
    alert_state row (rule VALUES) per (device, metric) carries what they share (the last reading
    judged, what waits, when a reading last arrived), and a rule has a row of its own only once its
    state has left ok (ingest.alerts.stage). ``version`` fingerprints them all: the series' row stores
    it, and workers holding different sets after a reload do not take turns on a series
    (ingest.alerts.versions)."""

    rules: tuple[Rule, ...] = ()
    name: str = VALUES
    _version: str = field(init=False, repr=False, compare=False, hash=False, default="")
    _on: dict[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False, hash=False,
                                              default_factory=dict)
    # (metric, device) -> the members, for the metrics none of whose value rules has a ``where``
    # (bounded; emptied when full): a batch asks once per reading.
    _members: dict[tuple[str, str], tuple[Rule, ...]] = field(init=False, repr=False, compare=False, hash=False,
                                                               default_factory=dict)
    _by_attributes: frozenset[str] = field(init=False, repr=False, compare=False, hash=False,
                                           default=frozenset())

    def __post_init__(self) -> None:
        parts = sorted((r.name, r.version) for r in self.rules)
        object.__setattr__(self, "_version", hashlib.sha256(repr(parts).encode()).hexdigest()[:16])
        on: dict[str, list[Rule]] = {}
        for r in sorted(self.rules, key=lambda r: r.name):
            on.setdefault(r.metric, []).append(r)
        object.__setattr__(self, "_on", {m: tuple(rs) for m, rs in on.items()})
        object.__setattr__(self, "_by_attributes", frozenset(r.metric for r in self.rules if r.where))

    @property
    def version(self) -> str:
        return self._version

    def on(self, metric: str) -> tuple[Rule, ...]:
        """The value rules of ``metric``, by name."""
        return self._on.get(metric, ())

    def members(self, metric: str, device: str, attributes: dict[str, object] | None) -> tuple[Rule, ...]:
        """The value rules that judge the series (device, metric), by name."""
        if metric in self._by_attributes:
            return tuple(r for r in self.on(metric) if r.selects(device, attributes))
        memo = self._members
        hit = memo.get((metric, device))
        if hit is None:
            if len(memo) >= _SELECTED_MAX:
                memo.clear()
            hit = memo[(metric, device)] = tuple(r for r in self.on(metric) if r.selects(device, None))
        return hit
