"""The HTTP side of the service: /healthz, /readyz and /metrics (no token needed for these)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest import __version__
from ingest.metrics import Metrics

__all__ = ["create_app"]


def create_app(metrics: Metrics, readiness: Callable[[], dict[str, bool]]) -> FastAPI:
    app = FastAPI(title="sensor-ingest", version=__version__)

    @app.get("/healthz", summary="the process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="connected to the broker (subscribed) and the database")
    async def readyz() -> JSONResponse:
        checks = readiness()
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
