"""The two routes that carry the traffic, ``POST /v1/completions`` and ``POST
/v1/chat/completions``, served in front of FastAPI's router.

What they do is the proxy's (``serving.CompletionsProxy``), exactly as the FastAPI routes do;
only the way there is shorter. FastAPI's route matching, dependency solving (it parses the
cookies of every request), exit stacks and exception middleware cost about 0.1 ms of the
gateway's single core per request, and each SSE chunk passes one wrapper less. Requests arrive
in bursts and the gateway takes them one at a time, so that time spreads a burst out before it
reaches the engine, which starts a step with the first arrivals and makes the rest wait for the
next: it shows in the time to first token (docs/service.md, "Gateway overhead").

The FastAPI routes stay declared (OpenAPI, ``/docs``) and serve anything this path passes on:
other methods, other paths, requests before the gateway is built. Errors are answered by the
app's own exception handlers, so they read exactly as on every other route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from roma_service.gateway.completions.serving import CompletionsProxy
from roma_service.gateway.deps import bearer_token, check_api_key

# path -> (upstream path, metrics route label): the declarations in api_router.py.
ROUTES = {
    "/v1/completions": ("/v1/completions", "completions"),
    "/v1/chat/completions": ("/v1/chat/completions", "chat_completions"),
}

Handler = Callable[[Request, Exception], Awaitable[Response]]


class CompletionsFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        gateway = getattr(scope["app"].state, "gateway", None) if route else None
        if route is None or gateway is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            check_api_key(gateway, bearer_token(request.headers.get("authorization")))
            response = await CompletionsProxy(gateway).forward(request, *route)
        except Exception as exc:
            handler = _handler(scope["app"].exception_handlers, exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)


def _handler(handlers: Mapping[Any, Handler], exc: Exception) -> Handler | None:
    """The app's handler for ``exc``: the one registered for its nearest class."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
