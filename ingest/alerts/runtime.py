"""The running set of rules and webhooks, swapped whole on a reload (SIGHUP, `sensor-ingest rules
reload`): the writer's alert stage and the dispatcher read it at the start of each batch or claim.

A reload reads the whole config file again, as at start-up, and replaces the set only when every
rule and webhook is valid; otherwise the old set stays and every problem is logged. ``view`` is the
set as GET /v1/rules shows it: webhooks by name and URL, never their secrets.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ingest.alerts.model import Rule, ValueRules, Webhook
from ingest.alerts.settings import RuleSettings, WebhookSettings, compile_alerts
from ingest.errors import ConfigError
from ingest.settings import load_settings, mask_url

__all__ = ["AlertRuntime", "RateView", "RuleSet", "RuleSetView", "RuleView", "WebhookView", "WindowView", "load_rules"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    webhooks: dict[str, Webhook] = field(default_factory=dict)
    max_notify_age: float = 3600.0
    retry_max: float = 300.0
    mqtt: bool = False  # alerts.mqtt: every notified event also published (ingest.alerts.mqtt_channel)
    mqtt_prefix: str = "sensor-ingest"
    lateness: float = 0.5  # alerts.lateness: series are judged up to the clock minus this
    no_data_grace: float | None = None  # alerts.no_data_grace (None: the longest no_data duration)
    # The value rules, judged together per series (ingest.alerts.model.ValueRules).
    values: ValueRules = field(init=False, repr=False, compare=False, default=ValueRules())

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", ValueRules(tuple(r for r in self.rules if r.signal == "value")))

    @property
    def grace(self) -> float:
        """Seconds after a start (or an outage) before the no-data job judges silences:
        alerts.no_data_grace, else the longest no_data duration (the issue's default)."""
        if self.no_data_grace is not None:
            return self.no_data_grace
        return max((r.threshold for r in self.rules if r.signal == "no_data"), default=0.0)

    @property
    def versioned(self) -> tuple[Rule | ValueRules, ...]:
        """What a worker's versions name (ingest.alerts.versions): each rule, and the value rules together."""
        return (*self.rules, self.values) if self.values.rules else self.rules

    def for_metric(self, metric: str) -> tuple[Rule, ...]:
        """The rules a reading of ``metric`` feeds: those on the metric, then the per-device no_data
        rules (readings of any metric are a sign of life of their device)."""
        return (tuple(r for r in self.rules if r.metric == metric and not r.per_device)
                + tuple(r for r in self.rules if r.per_device))


class AlertRuntime:
    """Holds the active RuleSet. ``config``: the file a reload reads again (None: nothing to reload)."""

    def __init__(self, active: RuleSet, config: Path | None = None) -> None:
        self.active = active
        self.config = config
        self._on_change: list[Callable[[RuleSet], None]] = []
        self._by_metric: dict[str, tuple[Rule, ...]] = {}
        self._any: tuple[Rule, ...] = ()
        self._index()

    def _index(self) -> None:
        by: dict[str, list[Rule]] = {}
        for r in self.active.rules:
            if not r.per_device:
                by.setdefault(r.metric, []).append(r)
        self._any = tuple(r for r in self.active.rules if r.per_device)
        self._by_metric = {m: (*rs, *self._any) for m, rs in by.items()}

    def rules_for(self, metric: str) -> tuple[Rule, ...]:
        """As RuleSet.for_metric: the rules on ``metric``, then the per-device no_data rules, which
        readings of every metric feed."""
        return self._by_metric.get(metric, self._any)

    @property
    def metrics(self) -> frozenset[str]:
        """The metrics rules name (a per-device no_data rule names none: it takes every metric)."""
        return frozenset(self._by_metric)

    def on_change(self, callback: Callable[[RuleSet], None]) -> None:
        self._on_change.append(callback)

    def replace(self, new: RuleSet) -> None:
        self.active = new
        self._index()
        for callback in self._on_change:
            callback(new)

    def reload(self) -> tuple[bool, str]:
        """Read ``config`` again and swap the set if every rule and webhook is valid: (True, what
        changed), or (False, every problem) with the old set kept. Called on the event loop (the
        SIGHUP handler, POST /-/reload), so two reloads never interleave."""
        if self.config is None:
            text = "rules not reloaded: the service was started without --config, so there is no file to read again"
            log.error("%s", text)
            return False, text
        new, problems = load_rules(self.config)
        if new is None:
            kept = f"{len(self.active.rules)} rule(s), {len(self.active.webhooks)} webhook(s)"
            head = f"rules not reloaded from {self.config}: {len(problems)} problem(s); the active set stays ({kept})"
            log.error("%s", head)
            for problem in problems:
                log.error("rules reload: %s", problem)
            return False, "\n".join([head, *(f"  - {p}" for p in problems)])
        changes = _changes(self.active, new)
        self.replace(new)
        count = f"{len(new.rules)} rule(s), {len(new.webhooks)} webhook(s)"
        if not changes:
            summary = f"rules reloaded from {self.config}: no change ({count})"
            log.info("%s", summary)
            return True, summary
        summary = f"rules reloaded from {self.config}: {count}; " + "; ".join(changes)
        log.info("rules reloaded from %s: %s", self.config, count)
        for change in changes:
            log.info("rules reload: %s", change)
        return True, summary

    def view(self) -> RuleSetView:
        return view_of(self.active, self.config)


def load_rules(path: Path) -> tuple[RuleSet | None, list[str]]:
    """The rule set FILE describes (read with the environment, as the service reads it), or None and
    every problem, each naming the rule or webhook, the key and the fix. The whole file must be valid:
    a file the service would refuse at its next start is not taken at a reload either."""
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        return None, _problems(exc, path)
    rules, hooks, problems = compile_alerts(settings.rules, settings.webhooks)
    if problems:  # load_settings checks these already; kept for a file that changed in between
        return None, problems
    a = settings.alerts
    return RuleSet(rules, hooks, a.max_notify_age, a.retry_max, a.mqtt, a.mqtt_prefix, a.lateness,
                   a.no_data_grace), []


_ENTRY = re.compile(r"^(rules|webhooks)\[(\d+)\](?! \()")


def _problems(exc: ConfigError, path: Path) -> list[str]:
    """The ConfigError's problems, one line each, with each rule or webhook named as well as numbered.

    Settings joins the problems compile_alerts finds (unknown webhook, duplicate name, secret) into
    one; they are split again here so that each problem stands next to its own fix."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        data = {}
    out: list[str] = []
    for problem in exc.problems:
        text = str(problem)
        if not problem.key and re.match(r"(rules|webhooks)\[\d+\]", problem.message):
            separate = _compile_problems(data)
            if separate:
                out.extend(separate)
                continue
        out.append(_ENTRY.sub(lambda m: _named(m, data), text, count=1))
    return out


def _compile_problems(data: dict[str, Any]) -> list[str]:
    try:
        rules = TypeAdapter(list[RuleSettings]).validate_python(data.get("rules", []))
        hooks = TypeAdapter(list[WebhookSettings]).validate_python(data.get("webhooks", []))
    except ValidationError:
        return []
    return compile_alerts(rules, hooks)[2]


def _named(m: re.Match[str], data: dict[str, Any]) -> str:
    entries = data.get(m.group(1))
    i = int(m.group(2))
    if isinstance(entries, list) and i < len(entries) and isinstance(entries[i], dict):
        name = entries[i].get("name")
        if isinstance(name, str):
            return f"{m.group(0)} ({name})"
    return m.group(0)


def _differences(old: object, new: object, names: tuple[str, ...]) -> str:
    return ", ".join(n for n in names if getattr(old, n) != getattr(new, n))


_RULE_FIELDS = tuple(f.name for f in fields(Rule) if f.compare)  # not the cached ones
# A changed secret is named as changed; its value never is (Webhook.secret has no repr either).
_WEBHOOK_FIELDS = tuple(f.name for f in fields(Webhook))


def _changes(old: RuleSet, new: RuleSet) -> list[str]:
    """What a reload changes, in words: rules and webhooks added, removed, changed (and which keys)."""
    out: list[str] = []
    before = {r.name: r for r in old.rules}
    after = {r.name: r for r in new.rules}
    for kind, a, b, names in (("rule", before, after, _RULE_FIELDS),
                              ("webhook", old.webhooks, new.webhooks, _WEBHOOK_FIELDS)):
        added = [n for n in b if n not in a]
        removed = [n for n in a if n not in b]
        changed = [f"{n} ({_differences(a[n], b[n], names)})" for n in b if n in a and a[n] != b[n]]
        if added:
            out.append(f"{kind}(s) added: {', '.join(added)}")
        if removed:
            out.append(f"{kind}(s) removed: {', '.join(removed)}")
        if changed:
            out.append(f"{kind}(s) changed: {', '.join(changed)}")
    for key in ("max_notify_age", "retry_max"):
        if getattr(old, key) != getattr(new, key):
            out.append(f"alerts.{key}: {getattr(old, key):g}s -> {getattr(new, key):g}s")
    for key in ("lateness", "no_data_grace"):
        if getattr(old, key) != getattr(new, key):
            out.append(f"alerts.{key}: {getattr(old, key)!r} -> {getattr(new, key)!r}")
    for key in ("mqtt", "mqtt_prefix"):
        if getattr(old, key) != getattr(new, key):
            out.append(f"alerts.{key}: {getattr(old, key)!r} -> {getattr(new, key)!r}")
    return out


class _View(BaseModel):
    # ignore: `rules list` of this release still reads the answer of a newer service
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class WebhookView(_View):
    name: str
    url: str = Field(description="passwords and secret query parameters masked")


def _unset(v: object) -> bool:
    return v is None


class RateView(_View):
    over: float = Field(description="seconds the change is measured over")
    above: float | None = Field(None, exclude_if=_unset, description="fires above this rate per minute")
    below: float | None = Field(None, exclude_if=_unset, description="fires below this rate per minute")


class WindowView(_View):
    agg: str = Field(description="avg, min, max or count")
    over: float = Field(description="seconds")
    align: str = Field(description="clock or rolling")
    coverage: float = Field(description="the share of the expected readings a window needs to be judged")


class RuleView(_View):
    """A rule as GET /v1/rules shows it. Each kind's parameters appear only on rules of that kind; a
    threshold rule looks as it did before the other kinds (plus ``signal``). The kinds' names are
    plain strings here, so that `rules list` of this release still reads a newer service's kinds."""

    name: str
    metric: str = Field(description='the metric; "" for a no_data rule per device (readings of any metric)')
    signal: str = Field("value", description="the kind: value (a threshold on each reading), rate, window or "
                        "no_data; absent from a service of the release before them: value")
    kind: Literal["above", "below", "outside"]
    threshold: float | tuple[float, float] = Field(description="above, below: the level; outside: [low, high]")
    clear: float | tuple[float, float] = Field(description="the level that ends an episode (the threshold "
                                               "unless the rule sets clear)")
    for_: float = Field(alias="for", description="seconds the condition must hold in event time before firing")
    severity: str
    webhooks: list[WebhookView]
    devices: list[str] = Field(description="globs on device ids; empty: every device")
    where: dict[str, str] = Field(description="device attributes that must equal these")
    labels: dict[str, str]
    summary: str
    no_data: float | None = Field(None, exclude_if=_unset, description="no_data: seconds of silence that fire")
    per: str | None = Field(None, exclude_if=_unset, description="no_data: what is silent, series or device")
    rate: RateView | None = Field(None, exclude_if=_unset, description="rate: the span and the level per minute")
    window: WindowView | None = Field(None, exclude_if=_unset, description="window: the aggregate and its window")


class RuleSetView(_View):
    """GET /v1/rules: the active set."""

    config: str | None = Field(description="the file a reload reads again")
    rules: list[RuleView]
    webhooks: list[WebhookView]
    max_notify_age: float
    retry_max: float


def _parameters(r: Rule) -> dict[str, Any]:
    """The RuleView keys of the rule's kind (none for a threshold on each value)."""
    if r.signal == "no_data":
        return {"no_data": r.threshold, "per": r.per}
    if r.signal == "rate":
        return {"rate": RateView(over=r.over, **{r.kind: r.threshold})}
    if r.signal == "window":
        return {"window": WindowView(agg=r.agg, over=r.over, align=r.align, coverage=r.coverage)}
    return {}


def view_of(active: RuleSet, config: Path | None = None) -> RuleSetView:
    hooks = {name: WebhookView(name=name, url=mask_url(w.url)) for name, w in active.webhooks.items()}
    rules = []
    for r in active.rules:
        threshold: float | tuple[float, float]
        clear: float | tuple[float, float]
        if r.kind == "outside":
            assert r.high is not None
            threshold = (r.threshold, r.high)
            clear = (r.threshold if r.clear is None else r.clear, r.high if r.clear_high is None else r.clear_high)
        else:
            threshold = r.threshold
            clear = r.threshold if r.clear is None else r.clear
        rules.append(RuleView(
            name=r.name, metric=r.metric, signal=r.signal, kind=r.kind, threshold=threshold, clear=clear,
            for_=r.for_seconds, severity=r.severity,
            webhooks=[hooks.get(h) or WebhookView(name=h, url="") for h in r.webhooks],
            devices=list(r.devices), where=dict(r.where), labels=dict(r.labels), summary=r.summary,
            **_parameters(r),
        ))
    return RuleSetView(config=None if config is None else str(config), rules=rules, webhooks=list(hooks.values()),
                       max_notify_age=active.max_notify_age, retry_max=active.retry_max)
