"""HTTP routes of ``/routers``. Every route needs the admin token; bodies are in protocol.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse

from roma_service.gateway.deps import AdminDep, GatewayDep
from roma_service.gateway.routers.protocol import (
    DeleteResponse,
    DeployResponse,
    HistoryList,
    VersionInfo,
    VersionList,
)
from roma_service.gateway.routers.serving import RoutersService

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
    responses={200: {"description": "the same bytes were already stored: that version"}},
)
async def deploy(request: Request, gateway: GatewayDep, _: AdminDep) -> JSONResponse:
    result = await RoutersService(gateway).deploy(request)
    return JSONResponse(result.model_dump(mode="json"), 201 if result.created else 200)


@router.get("", response_model=VersionList, summary="All versions, the active one marked")
async def list_versions(gateway: GatewayDep, _: AdminDep) -> VersionList:
    return await RoutersService(gateway).list()


@router.get("/active", response_model=VersionInfo, summary="The active version")
async def active_version(gateway: GatewayDep, _: AdminDep) -> VersionInfo:
    return await RoutersService(gateway).active()


@router.get("/history", response_model=HistoryList, summary="Activations, oldest first")
async def history(
    gateway: GatewayDep, _: AdminDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
) -> HistoryList:
    return await RoutersService(gateway).history(limit)


@router.get("/{version}", response_model=VersionInfo, summary="One version")
async def get_version(version: Version, gateway: GatewayDep, _: AdminDep) -> VersionInfo:
    return await RoutersService(gateway).get(version)


@router.post(
    "/{version}/activate",
    response_model=DeployResponse,
    summary="Roll back or forward to a stored version (0 = base routers)",
)
async def activate(version: Version, gateway: GatewayDep, _: AdminDep) -> DeployResponse:
    return await RoutersService(gateway).activate(version)


@router.delete(
    "/{version}",
    response_model=DeleteResponse,
    summary="Delete an inactive version and its patch (409 for the active one)",
)
async def delete(version: Version, gateway: GatewayDep, _: AdminDep) -> DeleteResponse:
    await RoutersService(gateway).delete(version)
    return DeleteResponse(version=version)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
