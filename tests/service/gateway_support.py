"""Helpers shared by the gateway tests: real patch files made from a tiny checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import torch
import uvicorn

from roma_patch import BaseRouters, PatchMeta, read_checkpoint_routers, router_layer, write_patch


def base_routers(model_dir: Path) -> BaseRouters:
    return BaseRouters.from_raw(str(model_dir), read_checkpoint_routers(model_dir))


def patched_routers(
    model_dir: Path, layers: tuple[int, ...] = (4, 5), seed: int = 1, scale: float = 2.0
) -> dict[str, torch.Tensor]:
    """Base routers of ``layers`` moved far enough that greedy outputs change."""
    raw = read_checkpoint_routers(model_dir)
    names = {router_layer(n): n for n in raw}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        name = names[layer]
        base = raw[name].to_torch()
        out[name] = base + scale * torch.randn(base.shape, generator=gen, dtype=base.dtype)
    return out


def make_patch(
    model_dir: Path,
    layers: tuple[int, ...] = (4, 5),
    seed: int = 1,
    scale: float = 2.0,
    tensors: dict[str, torch.Tensor] | None = None,
    fingerprint: str | None = None,
) -> bytes:
    """A valid patch (unless ``tensors``/``fingerprint`` say otherwise) as bytes."""
    tensors = tensors if tensors is not None else patched_routers(model_dir, layers, seed, scale)
    base = base_routers(model_dir)
    known = [n for n in tensors if n in base.specs]
    meta = PatchMeta(
        base_model=str(model_dir),
        base_fingerprint=fingerprint or (base.fingerprint(known) if known else "0" * 64),
        layers=sorted(router_layer(n) for n in tensors),
        objective="test",
        hparams={"seed": seed},
    )
    return write_patch(tensors, meta)


# --- running a gateway for real ------------------------------------------------------------------
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


def hf_greedy(
    model_dir: Path, routers: dict[str, torch.Tensor] | None = None, n: int = 8
) -> list[int]:
    """Greedy token ids from transformers with the given router weights swapped in."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in (routers or {}).items():
            params[name].copy_(tensor)
        out = model.generate(
            torch.tensor([PROMPT_IDS]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(PROMPT_IDS) :].tolist()
