"""Several engines and several gateways on one Redis (issue 6), with real vLLM engines.

The first test runs the global swap (``ROMA_SWAP_POLICY=drain``: one version at a time,
swapped in place), the second slot mode (the default with engines that have slots).

Gateway A spreads traffic over two engines; gateway C serves only the second engine; both share
one Redis namespace. Deploys through A reach both engines and C learns of them; an engine
killed during a deploy leaves Redis unchanged; a deploy while an engine is down goes to the
others; the restarted engine is given the active version before any gateway sends it traffic.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from roma_service.engine.client import EngineClient
from roma_service.engine.process import EngineProcess
from roma_service.registry import LocalRedis
from tests.fixtures.engine import patch_bytes, spare_core, start
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


@pytest.fixture(scope="module")
def second_engine(
    tiny_olmoe: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EngineProcess]:
    """A second engine this module may kill and restart (same port)."""
    process = start(tiny_olmoe, tmp_path_factory.mktemp("second-engine"), cpu_cores=spare_core())
    try:
        yield process
    finally:
        process.stop()


async def _held(url: str) -> int | None:
    async with EngineClient(url) as client:
        return (await client.state()).version


async def _until(predicate, timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _engine_requests(metrics: str, url: str) -> float:
    match = re.search(rf'roma_engine_requests_total{{engine="{re.escape(url)}"}} (\S+)', metrics)
    return float(match.group(1)) if match else 0.0


async def _engine_state(gw: httpx.AsyncClient, url: str) -> dict:
    ready = (await gw.get("/ready")).json()
    return next(e for e in ready["engines"] if e["url"] == url)


async def test_engines_converge_and_survive_a_restart(
    engine_url: str,
    second_engine: EngineProcess,
    tiny_olmoe: Path,
    redis_server: LocalRedis,
    redis_prefix: str,
) -> None:
    e1, e2 = engine_url, second_engine.url
    settings_a = gateway_settings(redis_prefix, gateway_id="gw-a", swap_policy="drain")
    settings_c = gateway_settings(redis_prefix, gateway_id="gw-c", swap_policy="drain")
    async with (
        running_gateway(settings_a, redis_server.url, [e1, e2]) as a,
        running_gateway(settings_c, redis_server.url, [e2]) as c,
    ):
        # 1. A deploy through A reaches both engines; C learns of it through Redis.
        v1 = await a.post(
            "/routers",
            headers=AUTH,
            content=patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=31),
        )
        assert v1.status_code == 201 and sorted(v1.json()["engines"]) == sorted([e1, e2])
        assert await _held(e1) == 1 and await _held(e2) == 1
        tokens, _ = await greedy(a)

        async def c_follows() -> bool:
            return (await greedy(c))[1].headers["X-Router-Version"] == "1"

        await _until(c_follows, what="gateway C to serve version 1")
        assert (await greedy(c))[0] == tokens
        assert (await c.get("/routers/active", headers=AUTH)).json()["version"] == 1

        # 2. Traffic is spread over both engines.
        await asyncio.gather(*(greedy(a) for _ in range(8)))
        metrics = (await a.get("/metrics")).text
        assert _engine_requests(metrics, e1) > 0 and _engine_requests(metrics, e2) > 0

        # 3. The engine dies during a deploy (C drains a stream on it, then it is killed): the
        #    deploy fails, names the engine, and Redis is unchanged. The engine is paused
        #    ("keep") before the stream is admitted, so the stream is still in flight and the
        #    deploy still draining when the kill comes; a free-running stream could end first,
        #    and the deploy with it, on an idle machine.
        request = {"model": await model_id(c), "prompt": PROMPT_IDS, "max_tokens": 400,
                   "min_tokens": 400, "temperature": 0.0, "stream": True}  # fmt: skip
        admitted = asyncio.Event()

        async def long_stream() -> None:
            try:
                async with c.stream("POST", "/v1/completions", json=request) as response:
                    admitted.set()
                    async for _ in response.aiter_lines():
                        pass
            except httpx.HTTPError:
                pass  # the engine is killed under it

        async with EngineClient(e2) as client:
            await client.pause("keep")
        stream = asyncio.create_task(long_stream())
        await asyncio.wait_for(admitted.wait(), 60)
        patch = patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=32)
        deploy = asyncio.create_task(c.post("/routers", headers=AUTH, content=patch))
        await asyncio.sleep(0.5)
        assert not deploy.done() and not stream.done()  # held by the drain
        second_engine.kill()
        failed = await deploy
        await stream
        assert failed.status_code in (502, 503), failed.text
        listing = (await a.get("/routers", headers=AUTH)).json()
        assert listing["active"] == 1 and [v["version"] for v in listing["data"]] == [0, 1]

        # 4. With e2 down: C is not ready, A still serves from e1, and deploys go to e1 only.
        async def e2_out_of_a() -> bool:
            return not (await _engine_state(a, e2))["healthy"]

        await _until(e2_out_of_a, what="gateway A to take e2 out of rotation")
        await _until(lambda: _status(c, "/ready", 503), what="gateway C to report not ready")
        assert (await greedy(a))[0] == tokens
        v3 = await a.post(
            "/routers",
            headers=AUTH,
            content=patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=33),
        )
        assert v3.status_code == 201 and v3.json()["engines"] == [e1], v3.text
        version = v3.json()["version"]

        # 5. e2 restarts with the checkpoint's routers; it is given the active version before
        #    C reports ready, and before A puts it back in rotation.
        second_engine.start()
        await asyncio.to_thread(second_engine.wait_healthy)
        await _until(lambda: _status(c, "/ready", 200), timeout_s=60, what="C ready again")
        assert await _held(e2) == version
        c_tokens, response = await greedy(c)
        assert response.headers["X-Router-Version"] == str(version)
        assert c_tokens == (await greedy(a))[0]

        async def both_in_rotation() -> bool:
            engines = (await a.get("/ready")).json()["engines"]
            return all(e["in_rotation"] and e["version"] == version for e in engines)

        await _until(both_in_rotation, timeout_s=60, what="both engines in A's rotation")


async def _status(client: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await client.get(path)).status_code == status


async def _resident(url: str) -> dict[int, bool]:
    """Version -> pinned, for every version resident in the engine's slots."""
    async with EngineClient(url) as client:
        return {v: s.pinned for v, s in (await client.slots()).resident().items()}


