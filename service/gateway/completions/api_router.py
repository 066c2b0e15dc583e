"""HTTP routes of the OpenAI API. Bodies are the engine's (vLLM's own OpenAI protocol): the
gateway passes them through, so they are declared as free-form JSON here."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from roma_service.gateway.completions.serving import CompletionsProxy
from roma_service.gateway.deps import GatewayDep

router = APIRouter(prefix="/v1", tags=["openai"])

# Declared for the OpenAPI schema only: the body is read by the proxy (size-limited, streamed).
_OPENAI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "additionalProperties": True},
                "example": {"model": "<id from /v1/models>", "prompt": "Hello", "max_tokens": 8},
            }
        },
    }
}


@router.post("/completions", summary="OpenAI completions", openapi_extra=_OPENAI)
async def completions(request: Request, gateway: GatewayDep) -> Response:
    return await CompletionsProxy(gateway).forward(request, "/v1/completions", "completions")


@router.post("/chat/completions", summary="OpenAI chat completions", openapi_extra=_OPENAI)
async def chat_completions(request: Request, gateway: GatewayDep) -> Response:
    return await CompletionsProxy(gateway).forward(
        request, "/v1/chat/completions", "chat_completions"
    )


@router.get("/models", summary="The served model")
async def models(request: Request, gateway: GatewayDep) -> Response:
    return await CompletionsProxy(gateway).forward(request, "/v1/models", "models")


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
