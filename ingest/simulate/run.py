"""The I/O shell of `sensor-ingest simulate`: publish the fleet's messages to a real broker.

paho-mqtt 2.x, MQTT v5, with paho's own network thread (loop_start): this process does nothing
but publish, so there is no event loop to drive paho from (the service's bridge does that).
The main thread paces the messages and owns the display; paho's thread only reports acks.

A message counts as acked only when the broker said so (PUBACK / PUBCOMP with a success code).
Mosquitto answers "no matching subscribers" (0x10) with success too; such messages are counted
separately, because they reached nobody.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.errors import ConfigError, ConfigProblem
from ingest.model import Clock, utc_now
from ingest.settings import mask_url
from ingest.simulate.faults import FaultConfig
from ingest.simulate.fleet import FleetClock, SimMessage, Simulator, build_fleet
from ingest.simulate.gaps import GapSpec, Script, Window
from ingest.simulate.tally import Meta, Tally

__all__ = ["DEFAULT_MQTT_URL", "Broker", "SimulateOptions", "broker_from", "check_gaps", "simulate"]

log = logging.getLogger("ingest.simulate")

DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
URL_ENV = "SENSOR_INGEST_MQTT_URL"
USERNAME_ENV = "SENSOR_INGEST_MQTT_USERNAME"
PASSWORD_ENV = "SENSOR_INGEST_MQTT_PASSWORD"
CONNECT_TIMEOUT = 10.0
DRAIN_TIMEOUT = 5.0  # after stopping: how long to wait for the broker's outstanding acks
MAX_IN_FLIGHT = 10_000  # unanswered messages before publishing pauses (a stalled broker)
CATCH_UP_LIMIT = 1.0  # seconds behind schedule before missed slots are dropped instead of bursting
_NO_SUBSCRIBERS = 0x10


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None = field(default=None, repr=False)
    display: str = ""  # the URL with any password masked


def broker_from(url_option: str | None, username_option: str | None, environ: Mapping[str, str]) -> Broker:
    """The broker to publish to: --mqtt-url, else $SENSOR_INGEST_MQTT_URL, else the default.

    The password comes only from the environment: $SENSOR_INGEST_MQTT_PASSWORD, or a password in
    $SENSOR_INGEST_MQTT_URL. One in --mqtt-url is refused, since command lines are visible to
    every user of the machine (ps) and land in shell history.
    """
    key = "--mqtt-url" if url_option else URL_ENV if environ.get(URL_ENV) else "--mqtt-url (default)"
    url = url_option or environ.get(URL_ENV) or DEFAULT_MQTT_URL
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError("simulate", [ConfigProblem(key, f"not a URL ({exc})", "use mqtt://host:port")]) from exc
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
        raise ConfigError("simulate", [ConfigProblem(
            key, f"{mask_url(url)} is not an MQTT URL", "use mqtt://host:port, or mqtts://host:port for TLS")])
    if parts.password is not None and url_option:
        raise ConfigError("simulate", [ConfigProblem(
            "--mqtt-url", "holds a password, which a command line would show to every user",
            f"remove it from the URL and set {PASSWORD_ENV}")])
    tls = parts.scheme in ("mqtts", "ssl")
    password = environ.get(PASSWORD_ENV) or (unquote(parts.password) if parts.password is not None else None)
    username = username_option or (unquote(parts.username) if parts.username else None) or environ.get(USERNAME_ENV)
    return Broker(parts.hostname, port or (8883 if tls else 1883), tls, username, password, mask_url(url))


@dataclass(frozen=True, slots=True)
class SimulateOptions:
    broker: Broker
    devices: int
    rate: float
    duration: float  # seconds; 0 = until SIGINT/SIGTERM
    seed: int
    prefix: str
    qos: int
    faults: FaultConfig
    start: datetime | None  # fleet clock at the start; None = now
    speed: float
    quiet: bool = False
    json: bool = False
    backfill: Window | None = None  # publish this past window as fast as --rate allows, then exit
    gaps: tuple[GapSpec, ...] = ()
    drop: float = 0.0

    @property
    def scripted(self) -> bool:
        return bool(self.gaps) or self.drop > 0


class _Publisher:
    """paho client + the bookkeeping of which message each mid was."""

    def __init__(self, broker: Broker, tally: Tally) -> None:
        self.tally = tally
        self.connected = threading.Event()
        self.answered = threading.Event()  # the first CONNACK, success or not
        self.connect_result: ReasonCode | None = None
        self.stopping = False
        self._lock = threading.Lock()
        self._pending: dict[int, Meta] = {}
        self._early: dict[int, tuple[bool, str, bool]] = {}  # answered before publish() returned
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sensor-ingest-simulate-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            client.tls_set()
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)  # unbounded here; MAX_IN_FLIGHT bounds it from outside
        client.reconnect_delay_set(1, 10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.connect_result = reason
        self.answered.set()
        if reason.is_failure:
            log.error("the broker refused the connection: %s", reason)
        else:
            self.connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        self.connected.clear()
        if not self.stopping:
            log.warning("lost the broker (%s); reconnecting, unacknowledged messages will be sent again", reason)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        answer = (reason.is_failure, str(reason), reason.value == _NO_SUBSCRIBERS)
        with self._lock:
            meta = self._pending.pop(mid, None)
            if meta is None:
                self._early[mid] = answer
                return
        self._answer(meta, answer)

    def _answer(self, meta: Meta, answer: tuple[bool, str, bool]) -> None:
        failure, reason, nobody = answer
        self.tally.on_answer(meta, failure=failure, reason=reason, no_subscribers=nobody)

    def publish(self, topic: str, payload: bytes, meta: Meta) -> None:
        self.tally.on_published(meta)
        info = self.client.publish(topic, payload, qos=meta.qos)
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = meta
        if early is not None:
            self._answer(meta, early)


def check_gaps(options: SimulateOptions, devices: list[str], origin: datetime) -> Script:
    """The run's script, its gaps resolved from ``origin``; ConfigError naming what to fix."""
    known = set(devices)
    problems = []
    for spec in options.gaps:
        if spec.device not in known:
            problems.append(ConfigProblem("--gap", f"{spec.text!r}: no device {spec.device!r} in this fleet of "
                                          f"{len(devices)} ({', '.join(devices[:4])}, ...)",
                                          "name a device of the fleet, or raise --devices"))
    gaps = []
    for spec in options.gaps:
        try:
            gaps.append(spec.resolve(origin))
        except ValueError as exc:
            problems.append(ConfigProblem("--gap", str(exc), "give FROM before TO"))
    if problems:
        raise ConfigError("simulate", problems)
    return Script(gaps, drop=options.drop, seed=options.seed)


