"""One error shape for every failure, OpenAI's: ``{"error": {"message", "type", "param",
"code"}}``. OpenAI clients parse exactly this, so a bad patch or a missing token reads the same
way as a bad completion request."""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from roma_patch import PatchError
from roma_service.gateway.swaps.canary import CanaryRefused
from roma_service.gateway.swaps.errors import (
    Busy,
    CannotSwap,
    EngineFailed,
    NoFreeSlot,
    PatchRejected,
    SlotsDisabled,
    SwapError,
)
from roma_service.gateway.traffic import BadSplit
from roma_service.registry import (
    ActiveVersion,
    RegistryError,
    RegistryNotReady,
    UnknownVersion,
    VersionInUse,
)

log = logging.getLogger(__name__)

# PatchError codes that are about size, not content.
_TOO_LARGE = {"too_large"}

_RETRY_LATER = {"Retry-After": "5"}

# A failed swap's status, and whether retrying shortly may succeed (Retry-After).
_SWAP_STATUS: dict[type[SwapError], tuple[int, dict[str, str] | None]] = {
    PatchRejected: (400, None),
    EngineFailed: (502, None),
    CannotSwap: (503, None),
    Busy: (503, _RETRY_LATER),
    NoFreeSlot: (503, {"Retry-After": "1"}),
    SlotsDisabled: (409, None),
}


class APIError(Exception):
    """Raise anywhere in a route to answer ``status`` with the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong, for people")
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                      "service_unavailable_error, ... (from the HTTP status)")  # fmt: skip
    param: str | None = Field(None, description="the parameter at fault, if one is")
    code: str | None = Field(None, description="machine-readable reason, e.g. shape_mismatch")


class ErrorResponse(BaseModel):
    """Every error the gateway answers, its own or an engine's, has this shape (OpenAI's)."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the error statuses a route really answers."""
    return {
        status: {"model": ErrorResponse, "description": HTTPStatus(status).phrase}
        for status in statuses
    }


def error_type(status: int) -> str:
    """OpenAI's ``type`` field: invalid_request_error for 4xx, the status phrase otherwise."""
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return HTTPStatus(status).phrase.lower().replace(" ", "_") + "_error"


def error_body(status: int, message: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    code: str | None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status, headers=headers)


def from_engine(status: int, content: bytes) -> dict[str, Any]:
    """An engine's error answer in the gateway's shape. vLLM's own errors carry an integer
    ``code`` and a class name as ``type`` (``{"type": "BadRequestError", "code": 400}``); others
    are FastAPI's ``{"detail": ...}`` or plain text. The message and param are kept; type and
    code follow the gateway's scheme (``not_found_error`` / ``not_found``)."""
    message, param, kind = content.decode(errors="replace").strip(), None, None
    try:
        payload = json.loads(content)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            param = error.get("param") if isinstance(error.get("param"), str) else None
            kind = error.get("type") if isinstance(error.get("type"), str) else None
        elif "detail" in payload:
            message = str(payload["detail"])
    if kind and kind.endswith("Error"):  # BadRequestError -> bad_request
        code = re.sub(r"(?<!^)(?=[A-Z])", "_", kind.removesuffix("Error")).lower()
    else:
        code = _phrase(status)
    return error_body(status, message or HTTPStatus(status).phrase, code, param)


def _phrase(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "_")


def from_patch_error(exc: PatchError) -> APIError:
    status = 413 if exc.code in _TOO_LARGE else 400
    return APIError(status, exc.message, exc.code, exc.param)


def _declare_no_422(app: FastAPI) -> None:
    """Validation errors are answered 400 (below), so the schema must not promise FastAPI's
    default 422 and its body."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    _declare_no_422(app)

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(PatchError)
    async def _patch(_: Request, exc: PatchError) -> JSONResponse:
        err = from_patch_error(exc)
        return error_response(err.status, err.message, err.code, err.param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = _phrase(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code, None, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'request'}: {first['msg']}", "invalid_value", param)

    @app.exception_handler(UnknownVersion)
    async def _unknown(_: Request, exc: UnknownVersion) -> JSONResponse:
        return error_response(404, exc.message, exc.code, exc.param)

    @app.exception_handler(ActiveVersion)
    async def _active(_: Request, exc: ActiveVersion) -> JSONResponse:
        return error_response(409, exc.message, exc.code, exc.param)

    @app.exception_handler(VersionInUse)
    async def _in_use(_: Request, exc: VersionInUse) -> JSONResponse:
        return error_response(409, exc.message, exc.code, exc.param)

    @app.exception_handler(BadSplit)
    async def _bad_split(_: Request, exc: BadSplit) -> JSONResponse:
        return error_response(400, exc.message, exc.code, exc.param)

    @app.exception_handler(CanaryRefused)
    async def _canary_refused(_: Request, exc: CanaryRefused) -> JSONResponse:
        return error_response(409, exc.message, exc.code, exc.param)

    @app.exception_handler(RegistryNotReady)
    async def _not_ready(_: Request, exc: RegistryNotReady) -> JSONResponse:
        return error_response(503, exc.message, exc.code, exc.param, {"Retry-After": "5"})

    @app.exception_handler(RegistryError)
    async def _registry(_: Request, exc: RegistryError) -> JSONResponse:
        return error_response(409, exc.message, exc.code, exc.param)

    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("registry unavailable", extra={"error": repr(exc)})
        return error_response(
            503,
            f"the router registry (Redis) is unavailable: {exc}. Completions keep serving the "
            "current version; retry control requests when Redis is back.",
            "registry_unavailable",
            headers=_RETRY_LATER,
        )

    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)

    @app.exception_handler(SwapError)
    async def _swap(_: Request, exc: SwapError) -> JSONResponse:
        status, headers = _SWAP_STATUS[type(exc)]
        return error_response(status, exc.message, exc.code, exc.param, headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
