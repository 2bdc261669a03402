"""Pure per-message processing: route the topic, decode the payload, validate the readings.

One message becomes one Outcome: the readings to store, and at most one rejection row (the whole
message when it could not be decoded; or a summary of the readings that were skipped). Nothing is
dropped without a trace: a message is stored as readings, as a rejection, or both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo
from fnmatch import fnmatchcase
from typing import Any
from zoneinfo import ZoneInfo

from ingest.catalog import Catalog
from ingest.decoders import decode, get_decoder
from ingest.decoders.base import DecodeContext, Decoder
from ingest.decoders.mapping import SourceMapping
from ingest.errors import DecodeError
from ingest.model import RawMessage, Reading, Rejection
from ingest.routing import Route, Router, compile_template, filter_matches, subscription_ids
from ingest.settings import Settings, SourceSettings
from ingest.validate import MAX_NAME, Limits, escape, validate

__all__ = ["Outcome", "Processor", "SourceRuntime", "summarize"]

MAX_DETAIL = 2000
_NOT_ATTRIBUTES = frozenset({"device", "metric", "#"})


@dataclass(frozen=True, slots=True)
class Outcome:
    message: RawMessage
    source: str | None
    readings: list[Reading]
    rejection: Rejection | None = None
    ignored: int = 0
    problems: list[Rejection] = field(default_factory=list)
    # Topic captures other than device and metric ({district}, {gateway}): attributes of the devices
    # of this message's readings, stored on their device rows.
    attributes: dict[str, str] | None = None
    # Why a message that carries no readings by design was acknowledged without a row (see Decoded).
    skipped: str | None = None
    unbound: int = 0  # readings of metrics the catalog binds to no quantity (stored as they came)

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.message.topic,
            "source": self.source,
            "readings": [
                {"device": r.device, "metric": r.metric, "time": r.time.isoformat(), "value": r.value,
                 "unit": r.unit, "flags": r.flags}
                for r in self.readings
            ],
            "rejection": None if self.rejection is None else
            {"reason": self.rejection.reason, "detail": self.rejection.detail},
            "ignored": self.ignored,
            **({"attributes": self.attributes} if self.attributes else {}),
            **({"skipped": self.skipped} if self.skipped else {}),
        }

    @property
    def rejections(self) -> list[Rejection]:
        return [] if self.rejection is None else [self.rejection]


@dataclass(frozen=True, slots=True)
class SourceRuntime:
    """A configured source, compiled: its route, decoder, zone, format options and mapping."""

    settings: SourceSettings
    route: Route
    decoder: Decoder
    timezone: tzinfo | None
    options: dict[str, Any] = field(default_factory=dict)
    mapping: SourceMapping = field(default_factory=SourceMapping)
    # `decode` without a config: the device of a message that names none when the template has no
    # {device}; "" stands for the whole topic, or its second level when the first is one of
    # ``fallback_prefixes`` (tele/<device>/..., shellies/<device>/...).
    fallback_device: str | None = None
    fallback_prefixes: frozenset[str] = frozenset()
    catch_all: bool = False  # the `decode` fallback: takes what no other source matches

    @classmethod
    def of(cls, s: SourceSettings) -> SourceRuntime:
        return cls(s, compile_template(s.topic, s.name, s.exclude), get_decoder(s.format),
                   ZoneInfo(s.timezone) if s.timezone else None, s.format_options(), s.mapping())


def summarize(problems: list[Rejection]) -> Rejection:
    """One rejection row for the parts of a message that were not stored."""
    first = problems[0]
    detail = "; ".join(p.detail for p in problems)
    if len(problems) > 1:
        detail = f"{len(problems)} readings skipped: {detail}"
    if len(detail) > MAX_DETAIL:
        detail = detail[: MAX_DETAIL - 3] + "..."
    return Rejection(first.reason, detail, first.device)


def _allowed(readings: list[Reading], patterns: list[str], source: str) -> tuple[list[Reading], list[Rejection]]:
    """Readings of devices this source may write (allow_devices globs, on the id as the payload
    names it), and one problem per other device."""
    verdict: dict[str, bool] = {}
    kept: list[Reading] = []
    refused: dict[str, int] = {}
    for r in readings:
        ok = verdict.get(r.device)
        if ok is None:
            ok = verdict[r.device] = any(fnmatchcase(r.device, p) for p in patterns)
        if ok:
            kept.append(r)
        else:
            refused[r.device] = refused.get(r.device, 0) + 1
    problems = [
        Rejection("bad_device", f"device id {d[:64]!r} is not in allow_devices of source {source!r} "
                  f"({n} reading(s) not stored)", escape(d[:MAX_NAME]))
        for d, n in refused.items()
    ]
    return kept, problems


def _unused(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... when a configured source already has it."""
    n = 1
    candidate = name
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _fallback_device(topic: str, prefixes: frozenset[str]) -> str:
    """The device of a topic no source matches: the level after a known first level, else the topic."""
    first, _, rest = topic.partition("/")
    if first in prefixes and rest:
        return rest.partition("/")[0] or topic
    return topic