def simulate(options: SimulateOptions, *, clock: Clock = utc_now, out: TextIO | None = None) -> int:
    """Run the fleet until the duration (or the backfill) is over or SIGINT/SIGTERM; print the summary.

    Returns the exit code.
    """
    out = out or sys.stdout
    devices = build_fleet(options.seed, options.devices)
    sim = Simulator(devices, seed=options.seed, prefix=options.prefix, faults=options.faults)
    tally = Tally(devices)
    pub = _Publisher(options.broker, tally)
    uids = [d.uid for d in devices]
    check_gaps(options, uids, options.backfill.start if options.backfill else clock())  # before connecting

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second Ctrl-C: the user does not want to wait for the acks
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            pub.client.connect(options.broker.host, options.broker.port, keepalive=30)
        except OSError as exc:
            print(f"sensor-ingest simulate: cannot reach the broker at {options.broker.display}: {exc}",
                  file=sys.stderr)
            return 1
        pub.client.loop_start()
        try:
            pub.answered.wait(CONNECT_TIMEOUT)
            if not pub.connected.is_set():
                why = pub.connect_result or f"no answer within {CONNECT_TIMEOUT:.0f}s"
                print(f"sensor-ingest simulate: could not connect to {options.broker.display}: {why}",
                      file=sys.stderr)
                return 1
            wall0 = clock()
            if options.backfill is not None:
                script = check_gaps(options, uids, options.backfill.start)
                messages = _backfill(sim, options.backfill, tally)
                loop = _Loop(options, pub, script, stop, options.backfill.start)
                label, shown = "message time", lambda: loop.latest
            else:
                script = check_gaps(options, uids, wall0)  # live gaps count from the first message
                fleet_clock = FleetClock(options.start or wall0, wall0, options.speed)
                messages = _live(sim, fleet_clock, clock)
                loop = _Loop(options, pub, script, stop, wall0)
                label, shown = "fleet clock", lambda: fleet_clock.at(clock())
            if out.isatty() and not options.quiet:
                _publish_with_display(options, loop, messages, sim, (label, shown), out)
            else:
                loop.run(messages)
            elapsed = time.monotonic() - loop.started
            _drain(tally, DRAIN_TIMEOUT)
        finally:
            pub.stopping = True
            pub.client.disconnect()
            pub.client.loop_stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    summary = tally.summary(seed=options.seed, prefix=options.prefix, elapsed=elapsed, silenced=sim.silenced,
                            scripted=options.scripted, backfill=options.backfill)
    if options.json:
        out.write(json.dumps(summary, sort_keys=False) + "\n")
    else:
        from rich.console import Console

        from ingest.simulate.display import print_summary

        print_summary(Console(file=out, width=100 if not out.isatty() else None), summary)
    if summary["unanswered"]:
        log.warning("%d message(s) were not acknowledged by the broker before the end", summary["unanswered"])
        return 1
    return 0


