"""The engine module against a real vLLM engine on the CPU (tiny OLMoE, started once per session).

Each test leaves the engine on the base routers (version 0) when it is done.
"""

from __future__ import annotations

import pytest
import torch

from roma_patch import BaseRouters, read_checkpoint_routers, read_patch
from roma_service.engine.client import EngineClient
from roma_service.engine.errors import EngineRejected, EngineRPCFailed, EngineUnreachable
from tests.fixtures.engine import (
    RunningEngine,
    engine_greedy,
    hf_greedy,
    patch_bytes,
    perturbed_routers,
    prompt_ids,
    router_name,
)

pytestmark = pytest.mark.slow


async def test_base_routers_are_the_checkpoints(engine: RunningEngine) -> None:
    async with engine.client() as client:
        assert await client.healthy()
        base = await client.base_routers()
    checkpoint = read_checkpoint_routers(engine.model_dir)
    expected = BaseRouters.from_raw(str(engine.model_dir), checkpoint)
    assert base == expected


async def test_patched_outputs_equal_transformers_then_base_again(engine: RunningEngine) -> None:
    model_dir = engine.model_dir
    prompts = prompt_ids(model_dir)
    routers = perturbed_routers(model_dir)  # last 5 layers
    data = patch_bytes(model_dir, routers)
    base_hf = hf_greedy(model_dir, prompts)
    patched_hf = hf_greedy(model_dir, prompts, routers=routers)
    assert patched_hf != base_hf, "the patch must change greedy outputs for this test to mean much"

    async with engine.client() as client:
        assert engine_greedy(engine.url, model_dir, prompts) == base_hf

        result = await client.apply(data, 1)
        assert result.version == 1 and result.verified and result.workers == 1
        assert result.max_abs_err < 1e-3
        assert sorted(result.changed) == sorted(routers)
        patch = read_patch(data)
        for name, tensor in patch.tensors.items():
            assert result.checksums[name] == tensor.sha256
        assert engine_greedy(engine.url, model_dir, prompts) == patched_hf

        state = await client.state()
        assert state.version == 1 and state.verified and state.checksums == result.checksums

        base = await client.apply(None, 0)
        assert base.verified and base.version == 0
        assert base.checksums == await _base_checksums(engine)
        assert engine_greedy(engine.url, model_dir, prompts) == base_hf


BAD = {
    "wrong fingerprint": lambda d: patch_bytes(d, perturbed_routers(d, [5]), fingerprint="0" * 64),
    "unknown layer": lambda d: patch_bytes(d, {router_name(99): torch.zeros(8, 128)}),
    "wrong shape": lambda d: patch_bytes(d, {router_name(5): torch.zeros(4, 128)}),
    "wrong dtype": lambda d: patch_bytes(
        d, {n: t.to(torch.bfloat16) for n, t in perturbed_routers(d, [5]).items()}
    ),
    "NaN": lambda d: patch_bytes(d, {router_name(5): torch.full((8, 128), float("nan"))}),
    "not safetensors": lambda d: b"this is not a safetensors file at all",
    "pickle": lambda d: b"\x80\x04\x95" + b"\x00" * 64,
    "truncated": lambda d: patch_bytes(d, perturbed_routers(d, [5]))[:-100],
}


async def test_bad_patches_are_rejected_and_the_previous_version_keeps_serving(
    engine: RunningEngine,
) -> None:
    model_dir = engine.model_dir
    prompts = prompt_ids(model_dir)[:1]
    routers = perturbed_routers(model_dir, seed=7)
    async with engine.client() as client:
        good = await client.apply(patch_bytes(model_dir, routers), 3)
        expected = engine_greedy(engine.url, model_dir, prompts)
        assert expected == hf_greedy(model_dir, prompts, routers=routers)

        codes = {}
        for kind, make in BAD.items():
            with pytest.raises(EngineRejected) as err:
                await client.apply(make(model_dir), 4)
            codes[kind] = err.value.code
            state = await client.state()
            assert state.version == 3 and state.checksums == good.checksums and state.verified
        assert codes == {
            "wrong fingerprint": "fingerprint_mismatch",
            "unknown layer": "unknown_tensor",
            "wrong shape": "shape_mismatch",
            "wrong dtype": "dtype_mismatch",
            "NaN": "non_finite",
            "not safetensors": "not_safetensors",
            "pickle": "not_safetensors",
            "truncated": "truncated",
        }
        assert engine_greedy(engine.url, model_dir, prompts) == expected
        await client.apply(None, 0)


