"""The HTTP side of the service: /healthz, /readyz and /metrics (no token needed for these); with
alert rules, GET /v1/rules (the active set, webhook secrets never shown) and POST /-/reload (read
the config file again: the set is replaced only if every rule and webhook is valid).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest import __version__
from ingest.alerts.runtime import AlertRuntime, RuleSetView
from ingest.metrics import Metrics

__all__ = ["create_app"]


def create_app(metrics: Metrics, readiness: Callable[[], dict[str, bool]],
               alerts: AlertRuntime | None = None) -> FastAPI:
    app = FastAPI(title="sensor-ingest", version=__version__)
    if alerts is not None:
        _alert_routes(app, alerts)

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


def _alert_routes(app: FastAPI, alerts: AlertRuntime) -> None:
    @app.get("/v1/rules", response_model=RuleSetView, response_model_by_alias=True,
             summary="the active alert rules and webhooks (webhooks by name and URL, never their secret)")
    async def rules() -> RuleSetView:
        return alerts.view()

    # async: the reload runs on the event loop, like the SIGHUP handler, so two never interleave and the
    # on_change callbacks run where the writer and the dispatcher do.
    @app.post("/-/reload", summary="read the config file again; 200: rules replaced, 422: problems, old set kept")
    async def reload() -> JSONResponse:
        ok, message = alerts.reload()
        return JSONResponse({"reloaded": ok, "message": message}, status_code=200 if ok else 422)
