"""Standard Webhooks signing (ingest.alerts.sign): the spec's reference vector and verification."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from ingest.alerts.model import decode_secret
from ingest.alerts.sign import SignatureError, headers, sign, verify

# The reference vector of the Standard Webhooks libraries' test suites, e.g. test_sign_function in
# https://github.com/standard-webhooks/standard-webhooks/blob/main/libraries/python/tests/test_webhooks.py
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

KEY = bytes(range(32))
NOW = 1_780_000_000


def test_the_spec_vector() -> None:
    key = decode_secret(VECTOR_SECRET)
    assert sign(key, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE
    received = {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TIMESTAMP),
                "webhook-signature": VECTOR_SIGNATURE}
    assert verify(VECTOR_SECRET, received, VECTOR_BODY, now=VECTOR_TIMESTAMP + 10) == VECTOR_ID
    # The same body re-serialised without the space is other bytes: it must not verify.
    with pytest.raises(SignatureError) as caught:
        verify(VECTOR_SECRET, received, b'{"test":2432232314}', now=VECTOR_TIMESTAMP)
    assert caught.value.reason == "no_match"


def test_sign_is_hmac_sha256_over_id_timestamp_body() -> None:
    body = '{"status":"firing","value":61.5,"device":"hn-aq-é"}'.encode()
    digest = hmac.new(KEY, b"msg_42.1780000000." + body, hashlib.sha256).digest()
    assert sign(KEY, "msg_42", NOW, body) == "v1," + base64.b64encode(digest).decode()


def test_headers_of_an_attempt() -> None:
    h = headers(KEY, "msg_7", NOW, b"{}")
    assert h == {
        "webhook-id": "msg_7",
        "webhook-timestamp": "1780000000",
        "webhook-signature": sign(KEY, "msg_7", NOW, b"{}"),
        "content-type": "application/json",
    }
    assert verify(KEY, h, b"{}", now=NOW) == "msg_7"


def test_an_id_with_a_dot_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no '\.'"):
        sign(KEY, "msg.1", NOW, b"{}")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"body": b'{"a":2}'}, "no_match"),
        ({"key": bytes(32)}, "no_match"),
        ({"webhook-id": "msg_2"}, "no_match"),
        ({"webhook-timestamp": str(NOW + 1)}, "no_match"),
        ({"now": NOW + 301}, "too_old"),
        ({"now": NOW - 301}, "too_new"),
        ({"webhook-timestamp": "17e8"}, "bad_timestamp"),
        ({"webhook-timestamp": "-1"}, "bad_timestamp"),
        ({"webhook-signature": ""}, "missing_header"),
        ({"webhook-signature": "v1a,AAAA v2," + sign(KEY, "msg_1", NOW, b'{"a":1}')[3:]}, "no_match"),
        ({"webhook-signature": "v1,not base64!"}, "no_match"),
    ],
)
def test_what_does_not_verify(change: dict[str, object], reason: str) -> None:
    body = b'{"a":1}'
    received = headers(KEY, "msg_1", NOW, body)
    key, now = KEY, NOW
    for name, value in change.items():
        if name == "body":
            body = value  # type: ignore[assignment]
        elif name == "key":
            key = value  # type: ignore[assignment]
        elif name == "now":
            now = value  # type: ignore[assignment]
        else:
            received[name] = value  # type: ignore[assignment]
    with pytest.raises(SignatureError) as caught:
        verify(key, received, body, now=now)
    assert caught.value.reason == reason


def test_tolerance_bounds_are_inclusive() -> None:
    body = b"{}"
    received = headers(KEY, "msg_1", NOW, body)
    assert verify(KEY, received, body, now=NOW + 300) == "msg_1"
    assert verify(KEY, received, body, now=NOW - 300) == "msg_1"
    assert verify(KEY, received, body, now=NOW + 30, tolerance=30) == "msg_1"
    with pytest.raises(SignatureError):
        verify(KEY, received, body, now=NOW + 31, tolerance=30)


def test_missing_headers_and_any_case_of_names() -> None:
    body = b"{}"
    received = headers(KEY, "msg_1", NOW, body)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        partial = {k: v for k, v in received.items() if k != name}
        with pytest.raises(SignatureError, match=name) as caught:
            verify(KEY, partial, body, now=NOW)
        assert caught.value.reason == "missing_header"
    upper = {k.title(): v for k, v in received.items()}
    assert verify(KEY, upper, body, now=NOW) == "msg_1"


def test_one_matching_signature_among_several_is_enough() -> None:
    body = b'{"x":1}'
    good = sign(KEY, "msg_9", NOW, body)
    old_key = sign(bytes(32), "msg_9", NOW, body)
    received = {"webhook-id": "msg_9", "webhook-timestamp": str(NOW),
                "webhook-signature": f"v1a,c2lnbmF0dXJl {old_key} {good}"}
    assert verify(KEY, received, body, now=NOW) == "msg_9"
    received["webhook-signature"] = f"v1a,c2lnbmF0dXJl {old_key}"
    with pytest.raises(SignatureError):
        verify(KEY, received, body, now=NOW)
