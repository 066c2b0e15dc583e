"""The floor of any Python hop: a bare ASGI proxy that forwards a POST to the engine with one
pooled aiohttp session and streams the answer back, chunk by chunk. No routing, no auth, no
metrics, no framework: what is left of a gateway when everything a gateway does is taken out.

    python benchmarks/bare_proxy.py --upstream http://127.0.0.1:8000 --port 9000

``gateway_overhead.py`` runs it as a third target beside the engine and the gateway, so that the
gateway's overhead splits into what one more loopback hop through a Python event loop costs
(this) and what the gateway adds on top of it.
"""

from __future__ import annotations

from typing import Annotated, Any

import aiohttp
import typer
import uvicorn

_HOP_HEADERS = {"content-type", "accept"}


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
                    )
                    await send({"type": "lifespan.startup.complete"})
            if self.session is not None:
                await self.session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {
            k.decode(): v.decode() for k, v in scope["headers"] if k.decode() in _HOP_HEADERS
        }
        assert self.session is not None
        async with self.session.request(
            scope["method"], self.upstream + scope["path"], data=body, headers=headers
        ) as upstream:
            out = [(b"content-type", upstream.headers.get("content-type", "").encode())]
            await send({"type": "http.response.start", "status": upstream.status, "headers": out})
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def main(
    upstream: Annotated[str, typer.Option(help="the engine's base URL")],
    port: Annotated[int, typer.Option(help="port to listen on (127.0.0.1)")],
) -> None:
    config = uvicorn.Config(
        BareProxy(upstream), host="127.0.0.1", port=port, log_config=None, access_log=False
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    typer.run(main)
