"""Liveness, readiness and Prometheus metrics (no token: probes and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import Response

from roma_service.gateway.deps import GatewayDep
from roma_service.gateway.errors import ErrorDetail, error_body

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str = "ok"


class Ready(BaseModel):
    ready: bool
    active_version: int | None
    swap_policy: str
    engines: list[dict[str, object]]


class NotReady(Ready):
    """The same body plus the error saying why (OpenAI's shape)."""

    error: ErrorDetail


@router.get("/health", response_model=Health, summary="The gateway process is alive")
async def health() -> Health:
    return Health()


@router.get(
    "/ready",
    response_model=Ready,
    summary="Engines up and holding the active router version",
    responses={503: {"model": NotReady, "description": "not ready; the error says why"}},
)
async def ready(gateway: GatewayDep) -> JSONResponse:
    pool = gateway.pool
    body = Ready(
        ready=gateway.sync.started.is_set() and pool.ready(),
        active_version=pool.active,
        swap_policy=gateway.settings.swap_policy,
        engines=pool.describe(),
    ).model_dump()
    if body["ready"]:
        return JSONResponse(body)
    reason = gateway.sync.problem or pool.why_not_ready()
    return JSONResponse({**error_body(503, reason, "not_ready", None), **body}, 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(gateway: GatewayDep) -> Response:
    return Response(gateway.metrics.render(), media_type=gateway.metrics.content_type)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