async def test_each_version_is_a_complete_state(engine: RunningEngine) -> None:
    """Going from a patch on layers 4+5 to one on layer 5 alone puts layer 4 back to base."""
    model_dir = engine.model_dir
    base = await _base_checksums(engine)
    both = perturbed_routers(model_dir, [4, 5], seed=2)
    only5 = perturbed_routers(model_dir, [5], seed=3)
    async with engine.client() as client:
        first = await client.apply(patch_bytes(model_dir, both), 5)
        assert first.checksums[router_name(4)] != base[router_name(4)]
        second = await client.apply(patch_bytes(model_dir, only5), 6)
        assert second.checksums[router_name(4)] == base[router_name(4)]
        assert second.checksums[router_name(5)] != first.checksums[router_name(5)]
        assert set(second.changed) == {router_name(4), router_name(5)}
        prompts = prompt_ids(model_dir)[:2]
        assert engine_greedy(engine.url, model_dir, prompts) == hf_greedy(
            model_dir, prompts, routers=only5
        )
        await client.apply(None, 0)


async def _base_checksums(engine: RunningEngine) -> dict[str, str]:
    async with engine.client() as client:
        return {n: s.sha256 for n, s in (await client.base_routers()).specs.items()}


async def test_expert_load_counts_match_transformers_routing(engine: RunningEngine) -> None:
    """The opt-in counters see exactly the experts transformers picks for the same prompt."""
    model_dir = engine.model_dir
    prompt = prompt_ids(model_dir, ["Paris is the capital of France. The sky is blue."])[0]
    routers = perturbed_routers(model_dir, seed=11)
    async with engine.client() as client:
        await client.apply(patch_bytes(model_dir, routers), 7)
        assert await client.reset_prefix_cache()  # a cached prefix would skip its tokens
        await client.expert_load("enable")
        await client.expert_load("reset")
        engine_greedy(engine.url, model_dir, [prompt], max_tokens=1)  # prefill only
        load = await client.expert_load("reset")
        await client.expert_load("disable")
        await client.apply(None, 0)

    from tests.fixtures.engine import _load_routers

    model = _load_routers(model_dir, routers)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_router_logits=True)
    assert load.enabled and load.version == 7 and set(load.versions) == {7}
    for layer, logits in enumerate(out.router_logits):
        chosen = logits.reshape(len(prompt), -1).topk(load.top_k, dim=-1).indices
        expected = torch.bincount(chosen.reshape(-1), minlength=logits.shape[-1]).tolist()
        for part in (load, load.versions[7]):
            assert part.tokens[router_name(layer)] == len(prompt)
            assert part.counts[router_name(layer)] == expected, f"layer {layer}"


async def test_pause_resume_and_prefix_cache(engine: RunningEngine) -> None:
    async with engine.client() as client:
        await client.pause("wait", timeout_s=30)
        assert await client.is_paused()
        await client.resume()
        assert not await client.is_paused()
        assert await client.reset_prefix_cache()


async def test_unreachable_engine_is_a_clear_error() -> None:
    async with EngineClient("http://127.0.0.1:9", timeout=2.0) as client:
        assert not await client.healthy()
        with pytest.raises(EngineUnreachable, match="unreachable"):
            await client.state()


async def test_engine_without_dev_mode_routes_is_a_clear_error(engine: RunningEngine) -> None:
    """A server that is not a dev-mode vLLM (here: the engine's OpenAI route misused as the
    base URL) answers 404; the client says what to check."""
    async with EngineClient(f"{engine.url}/v1") as client:
        with pytest.raises(EngineRPCFailed, match="VLLM_SERVER_DEV_MODE"):
            await client.state()
