"""A real webhook receiver for tests and benches: stdlib http.server on 127.0.0.1 in a thread.

``WebhookReceiver()`` picks a free port and keeps it for its whole life, so that it can be taken
down (``down()``: the listening socket is closed, a client gets "connection refused", as from a
receiver that is not running) and brought back (``up()``) at the same URL. Every POST is recorded
before it is answered (``Delivery``: arrival order, monotonic and wall-clock arrival time, path,
headers with lower-case names, the raw body, the status sent). Answers come from ``script`` in
order (``answer(500, 200)``), then ``default``; ``default`` can be changed at any time (e.g. 500
until the test says otherwise).

Signatures are checked twice over: ``Delivery.verify`` with ingest.alerts.sign.verify, and
``signature_matches`` with hashlib/hmac alone, written from the Standard Webhooks specification, so
that a mistake shared by the signer and the project's verifier would still be caught.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.services import free_port

__all__ = ["Delivery", "WebhookReceiver", "signature_matches"]


@dataclass(frozen=True)
class Delivery:
    seq: int  # arrival order, from 1
    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int  # the status the receiver answered

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)

    def verify(self, secret: str) -> str:
        """The webhook-id, checked with ingest.alerts.sign.verify (raises SignatureError)."""
        from ingest.alerts.sign import verify

        return verify(secret, self.headers, self.body)


def signature_matches(secret: str, delivery: Delivery) -> bool:
    """Standard Webhooks v1, independently of ingest.alerts.sign: HMAC-SHA256 with the base64-decoded
    part of "whsec_<base64>" over "{webhook-id}.{webhook-timestamp}.{body}", base64, prefixed "v1,";
    the header may hold several space-separated signatures."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    h = delivery.headers
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + delivery.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, s) for s in h["webhook-signature"].split(" "))


class WebhookReceiver:
    def __init__(self, *, default: int = 200, port: int | None = None) -> None:
        self.port = port or free_port()
        self.default = default
        self.script: list[int] = []
        self._requests: list[Delivery] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, *statuses: int) -> None:
        """Answer the next requests with these statuses, in order, then ``default``."""
        with self._lock:
            self.script.extend(statuses)

    # -- what arrived ---------------------------------------------------------------------------

    def requests(self) -> list[Delivery]:
        with self._lock:
            return list(self._requests)

    def delivered(self) -> list[Delivery]:
        """The requests answered 2xx, in arrival order."""
        return [d for d in self.requests() if d.ok]

    def of(self, webhook_id: str) -> list[Delivery]:
        return [d for d in self.requests() if d.headers.get("webhook-id") == webhook_id]

    # -- up and down ----------------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def up(self) -> WebhookReceiver:
        if self._server is not None:
            return self
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                at, wall = time.monotonic(), time.time()
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    status = receiver.script.pop(0) if receiver.script else receiver.default
                    receiver._requests.append(Delivery(
                        len(receiver._requests) + 1, at, wall, self.path,
                        {k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)  # SO_REUSEADDR: the same port again
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                  name=f"webhook-receiver-{self.port}")
        thread.start()
        self._server, self._thread = server, thread
        return self

    def down(self) -> None:
        """Close the listening socket: new connections are refused until up()."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    def close(self) -> None:
        self.down()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
