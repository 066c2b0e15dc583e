"""The gateway in front of a real vLLM engine (CPU) and a real Redis: deploys change greedy
outputs exactly as transformers predicts, rollback restores them, streaming and the openai client
work unchanged, and each response names its router version."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import openai
import pytest

from roma_service.engine.client import EngineClient
from roma_service.registry import LocalRedis, Registry
from tests.fixtures.engine import base_routers, hf_greedy, patch_bytes, perturbed_routers
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


async def test_deploy_matches_transformers_and_rollback_restores_base(
    engine_url: str, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
        routers = perturbed_routers(tiny_olmoe, ALL_LAYERS, scale=2.0, seed=1)
        base_expected = hf_greedy(tiny_olmoe, [PROMPT_IDS], 8)[0]
        patched_expected = hf_greedy(tiny_olmoe, [PROMPT_IDS], 8, routers=routers)[0]
        assert base_expected != patched_expected, "the test patch must change greedy output"

        tokens, response = await greedy(gw)
        assert tokens == base_expected
        assert response.headers["X-Router-Version"] == "0"

        patch = patch_bytes(tiny_olmoe, routers)
        deployed = await gw.post("/routers", headers=AUTH, files={"patch": patch})
        assert deployed.status_code == 201, deployed.text
        body = deployed.json()
        assert body["version"] == 1 and body["created"] and body["engines"] == [engine_url]
        for phase in ("upload", "validate", "store", "apply", "verify", "total"):
            assert body["timings_ms"][phase] >= 0.0
        assert body["timings_ms"]["apply"] > 0.0 and body["timings_ms"]["verify"] > 0.0

        tokens, response = await greedy(gw)
        assert tokens == patched_expected
        assert response.headers["X-Router-Version"] == "1"

        listing = (await gw.get("/routers", headers=AUTH)).json()
        assert listing["active"] == 1
        assert [(v["version"], v["active"]) for v in listing["data"]] == [(0, False), (1, True)]
        assert (await gw.get("/routers/active", headers=AUTH)).json()["version"] == 1

        rolled = await gw.post("/routers/0/activate", headers=AUTH)
        assert rolled.status_code == 200, rolled.text
        tokens, response = await greedy(gw)
        assert tokens == base_expected
        assert response.headers["X-Router-Version"] == "0"

        forward = await gw.post("/routers/1/activate", headers=AUTH)
        assert forward.status_code == 200 and forward.json()["changed"]
        assert (await greedy(gw))[0] == patched_expected

        # The same bytes again: the existing version, nothing new stored.
        again = await gw.post("/routers", headers=AUTH, content=patch)
        assert again.status_code == 200 and again.json()["version"] == 1
        assert not again.json()["created"] and not again.json()["changed"]
        history = (await gw.get("/routers/history", headers=AUTH)).json()["data"]
        assert [(h["version"], h["previous"]) for h in history] == [(1, 0), (0, 1), (1, 0)]


async def test_streaming_passes_through_and_carries_the_version(
    engine_url: str, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
        await gw.post(
            "/routers",
            headers=AUTH,
            content=patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=2),
        )
        expected, _ = await greedy(gw, n=12)
        request = {
            "model": await model_id(gw),
            "prompt": PROMPT_IDS,
            "max_tokens": 12,
            "min_tokens": 12,
            "temperature": 0.0,
            "stream": True,
            "return_token_ids": True,
        }
        async with gw.stream("POST", "/v1/completions", json=request) as response:
            assert response.status_code == 200
            assert response.headers["X-Router-Version"] == "1"
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in response.aiter_lines() if line]
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert len(data) >= 12  # one event per token: nothing was buffered into one blob
        assert ": x-router-version 1" in lines
        assert not any("x-router-version-changed" in line for line in lines)
        chunks = [json.loads(line.removeprefix("data: ")) for line in data[:-1]]
        streamed = [t for chunk in chunks for t in chunk["choices"][0]["token_ids"]]
        assert streamed == expected


async def test_a_stream_cut_short_is_no_longer_in_flight(
    engine_url: str, redis_server: LocalRedis, redis_prefix: str
) -> None:
    """A client that hangs up mid-stream: the gateway drops its upstream connection and stops
    counting the request against the engine; the next request is served as usual."""
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
        engine = gw.app.state.gateway.pool.engines[0]  # type: ignore[attr-defined]
        request = {
            "model": await model_id(gw),
            "prompt": PROMPT_IDS,
            "max_tokens": 400,
            "min_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        # The engine holds the request before its first token (an idle machine generates 400
        # tokens before the client reads one): the stream has begun (headers) and stays open.
        async with EngineClient(engine_url) as client:
            await client.pause("keep")
            try:
                async with gw.stream("POST", "/v1/completions", json=request) as response:
                    assert response.status_code == 200
                    assert engine.inflight == 1 and sum(engine.sending.values()) == 1
                    # leaving the block closes the connection with the stream unread
            finally:
                await client.resume()
        for _ in range(200):
            if engine.inflight == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.inflight == 0 and sum(engine.sending.values()) == 0
        tokens, _ = await greedy(gw)
        assert len(tokens) == 8


async def test_openai_client_works_unchanged(
    engine_url: str, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
        client = openai.AsyncOpenAI(base_url=f"{gw.base_url}/v1", api_key="unused")
        try:
            models = await client.models.list()
            model = models.data[0].id
            raw = await client.completions.with_raw_response.create(
                model=model, prompt="The quick brown", max_tokens=5, temperature=0.0
            )
            assert raw.headers["X-Router-Version"] == "0"
            completion = raw.parse()
            assert completion.choices[0].text and completion.usage.completion_tokens == 5
            stream = await client.completions.create(
                model=model, prompt="The quick brown", max_tokens=5, temperature=0.0, stream=True
            )
            text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
            assert text == completion.choices[0].text
        finally:
            await client.close()


async def test_metrics_count_requests_and_deploys_per_version(
    engine_url: str, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
        await greedy(gw)
        await gw.post(
            "/routers",
            headers=AUTH,
            content=patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=3),
        )
        await greedy(gw)
        text = (await gw.get("/metrics")).text
        for version in (0, 1):
            labels = f'route="completions",router_version="{version}",status="200"'
            assert f"roma_requests_total{{{labels}}} 1.0" in text
        assert 'roma_deploys_total{kind="deploy",outcome="ok"} 1.0' in text
        assert f'roma_engine_router_version{{engine="{engine_url}"}} 1.0' in text
        assert "roma_active_router_version 1.0" in text
        assert 'roma_deploy_latency_seconds_count{phase="apply"} 1.0' in text
        assert "roma_expert_tokens_total{" not in text  # off unless ROMA_EXPERT_LOAD_INTERVAL_S


def _expert_load(text: str) -> tuple[dict, dict]:
    """(router tokens {(version, layer): n}, expert tokens {(version, layer, expert): n})."""
    from prometheus_client.parser import text_string_to_metric_families

    routers, experts = {}, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "roma_router_tokens_total":
                routers[labels["router_version"], labels["layer"]] = sample.value
            elif sample.name == "roma_expert_tokens_total":
                key = (labels["router_version"], labels["layer"], labels["expert"])
                experts[key] = sample.value
    return routers, experts


async def test_expert_load_is_exported_per_layer_and_router_version(
    engine_url: str, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    from roma_service.engine.client import EngineClient

    # Prompts no earlier test sent, so no prefix-cache hit hides tokens from the routers.
    rng = random.Random(f"expert-load/{redis_prefix}")
    prompts = [[rng.randrange(100, 380) for _ in range(n)] for n in (23, 17)]
    n_new = 4
    top_k = json.loads((tiny_olmoe / "config.json").read_text())["num_experts_per_tok"]
    # A long interval: the reads that matter are the deploy's and the one before the checks.
    settings = gateway_settings(redis_prefix, expert_load_interval_s=3600.0)
    try:
        async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
            exporter = gw.app.state.gateway.expert_load  # type: ignore[attr-defined]
            await greedy(gw, n_new, prompts[0])
            patch = patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=5)
            assert (await gw.post("/routers", headers=AUTH, content=patch)).status_code == 201
            before, _ = _expert_load((await gw.get("/metrics")).text)
            await greedy(gw, n_new, prompts[1])
            await exporter.collect(exporter.pool.engines)
            routers, experts = _expert_load((await gw.get("/metrics")).text)
    finally:
        async with EngineClient(engine_url) as client:
            await client.expert_load("disable")

    layers = {str(layer) for layer in ALL_LAYERS}
    # One prefill and n_new - 1 decode steps: every layer's router saw each token once. The
    # engine counts per version (the slot each request ran in), so the first request is booked
    # to version 0 whenever it is read (a single-version deploy reads before its swap, a slot
    # deploy does not read at all).
    for version, prompt in (("0", prompts[0]), ("1", prompts[1])):
        assert {layer for v, layer in routers if v == version} == layers
        for layer in layers:
            assert routers[version, layer] == len(prompt) + n_new - 1, (version, layer)
            picked = sum(n for (v, at, _), n in experts.items() if (v, at) == (version, layer))
            assert picked == top_k * routers[version, layer]
    assert not any(v == "1" for v, _ in before)  # nothing booked to 1 before it served
    # The patch moved the routers: the two versions' expert shares differ somewhere.
    assert any(experts.get(("0", at, e)) != experts.get(("1", at, e)) for _, at, e in experts)


async def test_deploy_lock_held_by_another_gateway_is_503_retry_later(
    engine_url: str, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    """A swap waits ``ROMA_DEPLOY_LOCK_TIMEOUT_S`` for the lock another gateway holds, then
    answers 503 ``deploy_in_progress`` with Retry-After; once the lock is free it gets past it."""
    settings = gateway_settings(redis_prefix, deploy_lock_timeout_s=0.3)
    other = Registry.from_url(redis_server.url, redis_prefix)
    try:
        async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
            await other.record_base(base_routers(tiny_olmoe))  # the same model's namespace
            async with other.deploy_lock(lease_s=30, wait_s=1):
                busy = await gw.post("/routers/0/activate", headers=AUTH)
            assert busy.status_code == 503, busy.text
            assert busy.json()["error"]["code"] == "deploy_in_progress"
            assert busy.headers["Retry-After"] == "5"
            free = await gw.post("/routers/0/activate", headers=AUTH)
            assert free.status_code == 200, free.text
    finally:
        await other.aclose()