def _live(sim: Simulator, fleet_clock: FleetClock, clock: Clock) -> Iterator[SimMessage]:
    """The live fleet: each message timed by the wall clock when it is taken, valued by the fleet clock."""
    while True:
        wall = clock()
        msg = sim.next_message(wall, fleet_clock.at(wall))
        if msg is None:
            log.warning("every device has gone silent; stopping")
            return
        yield msg


def _backfill(sim: Simulator, window: Window, tally: Tally) -> Iterator[SimMessage]:
    """The window's messages in time order; a silent device's slots are counted, not sent."""
    by_uid = {d.uid: d for d in sim.devices}
    for uid, t in window.slots(sim.seed, list(by_uid)):
        msg = sim.message_at(by_uid[uid], t)
        if msg is None:
            tally.on_skipped(uid, "silent")
            continue
        yield msg


def _publish_with_display(options: SimulateOptions, loop: _Loop, messages: Iterator[SimMessage], sim: Simulator,
                          shown: tuple[str, Callable[[], datetime]], out: TextIO) -> None:
    from rich.console import Console
    from rich.live import Live

    from ingest.simulate.display import progress_renderable

    render = progress_renderable(
        loop.pub.tally, elapsed=lambda: time.monotonic() - loop.started, fleet_time=shown[1],
        rate=options.rate, broker=options.broker.display, silenced=lambda: list(sim.silenced), clock_label=shown[0],
    )
    with Live(get_renderable=render, console=Console(file=out), refresh_per_second=4, transient=True):
        loop.run(messages)


class _Loop:
    """Publishes ``messages`` at ``options.rate`` per second, whole fleet, on a fixed schedule.

    Message k is due at started + k / rate: live, the simulator hands the slots to the devices in turn,
    so each device publishes every devices / rate seconds and the fleet never fires at once. A message
    the script skips (gap, drop) keeps its slot empty when live, so the other devices keep their cadence;
    in a backfill, where the rate is only the pace, it takes no slot.
    """

    def __init__(self, options: SimulateOptions, pub: _Publisher, script: Script, stop: threading.Event,
                 first: datetime) -> None:
        self.options = options
        self.pub = pub
        self.script = script
        self.stop = stop
        self.latest = first  # the own time of the last message taken, for the display
        self.started = time.monotonic()

    def run(self, messages: Iterator[SimMessage]) -> None:
        options, tally, stop = self.options, self.pub.tally, self.stop
        live = options.backfill is None
        interval = 1.0 / options.rate
        self.started = base = time.monotonic()
        k = 0
        while not stop.is_set():
            now = time.monotonic()
            if options.duration and now - self.started >= options.duration:
                return
            due = base + k * interval
            if due > now:
                stop.wait(min(due - now, 0.25))
                continue
            if now - due > CATCH_UP_LIMIT:
                base = now - k * interval  # we fell behind (a slow broker): skip the slots, do not burst
            if tally.in_flight >= MAX_IN_FLIGHT:
                stop.wait(0.05)  # the broker is not answering: wait rather than queue without bound
                continue
            msg = next(messages, None)
            if msg is None:
                return
            assert msg.at is not None
            self.latest = msg.at
            why = self.script.verdict(msg.device, msg.at)
            if why is not None:
                tally.on_skipped(msg.device, why)
                if live:
                    k += 1
                continue
            self.pub.publish(msg.topic, msg.payload, Meta.of(msg, options.qos))
            k += 1


def _drain(tally: Tally, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while tally.in_flight > 0 and time.monotonic() < deadline:
        time.sleep(0.05)

