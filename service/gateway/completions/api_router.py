"""HTTP routes of the OpenAI API and vLLM's tokenizer routes. Bodies are the engine's (vLLM's
own protocol): the gateway passes them through, so they are declared as free-form JSON here.
Every route needs one of ``ROMA_API_KEYS`` when keys are set."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, Path, Request
from starlette.responses import Response

from roma_service.gateway.completions.serving import CompletionsProxy
from roma_service.gateway.deps import ApiKeyDep, GatewayDep
from roma_service.gateway.errors import error_responses

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKeyDep])
tokens = APIRouter(tags=["tokenizer"], dependencies=[ApiKeyDep])

_JSON_ANSWER = {"content": {"application/json": {"schema": {"type": "object"}}}}


def _post(example: dict[str, object]) -> dict[str, object]:
    """Declared for the OpenAPI schema only: the body is read by the proxy (size-limited,
    streamed), and must be JSON (415 otherwise, as vLLM answers)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "additionalProperties": True},
                    "example": example,
                }
            },
        }
    }


# What a proxied POST can answer: the engine's 200 or its refusals (mapped to the gateway's
# shape), and the gateway's own (too large, not JSON, no engine, swap in progress).
_POSTED = {
    200: {"description": 'the engine\'s answer (an SSE stream when "stream": true)'} | _JSON_ANSWER,
    **error_responses(400, 401, 404, 413, 415, 502, 503),
}
_COMPLETION = {"model": "<id from /v1/models>", "prompt": "Hello", "max_tokens": 8}


@router.post(
    "/completions",
    summary="OpenAI completions",
    openapi_extra=_post(_COMPLETION),
    responses=_POSTED,
)
async def completions(request: Request, gateway: GatewayDep) -> Response:
    return await CompletionsProxy(gateway).forward(request, "/v1/completions", "completions")


@router.post(
    "/chat/completions",
    summary="OpenAI chat completions",
    openapi_extra=_post({"model": "<id>", "messages": [{"role": "user", "content": "Hi"}]}),
    responses=_POSTED,
)
async def chat_completions(request: Request, gateway: GatewayDep) -> Response:
    return await CompletionsProxy(gateway).forward(
        request, "/v1/chat/completions", "chat_completions"
    )


@router.get(
    "/models",
    summary="The served model",
    responses={200: {"description": "OpenAI's model list"} | _JSON_ANSWER}
    | error_responses(401, 502, 503),
)
async def models(request: Request, gateway: GatewayDep) -> Response:
    return await CompletionsProxy(gateway).forward(request, "/v1/models", "models")


@router.get(
    "/models/{model_id:path}",
    summary="One served model (404 for any other id)",
    responses={200: {"description": "OpenAI's model object"} | _JSON_ANSWER}
    | error_responses(401, 404, 502, 503),
)
async def model(
    model_id: Annotated[str, Path(description="as listed by /v1/models")],
    request: Request,
    gateway: GatewayDep,
) -> Response:
    return await CompletionsProxy(gateway).model(request, model_id)


@tokens.post(
    "/tokenize",
    summary="Text or chat messages to token ids, with the served model's tokenizer (vLLM)",
    openapi_extra=_post({"model": "<id>", "prompt": "Hello"}),
    responses=_POSTED,
)
async def tokenize(request: Request, gateway: GatewayDep) -> Response:
    return await CompletionsProxy(gateway).forward(request, "/tokenize", "tokenize")


@tokens.post(
    "/detokenize",
    summary="Token ids to text (vLLM)",
    openapi_extra=_post({"model": "<id>", "tokens": [1, 2, 3]}),
    responses=_POSTED,
)
async def detokenize(request: Request, gateway: GatewayDep) -> Response:
    return await CompletionsProxy(gateway).forward(request, "/detokenize", "detokenize")


@tokens.get(
    "/version",
    summary="The engine's vLLM version",
    responses={200: {"description": '{"version": "..."}'} | _JSON_ANSWER}
    | error_responses(401, 502, 503),
)
async def version(request: Request, gateway: GatewayDep) -> Response:
    return await CompletionsProxy(gateway).forward(request, "/version", "version")


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
    app.include_router(tokens)
