"""HTTP routes of ``/routers``. Every route needs the admin token; bodies are in protocol.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse

from roma_service.gateway.deps import AdminDep, GatewayDep
from roma_service.gateway.errors import error_responses
from roma_service.gateway.routers.protocol import (
    DeleteResponse,
    DeployResponse,
    HistoryList,
    PromoteBody,
    TrafficBody,
    TrafficChange,
    TrafficHistoryList,
    TrafficInfo,
    VersionInfo,
    VersionList,
)
from roma_service.gateway.routers.serving import RoutersService, TrafficService

router = APIRouter(prefix="/routers", tags=["routers"])

Version = Annotated[int, Path(ge=0, le=2**62, description="router version; 0 = base routers")]

_PATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"patch": {"type": "string", "format": "binary"}},
                    "required": ["patch"],
                }
            },
        },
    }
}


@router.post(
    "",
    response_model=DeployResponse,
    status_code=201,
    openapi_extra=_PATCH_BODY,
    summary="Deploy a router patch (safetensors, raw body or multipart field 'patch')",
    description="Validate, store, apply to every engine, verify, activate. The same bytes "
    "again answer 200 with the version that holds them, activated again if it is not the "
    "active one. `activate=false` only validates and stores (a canary to activate later).",
    responses={
        200: {
            "model": DeployResponse,
            "description": "the same bytes were already stored: that version",
        }
    }
    | error_responses(400, 401, 413, 502, 503),
)
async def deploy(
    request: Request,
    gateway: GatewayDep,
    _: AdminDep,
    activate: Annotated[
        bool, Query(description="false: store the version without activating it")
    ] = True,
) -> JSONResponse:
    result = await RoutersService(gateway).deploy(request, activate)
    return JSONResponse(result.model_dump(mode="json"), 201 if result.created else 200)


@router.get(
    "",
    response_model=VersionList,
    summary="All versions, the active one marked",
    responses=error_responses(401, 503),
)
async def list_versions(gateway: GatewayDep, _: AdminDep) -> VersionList:
    return await RoutersService(gateway).list()


@router.get(
    "/active",
    response_model=VersionInfo,
    summary="The active version",
    responses=error_responses(401, 503),
)
async def active_version(gateway: GatewayDep, _: AdminDep) -> VersionInfo:
    return await RoutersService(gateway).active()


@router.get(
    "/history",
    response_model=HistoryList,
    summary="Activations, oldest first",
    responses=error_responses(400, 401, 503),
)
async def history(
    gateway: GatewayDep, _: AdminDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
) -> HistoryList:
    return await RoutersService(gateway).history(limit)


# --- the canary traffic split. Registered before /{version}, so that "traffic" is never read
# as a version number.
@router.get(
    "/traffic",
    response_model=TrafficInfo,
    summary="The traffic split in force (weights null: all traffic to the active version)",
    responses=error_responses(401, 503),
)
async def get_traffic(gateway: GatewayDep, _: AdminDep) -> TrafficInfo:
    return await TrafficService(gateway).get()


@router.put(
    "/traffic",
    response_model=TrafficChange,
    summary="Split new requests between router versions by weight (a canary)",
    description='Body `{"weights": {"3": 0.9, "4": 0.1}}`. Every engine loads, verifies '
    "and pins each version first; then the split is recorded in Redis and followed by every "
    "gateway. A caller (header `X-Router-Caller`, else the body's `user`) always gets the "
    "same version for the same weights. Nothing changes on any error.",
    responses=error_responses(400, 401, 404, 409, 502, 503),
)
async def put_traffic(body: TrafficBody, gateway: GatewayDep, _: AdminDep) -> TrafficChange:
    return await TrafficService(gateway).put(body.weights, body.reason)


@router.post(
    "/traffic/promote",
    response_model=TrafficChange,
    summary="Make a version of the split the active one and end the split",
    description="`version` may be left out when the split names exactly one version besides "
    "the active one.",
    responses=error_responses(400, 401, 404, 409, 502, 503),
)
async def promote(
    gateway: GatewayDep, _: AdminDep, body: PromoteBody | None = None
) -> TrafficChange:
    return await TrafficService(gateway).promote(body.version if body else None)


@router.post(
    "/traffic/abort",
    response_model=TrafficChange,
    summary="End the split: every new request goes to the active version again",
    responses=error_responses(401, 503),
)
async def abort(gateway: GatewayDep, _: AdminDep) -> TrafficChange:
    return await TrafficService(gateway).abort()


@router.get(
    "/traffic/history",
    response_model=TrafficHistoryList,
    summary="Changes of the split, oldest first",
    responses=error_responses(400, 401, 503),
)
async def traffic_history(
    gateway: GatewayDep, _: AdminDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
) -> TrafficHistoryList:
    return await TrafficService(gateway).history(limit)


@router.get(
    "/{version}",
    response_model=VersionInfo,
    summary="One version",
    responses=error_responses(400, 401, 404, 503),
)
async def get_version(version: Version, gateway: GatewayDep, _: AdminDep) -> VersionInfo:
    return await RoutersService(gateway).get(version)


@router.post(
    "/{version}/activate",
    response_model=DeployResponse,
    summary="Roll back or forward to a stored version (0 = base routers)",
    description="Version 0 can always be activated: with no engine reachable the pointer moves "
    "and returning engines get the base routers before they take traffic.",
    responses=error_responses(400, 401, 404, 502, 503),
)
async def activate(
    version: Version,
    gateway: GatewayDep,
    _: AdminDep,
    evict: Annotated[
        bool,
        Query(
            description="slot mode: requests still running on the previous version move to "
            "this one at once (recomputed under it; their responses carry "
            "X-Router-Version-Changed) instead of finishing on their own version"
        ),
    ] = False,
) -> DeployResponse:
    return await RoutersService(gateway).activate(version, evict)


@router.delete(
    "/{version}",
    response_model=DeleteResponse,
    summary="Delete an inactive version and its patch (409 for the active one)",
    responses=error_responses(400, 401, 404, 409, 503),
)
async def delete(version: Version, gateway: GatewayDep, _: AdminDep) -> DeleteResponse:
    await RoutersService(gateway).delete(version)
    return DeleteResponse(version=version)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
