"""``X-Router-Version`` on every response, errors included.

The completions proxy stamps its responses with the version the engine held when the request
went in. Every other answer (``/routers``, ``/ready``, an error before any engine was picked)
gets the active version as this gateway last read it from Redis; until it knows one (start-up)
the header is left out rather than guessed.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-router-version"


class RouterVersionHeader:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                gateway = getattr(scope["app"].state, "gateway", None)
                active = gateway.pool.active if gateway is not None else None
                if active is not None and all(name.lower() != HEADER for name, _ in headers):
                    message = {**message, "headers": [*headers, (HEADER, str(active).encode())]}
            await send(message)

        await self.app(scope, receive, stamped)
