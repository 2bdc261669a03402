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
from collections.abc import Mapping
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
from ingest.simulate.fleet import FleetClock, Simulator, build_fleet
from ingest.simulate.tally import Meta, Tally

__all__ = ["DEFAULT_MQTT_URL", "Broker", "SimulateOptions", "broker_from", "simulate"]

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


def simulate(options: SimulateOptions, *, clock: Clock = utc_now, out: TextIO | None = None) -> int:
    """Run the fleet until the duration is over or SIGINT/SIGTERM; print the summary. Exit code."""
    out = out or sys.stdout
    devices = build_fleet(options.seed, options.devices)
    sim = Simulator(devices, seed=options.seed, prefix=options.prefix, faults=options.faults)
    tally = Tally(devices)
    pub = _Publisher(options.broker, tally)

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
            fleet_clock = FleetClock(options.start or wall0, wall0, options.speed)
            started = time.monotonic()
            show = out.isatty() and not options.quiet
            if show:
                _publish_with_display(options, sim, pub, fleet_clock, clock, stop, started, out)
            else:
                _publish_loop(options, sim, pub, fleet_clock, clock, stop, started)
            elapsed = time.monotonic() - started
            _drain(tally, DRAIN_TIMEOUT)
        finally:
            pub.stopping = True
            pub.client.disconnect()
            pub.client.loop_stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    summary = tally.summary(seed=options.seed, prefix=options.prefix, elapsed=elapsed, silenced=sim.silenced)
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


def _publish_with_display(options: SimulateOptions, sim: Simulator, pub: _Publisher, fleet_clock: FleetClock,
                          clock: Clock, stop: threading.Event, started: float, out: TextIO) -> None:
    from rich.console import Console
    from rich.live import Live

    from ingest.simulate.display import progress_renderable

    render = progress_renderable(
        pub.tally, elapsed=lambda: time.monotonic() - started, fleet_time=lambda: fleet_clock.at(clock()),
        rate=options.rate, broker=options.broker.display, silenced=lambda: list(sim.silenced),
    )
    with Live(get_renderable=render, console=Console(file=out), refresh_per_second=4, transient=True):
        _publish_loop(options, sim, pub, fleet_clock, clock, stop, started)


def _publish_loop(options: SimulateOptions, sim: Simulator, pub: _Publisher, fleet_clock: FleetClock,
                  clock: Clock, stop: threading.Event, started: float) -> None:
    """Publish at ``options.rate`` messages per second, whole fleet, on a fixed schedule.

    Message k is due at started + k / rate: the simulator hands the slots to the devices in turn,
    so each device publishes every devices / rate seconds, and the fleet never fires at once.
    """
    interval = 1.0 / options.rate
    base = started
    k = 0
    while not stop.is_set():
        now = time.monotonic()
        if options.duration and now - started >= options.duration:
            return
        due = base + k * interval
        if due > now:
            stop.wait(min(due - now, 0.25))
            continue
        if now - due > CATCH_UP_LIMIT:
            base = now - k * interval  # we fell behind (a slow broker): skip the slots, do not burst
        if pub.tally.in_flight >= MAX_IN_FLIGHT:
            stop.wait(0.05)  # the broker is not answering: wait rather than queue without bound
            continue
        wall = clock()
        msg = sim.next_message(wall, fleet_clock.at(wall))
        if msg is None:
            log.warning("every device has gone silent; stopping")
            return
        pub.publish(msg.topic, msg.payload, Meta.of(msg, options.qos))
        k += 1


def _drain(tally: Tally, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while tally.in_flight > 0 and time.monotonic() < deadline:
        time.sleep(0.05)

