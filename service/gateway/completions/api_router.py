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
tokens = APIRouter(tags=["vllm"], dependencies=[ApiKeyDep])

_JSON_ANSWER = {"content": {"application/json": {"schema": {"type": "object"}}}}


# Slot mode (docs/service.md): the version a completion runs under, and the caller key of a
# canary split. Declared on every POST route; tokenize/detokenize ignore them.
_VERSION_PARAMETERS = [
    {
        "name": "X-Router-Version",
        "in": "header",
        "required": False,
        "description": "run under this router version (0 = base routers); default: the canary "
        "split's choice for the caller, else the active version",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    {
        "name": "X-Router-Caller",
        "in": "header",
        "required": False,
        "description": "caller key of a canary split (default: the body's 'user')",
        "schema": {"type": "string", "minLength": 1, "maxLength": 256},
    },
]


def _post(example: dict[str, object]) -> dict[str, object]:
    """Declared for the OpenAPI schema only: the body is read by the proxy (size-limited,
    streamed), and must be JSON (415 otherwise, as vLLM answers)."""
    return {
        "parameters": _VERSION_PARAMETERS,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "additionalProperties": True},
                    "example": example,
                }
            },
        },
    }


# What a proxied POST can answer: the engine's 200 or its refusals (mapped to the gateway's
# shape), and the gateway's own (too large, not JSON, no engine, swap in progress).
_POSTED = {
    200: {"description": 'the engine\'s answer (an SSE stream when "stream": true)'} | _JSON_ANSWER,
    **error_responses(400, 401, 404, 409, 413, 415, 502, 503),
}


def _pass_through(
    on: APIRouter,
    path: str,
    route: str,
    summary: str,
    example: dict[str, object] | None = None,
    upstream: str | None = None,
) -> None:
    """A route that hands the request to the proxy as it is: a POST with a JSON body when an
    ``example`` body is given, a GET otherwise. ``route`` labels the metrics."""

    async def endpoint(request: Request, gateway: GatewayDep) -> Response:
        return await CompletionsProxy(gateway).forward(request, upstream or path, route)

    endpoint.__name__ = route
    if example is None:
        answers = {200: {"description": "the engine's answer"} | _JSON_ANSWER}
        on.add_api_route(path, endpoint, methods=["GET"], summary=summary,
                         responses=answers | error_responses(401, 502, 503))  # fmt: skip
    else:
        on.add_api_route(path, endpoint, methods=["POST"], summary=summary,
                         openapi_extra=_post(example), responses=_POSTED)  # fmt: skip


_pass_through(router, "/completions", "completions", "OpenAI completions",
              {"model": "<id from /v1/models>", "prompt": "Hello", "max_tokens": 8},
              upstream="/v1/completions")  # fmt: skip
_pass_through(router, "/chat/completions", "chat_completions", "OpenAI chat completions",
              {"model": "<id>", "messages": [{"role": "user", "content": "Hi"}]},
              upstream="/v1/chat/completions")  # fmt: skip
_pass_through(router, "/models", "models", "The served model", upstream="/v1/models")
_pass_through(tokens, "/tokenize", "tokenize",
              "Text or chat messages to token ids, with the served model's tokenizer (vLLM)",
              {"model": "<id>", "prompt": "Hello"})  # fmt: skip
_pass_through(tokens, "/detokenize", "detokenize", "Token ids to text (vLLM)",
              {"model": "<id>", "tokens": [1, 2, 3]})  # fmt: skip
_pass_through(tokens, "/version", "version", "The engine's vLLM version")


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


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
    app.include_router(tokens)
