"""The gateway app: ``create_app(settings, redis_url, engine_urls)`` wires the areas together.

Engines and Redis are found, never started, here: ``roma-serve`` (cli.py) starts the embedded
ones and passes their URLs. Start-up work that waits on them runs in the background, so
``/health`` answers at once and ``/ready`` turns green when the engines hold the active version.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from roma_service.gateway import errors
from roma_service.gateway.completions import api_router as completions
from roma_service.gateway.completions.fast_path import CompletionsFastPath
from roma_service.gateway.health import api_router as health
from roma_service.gateway.routers import api_router as routers
from roma_service.gateway.state import Gateway
from roma_service.gateway.version_header import RouterVersionHeader
from roma_service.settings import Settings


def create_app(
    settings: Settings, redis_url: str | None = None, engine_urls: list[str] | None = None
) -> FastAPI:
    redis_url = redis_url or settings.redis_url
    engine_urls = engine_urls or settings.engine_urls
    if not redis_url or not engine_urls:
        raise ValueError("create_app needs a Redis URL and at least one engine URL")
    if not settings.admin_token_value():
        raise ValueError("ROMA_ADMIN_TOKEN is not set: the control routes would be open")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway.build(settings, redis_url, engine_urls)
        app.state.gateway = gateway
        gateway.start()
        try:
            yield
        finally:
            await gateway.aclose()

    app = FastAPI(
        title="RoMA router gateway",
        summary="OpenAI-compatible completions with hot-swappable MoE router patches",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install_error_handlers(app)
    # Inside the version header (it stamps the fast path's answers too); see fast_path.py.
    app.add_middleware(CompletionsFastPath)
    app.add_middleware(RouterVersionHeader)
    completions.attach_router(app)
    routers.attach_router(app)
    health.attach_router(app)
    return app