async def test_slot_mode_engines_hold_what_traffic_needs_and_get_it_back_after_a_restart(
    engine_url: str,
    second_engine: EngineProcess,
    tiny_olmoe: Path,
    redis_server: LocalRedis,
    redis_prefix: str,
) -> None:
    """Slot mode with two engines and two gateways: a deploy through A pins the version on both
    engines and C serves it; a version asked for per request is loaded into one engine only and
    its requests go only there; a canary split set through A is followed by C (same caller,
    same version) and pinned on both engines; a restarted engine gets the active version and
    the split's back, pinned, before C serves again."""
    e1, e2 = engine_url, second_engine.url
    settings_a = gateway_settings(redis_prefix, gateway_id="gw-a")
    settings_c = gateway_settings(redis_prefix, gateway_id="gw-c")
    async with (
        running_gateway(settings_a, redis_server.url, [e1, e2]) as a,
        running_gateway(settings_c, redis_server.url, [e2]) as c,
    ):
        assert a.app.state.gateway.pool.slot_mode  # type: ignore[attr-defined]
        patch = patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=41)
        v1 = await a.post("/routers", headers=AUTH, content=patch)
        assert v1.status_code == 201 and sorted(v1.json()["engines"]) == sorted([e1, e2])
        assert (await _resident(e1)).get(1) is True and (await _resident(e2)).get(1) is True

        async def c_follows() -> bool:
            return (await greedy(c))[1].headers["X-Router-Version"] == "1"

        await _until(c_follows, what="gateway C to serve version 1")

        # A stored version asked for per request: loaded into one engine, served only there.
        patch = patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=42)
        v2 = await a.post("/routers", headers=AUTH, content=patch, params={"activate": "false"})
        assert v2.status_code == 201 and v2.json()["version"] == 2
        body = {"model": await model_id(a), "prompt": PROMPT_IDS, "max_tokens": 4,
                "temperature": 0.0}  # fmt: skip
        responses = await asyncio.gather(
            *(a.post("/v1/completions", json=body, headers={"X-Router-Version": "2"})
              for _ in range(6))
        )  # fmt: skip
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        assert {r.headers["X-Router-Version"] for r in responses} == {"2"}
        holders = [url for url in (e1, e2) if 2 in await _resident(url)]
        assert len(holders) == 1, holders
        assert (await _resident(holders[0]))[2] is False  # unpinned: not needed by traffic

        # A canary split through A: C follows it (same sticky choice), both engines pin 2.
        split = await a.put(
            "/routers/traffic", headers=AUTH, json={"weights": {"1": 0.5, "2": 0.5}}
        )
        assert split.status_code == 200, split.text

        async def c_has_split() -> bool:
            return c.app.state.gateway.pool.split == {1: 0.5, 2: 0.5}  # type: ignore[attr-defined]

        await _until(c_has_split, what="gateway C to follow the split")
        for url in (e1, e2):
            assert (await _resident(url)).get(2) is True, url
        for user in ("u1", "u2", "u3", "u4"):
            via_a = await a.post("/v1/completions", json={**body, "user": user})
            via_c = await c.post("/v1/completions", json={**body, "user": user})
            assert via_a.headers["X-Router-Version"] == via_c.headers["X-Router-Version"]

        # e2 restarts with only the base routers; the gateways give it 1 and 2 back, pinned.
        second_engine.kill()
        second_engine.start()
        await asyncio.to_thread(second_engine.wait_healthy)

        async def e2_restored() -> bool:
            resident = await _resident(e2)
            ready = await _status(c, "/ready", 200)
            return resident.get(1) is True and resident.get(2) is True and ready

        await _until(e2_restored, timeout_s=90, what="e2 to hold 1 and 2 again, pinned")
        # The split is still in force: a caller is served by its version, through either.
        via_a = await a.post("/v1/completions", json={**body, "user": "u1"})
        via_c = await c.post("/v1/completions", json={**body, "user": "u1"})
        assert via_a.headers["X-Router-Version"] == via_c.headers["X-Router-Version"]
