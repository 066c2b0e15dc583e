"""Redis going away: completions keep serving the active version, control routes answer 503
with a reason, and nothing is lost when Redis comes back (append-only persistence)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from roma_service.registry import LocalRedis
from tests.fixtures.engine import patch_bytes
from tests.service.gateway_support import (
    ALL_LAYERS,
    AUTH,
    gateway_settings,
    greedy,
    running_gateway,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("base_routers_after")]


async def test_redis_down_keeps_serving_and_loses_nothing(
    engine_url: str, tiny_olmoe: Path, own_redis: LocalRedis, redis_prefix: str
) -> None:
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, own_redis.url, [engine_url]) as gw:
        deployed = await gw.post(
            "/routers",
            headers=AUTH,
            content=patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=21),
        )
        assert deployed.status_code == 201
        tokens, _ = await greedy(gw)

        own_redis.kill()  # SIGKILL: a crash, not a clean shutdown
        for _ in range(3):  # including a few reconcile rounds without Redis
            again, response = await greedy(gw)
            assert again == tokens and response.headers["X-Router-Version"] == "1"
            await asyncio.sleep(0.5)
        for method, path in [("GET", "/routers"), ("GET", "/routers/active"),
                             ("POST", "/routers/0/activate")]:  # fmt: skip
            down = await gw.request(method, path, headers=AUTH)
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "registry_unavailable"
            assert "Redis" in down.json()["error"]["message"]
        refused = await gw.post(
            "/routers",
            headers=AUTH,
            content=patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=22),
        )
        assert refused.status_code == 503
        assert (await gw.get("/ready")).status_code == 200

        own_redis.start()  # same port, same append-only file
        listing = (await gw.get("/routers", headers=AUTH)).json()
        assert listing["active"] == 1 and [v["version"] for v in listing["data"]] == [0, 1]
        assert (await gw.get("/routers/1", headers=AUTH)).json()["id"] == deployed.json()["id"]
        later = await gw.post(
            "/routers",
            headers=AUTH,
            content=patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=23),
        )
        assert later.status_code == 201 and later.json()["version"] == 2
        assert (await greedy(gw))[1].headers["X-Router-Version"] == "2"
