"""Standard Webhooks signatures (symmetric, ``v1``): what the dispatcher sends and a receiver checks.

The scheme, from the Standard Webhooks specification 1.0.0
(https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md,
"Signature scheme", "Webhook headers" and "Verifying signatures"):

- the signed content is ``{msg_id}.{timestamp}.{payload}``: the exact bytes of the body that is
  sent, so the body is signed as bytes and never re-serialised;
- the signature is HMAC-SHA256 with the key of the ``whsec_<base64>`` secret
  (ingest.alerts.model.decode_secret), base64-encoded and prefixed with its version: ``v1,<base64>``;
- the headers are ``webhook-id`` (the same in every retry of an event: the receiver's idempotency
  key), ``webhook-timestamp`` (integer Unix seconds of the attempt, new at each attempt) and
  ``webhook-signature`` (a space-delimited list of signatures, so that a receiver accepts any of
  several during a key rotation);
- a receiver compares in constant time and refuses a timestamp outside a tolerance of its clock
  (replay protection; five minutes in the reference libraries).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

from ingest.alerts.model import decode_secret
from ingest.errors import IngestError

__all__ = ["TOLERANCE", "SignatureError", "headers", "sign", "verify"]

TOLERANCE = 300.0  # seconds a receiver accepts between webhook-timestamp and its own clock


class SignatureError(IngestError):
    """A delivery that does not verify. ``reason``: missing_header, bad_timestamp, too_old,
    too_new or no_match."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def _check_id(msg_id: str) -> None:
    # The spec: an id must not hold "." (it delimits the signed content), nor be empty.
    if not msg_id or "." in msg_id:
        raise ValueError(f"a webhook-id must be non-empty and hold no '.' ({msg_id!r})")


def _digest(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    return hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 of HMAC-SHA256(secret, f"{msg_id}.{timestamp}." + body)>``."""
    _check_id(msg_id)
    return "v1," + base64.b64encode(_digest(secret, msg_id, int(timestamp), body)).decode("ascii")


def headers(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt: webhook-id, webhook-timestamp, webhook-signature, content-type."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(secret: bytes | str, received: Mapping[str, str], body: bytes, *, tolerance: float = TOLERANCE,
           now: float | None = None) -> str:
    """Check one received delivery; returns its webhook-id, raises SignatureError.

    ``secret``: the key, or the ``whsec_<base64>`` text; ``received``: its headers (any case of
    names: a dict, http.server's message, httpx's or Starlette's headers); ``body``: the raw bytes
    as received, before any JSON parsing.
    """
    key = decode_secret(secret) if isinstance(secret, str) else secret
    lower = {k.lower(): v for k, v in received.items()}
    missing = [h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if not lower.get(h)]
    if missing:
        raise SignatureError("missing_header", f"no {missing[0]} header")
    msg_id, stamp, signatures = lower["webhook-id"], lower["webhook-timestamp"], lower["webhook-signature"]
    if not stamp.isascii() or not stamp.isdigit():
        raise SignatureError("bad_timestamp", f"webhook-timestamp {stamp[:20]!r} is not integer Unix seconds")
    timestamp = int(stamp)
    clock = time.time() if now is None else now
    if timestamp < clock - tolerance:
        raise SignatureError("too_old", f"webhook-timestamp is {clock - timestamp:.0f}s old (tolerance {tolerance:g}s)")
    if timestamp > clock + tolerance:
        raise SignatureError("too_new", f"webhook-timestamp is {timestamp - clock:.0f}s ahead (tolerance "
                             f"{tolerance:g}s)")
    if not msg_id or "." in msg_id:
        raise SignatureError("no_match", "the webhook-id holds '.'")
    expected = _digest(key, msg_id, timestamp, body)
    matched = False
    for entry in signatures.split(" "):
        version, _, value = entry.partition(",")
        if version != "v1":
            continue  # v1a (asymmetric) and future versions: not ours to check
        try:
            candidate = base64.b64decode(value, validate=True)
        except ValueError:
            continue
        # Every v1 entry is compared, in constant time, so the time taken does not say which matched.
        matched |= hmac.compare_digest(candidate, expected)
    if not matched:
        raise SignatureError("no_match", "no v1 signature matches the body with this secret")
    return msg_id