class Processor:
    """Everything that turns a RawMessage into an Outcome, compiled once from the settings."""

    def __init__(self, sources: list[SourceRuntime], limits: Limits, max_message_bytes: int, *,
                 max_readings: int = 2000, max_depth: int = 32, max_lines: int = 2000,
                 catalog: Catalog | None = None) -> None:
        """``catalog``: binds, converts and range-checks the valid readings (None: stored as decoded)."""
        self.sources = {s.settings.name: s for s in sources}
        self.router = Router([s.route for s in sources])
        # Each source's subscription identifier (0: its filter has none), as ingest.mqtt subscribes.
        filters = self.router.filters
        self.subscription_ids = subscription_ids(filters)
        self._subscription = {s.settings.name: self.subscription_ids[filters.index(s.route.filter)]
                              for s in sources}
        self._filter_of = {sid: f for f, sid in zip(filters, self.subscription_ids, strict=True) if sid}
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.max_readings = max_readings
        self.max_depth = max_depth
        self.max_lines = max_lines
        self.catalog = catalog

    @classmethod
    def from_settings(cls, settings: Settings, *, override_format: str | None = None,
                      source: str | None = None, template: str | None = None,
                      device: str | None = None, fallback: bool = False) -> Processor:
        """The configured sources, then the presets.

        ``override_format``: every source decodes with that format, and an ad-hoc source of that format
        on ``template`` (default "#", after the sources; a template replaces them) takes the rest, whose
        device is ``device``, else the whole topic, when neither the template nor the payload names one
        (`sensor-ingest decode --format`). ``fallback``: after every source, an ad-hoc
        ``auto`` source on "#" takes what no source matches (`sensor-ingest decode` with no flag)."""
        runtimes = []
        for s in settings.all_sources() if template is None or override_format is None else []:
            if source is not None and s.name != source:
                continue
            if override_format is not None:
                # The source's own options belong to its own format.
                options = s.options if s.format == override_format else {}
                s = s.model_copy(update={"format": override_format, "options": options})
            runtimes.append(SourceRuntime.of(s))
        taken = {r.settings.name for r in runtimes}
        if override_format is not None and (source is None or not runtimes):
            # Last: takes the topics no source matches (with --template: the only source).
            ad_hoc = SourceRuntime.of(SourceSettings(name=_unused("adhoc", taken), topic=template or "#",
                                                     format=override_format))
            runtimes.append(replace(ad_hoc, fallback_device=device or ""))
        elif fallback and override_format is None and source is None:
            known = frozenset(r.route.levels[0] for r in runtimes if r.route.levels and r.route.levels[0])
            auto = SourceRuntime.of(SourceSettings(name=_unused("auto", taken), topic="#", format="auto"))
            runtimes.append(replace(auto, fallback_device="", fallback_prefixes=known, catch_all=True))
        earliest = datetime.fromisoformat(settings.ingest.earliest_time)
        if earliest.tzinfo is None:
            earliest = earliest.replace(tzinfo=UTC)
        ing = settings.ingest
        limits = Limits(earliest, timedelta(seconds=ing.max_future), ing.max_metric_name_length)
        return cls(runtimes, limits, ing.max_message_bytes, max_readings=ing.max_readings_per_message,
                   max_depth=ing.max_json_depth, max_lines=ing.max_lines_per_message,
                   catalog=settings.build_catalog())

    @property
    def filters(self) -> list[str]:
        return self.router.filters

    def _overlap_copy(self, msg: RawMessage, route: Route) -> bool:
        """Whether ``msg`` is the copy sent for another current filter than ``route``'s: its
        identifiers do not name the route's filter, and one names a filter that matches the topic (an
        identifier that no current filter has is of a subscription gone since the message was queued:
        the message is read)."""
        if self._subscription[route.source] in msg.subscriptions:
            return False
        for sid in msg.subscriptions:
            other = self._filter_of.get(sid)
            if other is not None and other != route.filter and filter_matches(other, msg.topic):
                return True
        return False

    def process(self, msg: RawMessage) -> Outcome:
        size = len(msg.payload)
        if size > self.max_message_bytes:
            # Keep the first bytes for diagnosis; the whole payload could be anything.
            head = msg.payload[: self.max_message_bytes]
            short = RawMessage(msg.topic, head, msg.received_at, msg.qos, msg.mid, msg.epoch, msg.seq, msg.redelivered)
            return Outcome(short, None, [], Rejection(
                "too_large", f"payload of {size} bytes exceeds ingest.max_message_bytes = "
                f"{self.max_message_bytes}; the first {self.max_message_bytes} bytes are kept here"))
        found = self.router.route(msg.topic)
        if found is None or self.sources[found[0].source].catch_all:
            # Brought in by a source's filter but excluded by it (Zigbee2MQTT's bridge/, Homie's
            # $-attributes): not a carrier of readings, counted by reason like a LoRaWAN join.
            excluded = self.router.excluded(msg.topic)
            if excluded is not None:
                copy = bool(msg.subscriptions) and self._overlap_copy(msg, self.sources[excluded].route)
                return Outcome(msg, excluded, [], None, skipped="overlap_copy" if copy else "excluded")
        if found is None:
            return Outcome(msg, None, [], Rejection("no_source", f"no source's topic template matches {msg.topic!r}"))
        route, captures = found
        if msg.subscriptions and self._overlap_copy(msg, route):
            # The copy the broker sent for another filter that also matches this topic: the copy
            # sent for this source's own filter is the one that is read (each is acknowledged).
            return Outcome(msg, route.source, [], None, skipped="overlap_copy")
        src = self.sources[route.source]
        prefix = src.settings.device_prefix
        device = captures.get("device")
        fallback = None
        if device is None and src.fallback_device is not None:
            fallback = src.fallback_device or _fallback_device(msg.topic, src.fallback_prefixes)
            if src.settings.format == "value":  # takes its device from the topic only
                device, fallback = fallback, None
                captures = {**captures, "device": device}
        ctx = DecodeContext(
            topic=msg.topic, received_at=msg.received_at, device=device, captures=captures, fallback_device=fallback,
            device_level=route.device_level,
            timezone=src.timezone, options=src.options, mapping=src.mapping, max_depth=self.max_depth,
            max_readings=self.max_readings, max_lines=self.max_lines,
        )
        try:
            decoded = decode(src.decoder, msg.payload, ctx)
        except DecodeError as exc:
            who = (prefix + device) if device else None
            return Outcome(msg, route.source, [], Rejection(exc.reason, exc.detail, who))
        except Exception as exc:
            # A decoder bug must not become a poison message: raised here it would stop the service,
            # leave the message unacknowledged, and stop it again on every redelivery.
            who = (prefix + device) if device else None
            detail = f"the {src.settings.format} decoder failed ({type(exc).__name__}: {exc}); report this payload"
            return Outcome(msg, route.source, [], Rejection("decoder_error", detail[:MAX_DETAIL], who))
        readings = decoded.readings
        found_readings = len(readings) + len(decoded.problems)
        if found_readings > self.max_readings:
            who = (prefix + device) if device else None
            return Outcome(msg, route.source, [], Rejection(
                "too_many_readings", f"the message holds {found_readings} readings (limit "
                f"ingest.max_readings_per_message = {self.max_readings}); none of them is stored", who))
        problems_before: list[Rejection] = list(decoded.problems)
        allowed = src.settings.allow_devices
        if allowed is not None:
            readings, refused = _allowed(readings, allowed, src.settings.name)
            problems_before += refused
        if prefix:
            readings = [
                Reading(prefix + r.device, r.metric, r.time, r.value, r.unit, r.flags) for r in readings
            ]
        kept, problems = validate(readings, msg.received_at, self.limits, src.settings.time_policy)
        problems = problems_before + problems
        unbound = 0
        if self.catalog is not None and kept:
            kept, more, unbound = self.catalog.check(kept)
            if more:
                problems += more
        attributes = {k: v for k, v in captures.items() if k not in _NOT_ATTRIBUTES} if route.attributes else None
        if not kept and not problems:
            skipped = decoded.skipped or ("only_ignored" if decoded.ignored else None)
            if skipped is not None:
                # By design not a carrier of readings (a join event; leaves the mapping or the format
                # says are not readings): counted by reason, not a rejection row per message.
                return Outcome(msg, route.source, [], None, decoded.ignored, skipped=skipped)
            problems = [Rejection("empty", "the payload holds no readings", device)]
        return Outcome(msg, route.source, kept, summarize(problems) if problems else None, decoded.ignored, problems,
                       attributes if kept else None, unbound=unbound)
