"""Swap semantics under traffic: concurrent deploys are serialised into strictly increasing
versions; ``drain`` never lets a request see two versions; ``immediate`` swaps mid-request and
says so in the response."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from roma_service.engine.client import EngineClient
from roma_service.registry import LocalRedis
from tests.fixtures.engine import patch_bytes
from tests.service.gateway_support import (
    ALL_LAYERS,
    AUTH,
    PROMPT_IDS,
    gateway_settings,
    greedy,
    model_id,
    running_gateway,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("base_routers_after")]
LONG = 400  # tokens: a stream that lasts long enough to deploy in the middle of it


async def _long_stream(gw: httpx.AsyncClient, opened: asyncio.Event) -> dict:
    """Stream LONG tokens; report the version header, the trailing comments and when it ended.
    ``opened`` is set when the response headers are in (the request is admitted)."""
    request = {
        "model": await model_id(gw),
        "prompt": PROMPT_IDS,
        "max_tokens": LONG,
        "min_tokens": LONG,
        "temperature": 0.0,
        "stream": True,
    }
    events = 0
    comments: list[str] = []
    async with gw.stream("POST", "/v1/completions", json=request) as response:
        assert response.status_code == 200
        version = response.headers["X-Router-Version"]
        opened.set()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events += 1
            elif line.startswith(":"):
                comments.append(line)
    return {"version": version, "comments": comments, "ended": time.monotonic(), "events": events}


@asynccontextmanager
async def _stream_held_in_flight(
    gw: httpx.AsyncClient, engine_url: str
) -> AsyncIterator[asyncio.Task[dict]]:
    """A long stream admitted while the engine is paused ("keep"), so it is in flight for as
    long as the block runs, on any machine (a free-running one can end before a deploy starts
    on an idle machine); the engine resumes on exit."""
    async with EngineClient(engine_url) as engine:
        await engine.pause("keep")
        try:
            opened = asyncio.Event()
            stream = asyncio.create_task(_long_stream(gw, opened))
            await asyncio.wait_for(opened.wait(), 30)
            yield stream
        finally:
            await engine.resume()


async def test_concurrent_deploys_get_distinct_increasing_versions(
    engine_url: str, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
        patches = [
            patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=100 + i) for i in range(20)
        ]
        responses = await asyncio.gather(
            *(gw.post("/routers", headers=AUTH, content=p) for p in patches)
        )
        assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses]
        versions = sorted(r.json()["version"] for r in responses)
        assert versions == list(range(1, 21))
        listing = (await gw.get("/routers", headers=AUTH)).json()
        active = [v["version"] for v in listing["data"] if v["active"]]
        assert active == [20] and listing["active"] == 20
        history = (await gw.get("/routers/history", headers=AUTH)).json()["data"]
        assert [h["version"] for h in history] == list(range(1, 21))
        # The engine holds what Redis says is active: the last patch's output.
        _, response = await greedy(gw)
        assert response.headers["X-Router-Version"] == "20"
        ready = (await gw.get("/ready")).json()
        assert ready["engines"][0]["version"] == 20


async def test_drain_lets_in_flight_requests_finish_on_their_version(
    engine_url: str, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    """The stream is held in flight while the deploy starts, so the deploy provably waits for
    it (a free-running stream could end before the deploy began)."""
    settings = gateway_settings(redis_prefix, swap_policy="drain")
    async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
        # Built before the stream: building it blocks the loop.
        patch = patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=11)
        async with _stream_held_in_flight(gw, engine_url) as stream:
            posted = asyncio.create_task(gw.post("/routers", headers=AUTH, content=patch))
            await asyncio.sleep(0.5)
            assert not posted.done()  # held by the drain
        deploy = await posted
        deployed_at = time.monotonic()
        result = await stream
        assert deploy.status_code == 201, deploy.text
        assert result["events"] > LONG // 2  # streamed (a few events may carry two tokens)
        # The stream was generated entirely under version 0, and the swap waited for it.
        assert result["version"] == "0"
        assert ": x-router-version 0" in result["comments"]
        assert not any("changed" in c for c in result["comments"])
        assert result["ended"] <= deployed_at
        assert deploy.json()["timings_ms"]["drain"] >= 500  # ms: it waited out the paused stream
        _, after = await greedy(gw)
        assert after.headers["X-Router-Version"] == "1"


async def test_immediate_swaps_mid_stream_and_reports_it(
    engine_url: str, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    """The deploy does not wait for a stream in flight, and the stream reports the swap. The
    stream is held in flight (admitted, stamped version 0) across the deploy, so it spans the
    swap on any machine."""
    settings = gateway_settings(redis_prefix, swap_policy="immediate")
    async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
        # Built first: building it blocks the event loop this in-process gateway runs on.
        patch = patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=12)
        async with _stream_held_in_flight(gw, engine_url) as stream:
            deploy = await gw.post("/routers", headers=AUTH, content=patch)
            assert not stream.done()  # the deploy did not wait for it
        result = await stream
        assert deploy.status_code == 201, deploy.text
        assert result["version"] == "0" and result["events"] == LONG + 1  # + [DONE]
        assert any(c.startswith(": x-router-version-changed 0->") for c in result["comments"]), (
            result
        )
        metrics = (await gw.get("/metrics")).text
        assert "roma_responses_spanning_swap_total 1.0" in metrics
