"""The service's own endpoints: the model in service, metrics, the OpenAPI document, and the probes."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from service import metrics, openapi
from service.errors import PROBLEM_MEDIA_TYPE, RETRY_AFTER_SECONDS, StoreUnavailable
from service.routes.bodies import json_response
from service.schemas import encoder


async def get_model(request: Request) -> Response:
    """The champion this worker serves: its metadata as training wrote it."""
    return json_response(request.app.state.models.current.champion.metadata_json)


async def get_metrics(request: Request) -> Response:
    request.app.state.store.observe_pool()
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


async def get_openapi(request: Request) -> Response:
    return json_response(openapi.DOCUMENT_JSON)


async def live(request: Request) -> Response:
    return json_response(b'{"status":"ok"}')


async def ready(request: Request) -> Response:
    state = request.app.state
    models = getattr(state, "models", None)
    checks = {"model": "ok" if models is not None and models.current is not None else "missing"}
    try:
        await asyncio.wait_for(state.store.ping(), state.settings.database_request_timeout)
        checks["database"] = "ok"
    except (StoreUnavailable, TimeoutError):
        checks["database"] = "unavailable"
    # The cache is best-effort: reported, never a reason to take the pod out.
    checks["cache"] = "ok" if await state.cache.ping() else "unavailable"
    if state.shutting_down:
        checks["shutdown"] = "in progress"
    failing = [name for name in ("model", "database") if checks[name] != "ok"]
    if state.shutting_down:
        failing.append("shutdown")
    if not failing:
        return json_response(encoder.encode({"status": "ready", "checks": checks}))
    problem = {
        "type": "https://credit-scoring.example/problems/not-ready",
        "title": "Not ready",
        "status": 503,
        "detail": f"Not ready: {', '.join(failing)}.",
        "checks": checks,
    }
    return Response(
        encoder.encode(problem),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        media_type=PROBLEM_MEDIA_TYPE,
    )
