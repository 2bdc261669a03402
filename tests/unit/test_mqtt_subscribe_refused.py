"""A SUBACK that refuses a filter (reason code 0x80 or above), against a scripted broker peer.

Mosquitto refuses a subscription only through its ACL, and then on every connection alike. The
scripted peer (tests/mqtt_script.py) answers one filter of two with 0x87 (Not authorized) for as long
as the test keeps it in ``suback_codes``, and grants it once the test takes it out. The bridge is the
real MqttBridge. Its backoff is observed through the delays it asks ``_sleep`` for (recorded, then
slept as asked), so no assertion depends on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import pytest

from ingest.model import RawMessage
from ingest.mqtt import MqttBridge
from ingest.settings import MqttSettings
from tests.mqtt_script import ScriptedBroker
from tests.services import until as _until

GRANTED, DENIED = "edge/ok/#", "edge/denied/#"
NOT_AUTHORIZED = 0x87
RECONNECT_MIN = 0.1




def _bridge(broker: ScriptedBroker, backoffs: list[float]) -> MqttBridge:
    settings = MqttSettings(url=broker.url, client_id="refused-" + uuid.uuid4().hex[:8], receive_maximum=10,
                            keepalive=30, reconnect_min=RECONNECT_MIN, reconnect_max=0.5, connect_timeout=10)
    received: list[RawMessage] = []
    bridge = MqttBridge(settings, [GRANTED, DENIED], received.append)
    sleep = bridge._sleep

    async def recorded(seconds: float) -> None:
        backoffs.append(seconds)
        await sleep(seconds)

    bridge._sleep = recorded  # type: ignore[method-assign]
    return bridge


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ingest.mqtt" and r.levelno == logging.WARNING and "refused subscriptions" in r.getMessage()]


def _assert_reported_and_backed_off(broker: ScriptedBroker, backoffs: list[float], warnings: list[str]) -> None:
    assert broker.subacks
    assert all(codes == [1, NOT_AUTHORIZED] for codes in broker.subacks)
    assert warnings, "no warning about the refused subscription"
    for text in warnings:
        # The refused filter and its reason code, and not the filter that was granted.
        assert f"refused subscriptions: {DENIED} (Not authorized)" in text, text
        assert GRANTED not in text, text
    assert backoffs[0] >= 0.8 * RECONNECT_MIN, backoffs  # never an immediate retry
    assert backoffs[1] > backoffs[0], backoffs  # the second waits longer: backoff, not a fixed beat
    assert broker.problems == []


@pytest.mark.asyncio
async def test_a_refused_filter_keeps_a_new_session_unready_and_is_retried_until_granted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ingest.mqtt")
    backoffs: list[float] = []
    async with ScriptedBroker(suback_codes={DENIED: NOT_AUTHORIZED}) as broker:
        bridge = _bridge(broker, backoffs)
        run = asyncio.create_task(bridge.run())
        await asyncio.sleep(0)  # run() makes its ready event in its first step
        # Done as soon as the bridge is ever ready, even for a moment: asyncio.Event wakes every waiter.
        ready = asyncio.create_task(bridge.wait_ready())
        try:
            await _until(lambda: ready.done() or (broker.connections >= 3 and len(backoffs) >= 2),
                         "the bridge did not connect again (three times) after the refusals")
            assert not ready.done(), "the bridge became ready while the broker refused one of its filters"
            assert not bridge.connected
            _assert_reported_and_backed_off(broker, backoffs, _refusals(caplog))

            del broker.suback_codes[DENIED]  # the broker's ACL is fixed: the next SUBACK grants both
            await asyncio.wait_for(ready, 10)
            assert bridge.connected
            assert broker.subacks[-1] == [1, 1]
            assert f"MQTT subscribed to {GRANTED}, {DENIED}" in caplog.text
        finally:
            await bridge.stop()
            await asyncio.wait_for(run, 10)
            ready.cancel()


@pytest.mark.asyncio
async def test_a_refused_filter_of_a_resumed_session_disconnects_and_is_retried_until_granted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A resumed session does not wait for its SUBACK (the broker may send the session's messages
    ahead of it, and reading stops at a full window), so it is ready from its CONNACK on. A refusal
    that comes later ends that connection; each is logged, and the retries back off as well."""
    caplog.set_level(logging.INFO, logger="ingest.mqtt")
    backoffs: list[float] = []
    async with ScriptedBroker(session_present=True, suback_codes={DENIED: NOT_AUTHORIZED}) as broker:
        bridge = _bridge(broker, backoffs)
        run = asyncio.create_task(bridge.run())
        try:
            await _until(lambda: broker.connections >= 3 and len(backoffs) >= 2 and len(_refusals(caplog)) >= 2,
                         "the bridge did not connect again (three times) after the refusals")
            _assert_reported_and_backed_off(broker, backoffs, _refusals(caplog))

            del broker.suback_codes[DENIED]
            await _until(lambda: broker.subacks[-1] == [1, 1] and bridge.connected
                         and "MQTT subscribed to" in caplog.text, "the bridge did not settle once granted")
            assert bridge.connected
        finally:
            await bridge.stop()
            await asyncio.wait_for(run, 10)


@pytest.mark.asyncio
async def test_with_overlapping_filters_each_suback_is_checked_and_a_refusal_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Overlapping filters go in several SUBSCRIBEs (one per subscription identifier): the bridge waits
    for every SUBACK, and one refusing its filter keeps it unready, reported, and retried."""
    caplog.set_level(logging.INFO, logger="ingest.mqtt")
    overlapping = "edge/+/denied"  # overlaps edge/ok/# at edge/ok/denied: subscribed with an identifier
    async with ScriptedBroker(suback_codes={overlapping: NOT_AUTHORIZED}) as broker:
        settings = MqttSettings(url=broker.url, client_id="refused-" + uuid.uuid4().hex[:8], receive_maximum=10,
                                keepalive=30, reconnect_min=RECONNECT_MIN, reconnect_max=0.5, connect_timeout=10)
        bridge = MqttBridge(settings, [GRANTED, overlapping], lambda m: None)
        assert all(bridge.identifiers)  # both overlap: each in its own SUBSCRIBE
        run = asyncio.create_task(bridge.run())
        await asyncio.sleep(0)
        ready = asyncio.create_task(bridge.wait_ready())
        try:
            await _until(lambda: ready.done() or broker.connections >= 2, "the bridge did not retry")
            assert not ready.done()
            # One SUBACK per SUBSCRIBE: the granted filter's, and the identified one's refusal.
            assert [1] in broker.subacks
            assert [NOT_AUTHORIZED] in broker.subacks
            assert any(f"refused subscriptions: {overlapping} (Not authorized)" in text and GRANTED not in text
                       for text in _refusals(caplog))
            broker.suback_codes.clear()
            await _until(ready.done, "the bridge did not become ready once the filter was granted")
            assert bridge.connected
        finally:
            await bridge.stop()
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run
