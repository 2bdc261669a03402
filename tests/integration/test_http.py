"""/healthz and /readyz of the running service (ingest/http.py, readiness in ingest/service.py).

/healthz says the process is alive, whatever its broker and database do. /readyz answers 200 with
every check true, and 503 with the failing check named false: "mqtt" while the broker is stopped,
"database" while the database is unreachable (its port behind a proxy that resets every
connection). Every wait is on a condition; the timeouts only bound a hang.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.integration.harness import IngestProcess, write_config
from tests.proxy import FaultProxy
from tests.services import Mosquitto, wait_until

HANG = 60  # seconds: a bound on a hang only


def _get(ingest: IngestProcess, path: str) -> tuple[int, Any]:
    """(status, JSON body), or (0, None) while the HTTP server does not answer."""
    try:
        response = httpx.get(f"http://{ingest.http}{path}", timeout=2)
    except httpx.HTTPError:
        return 0, None
    return response.status_code, response.json()


def _answers(ingest: IngestProcess, path: str, status: int, body: dict[str, Any]) -> bool:
    return _get(ingest, path) == (status, body)


READY = {"ready": True, "checks": {"mqtt": True, "database": True}}
NO_BROKER = {"ready": False, "checks": {"mqtt": False, "database": True}}
NO_DATABASE = {"ready": False, "checks": {"mqtt": True, "database": False}}
ALIVE = {"status": "ok"}


def test_readyz_names_the_failing_check_and_healthz_stays_alive(
    tmp_path: Path, database_url: str, own_broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy],
) -> None:
    db = urlsplit(database_url)
    assert db.port is not None
    proxy = make_proxy(db.port)
    via_proxy = db._replace(netloc=f"{db.username}@127.0.0.1:{proxy.port}").geturl()
    cfg = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=via_proxy,
                       mqtt_url=own_broker.url, database_extra="connect_timeout = 2\ncommand_timeout = 5")
    ingest = IngestProcess(cfg, tmp_path / "ingest.log")
    try:
        ingest.start()
        assert _get(ingest, "/healthz") == (200, ALIVE)
        assert _get(ingest, "/readyz") == (200, READY)

        # The broker stopped: "mqtt" fails, the database check still holds, the process is alive.
        own_broker.stop()
        wait_until(lambda: _answers(ingest, "/readyz", 503, NO_BROKER), HANG, "/readyz 503 naming mqtt")
        assert _get(ingest, "/healthz") == (200, ALIVE)
        own_broker.start()
        wait_until(lambda: _answers(ingest, "/readyz", 200, READY), HANG, "/readyz 200 with the broker back")

        # The database unreachable: "database" fails, the broker check still holds.
        proxy.mode = "refuse"
        wait_until(lambda: _answers(ingest, "/readyz", 503, NO_DATABASE), HANG, "/readyz 503 naming database")
        assert _get(ingest, "/healthz") == (200, ALIVE)
        proxy.mode = "pass"
        wait_until(lambda: _answers(ingest, "/readyz", 200, READY), HANG, "/readyz 200 with the database back")
        assert ingest.terminate() == 0
    finally:
        ingest.close()
