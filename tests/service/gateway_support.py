"""Helpers shared by the gateway tests: a real gateway on loopback, its settings and token, and
greedy completions through it (patches come from ``tests.fixtures.engine.patch_bytes``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn

ADMIN_TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# "The quick brown fox jumps over the lazy dog. Question: what is" in the tiny tokenizer, as ids
# (no tokenizer round trip involved); a prompt on which routing visibly matters.
PROMPT_IDS = [281, 350, 324, 354, 339, 380, 349, 329, 85, 372, 268, 370, 91, 359, 16, 346, 360, 80]
ALL_LAYERS = (0, 1, 2, 3, 4, 5)


def gateway_settings(redis_prefix: str, **overrides: object):  # -> Settings
    from roma_service.settings import Settings

    values: dict[str, object] = dict(
        admin_token=ADMIN_TOKEN,
        redis_prefix=redis_prefix,
        reconcile_interval_s=0.5,
        drain_timeout_s=30.0,
        log_json=True,
    )
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_gateway(
    settings, redis_url: str, engine_urls: list[str], wait_ready: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app on a real uvicorn on loopback (streaming is real, not an ASGI shim), with
    an httpx client pointed at it; waits until /ready unless told not to."""
    from roma_service.gateway import create_app

    app = create_app(settings, redis_url, engine_urls)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            client.app = app  # type: ignore[attr-defined]
            if wait_ready:
                await wait_until_ready(client)
            yield client
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def wait_until_ready(client: httpx.AsyncClient, timeout_s: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        response = await client.get("/ready")
        body = response.json()
        if response.status_code == 200:
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"gateway not ready in {timeout_s} s: {body}")


async def model_id(client: httpx.AsyncClient) -> str:
    return (await client.get("/v1/models")).json()["data"][0]["id"]


async def greedy(
    client: httpx.AsyncClient, n: int = 8, prompt: list[int] | None = None
) -> tuple[list[int], httpx.Response]:
    """Greedy token ids through the gateway, and the response (for its headers)."""
    response = await client.post(
        "/v1/completions",
        json={
            "model": await model_id(client),
            "prompt": prompt or PROMPT_IDS,
            "max_tokens": n,
            "min_tokens": n,
            "temperature": 0.0,
            "return_token_ids": True,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"], response
