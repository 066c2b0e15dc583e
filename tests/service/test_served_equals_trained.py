"""Served equals trained (issue 5): a patch made by the real trainer, pushed with the trainer's
own `--push` client to a real gateway in front of a real vLLM engine, scores the same through
the gateway's completions API as it does offline in transformers.

The first check runs on the tiny OLMoE (the session engine) and on the tiny Qwen2-MoE (its own
engine), the family of the MoEfied SmolLM2 (issue 14): dense lower layers, a shared expert with
its sigmoid gate, un-normalised top-k weights. The 135M model itself is too slow to build in CI;
``benchmarks/real_served_equals_trained.py`` runs the same comparison on it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from roma_models import bench_model_dir
from roma_patch import read_patch
from roma_service.registry import LocalRedis
from roma_trainer.apply import apply_patch
from roma_trainer.config import load_config
from roma_trainer.data import load_samples
from roma_trainer.evaluate import HFBackend, evaluate
from roma_trainer.evaluate_remote import CompletionsBackend, completion_payload, parse_choice
from roma_trainer.push import push_patch
from roma_trainer.recipe import run
from tests.fixtures.engine import spare_core, start
from tests.service.gateway_support import ADMIN_TOKEN, gateway_settings, running_gateway

pytestmark = pytest.mark.slow

SAMPLE_DATA = Path(__file__).parents[2] / "trainer" / "data" / "sample.jsonl"


def test_parse_choice_sums_the_continuation_and_checks_greedy() -> None:
    choice = {
        "index": 0,
        "logprobs": {
            "token_logprobs": [None, -1.0, -0.5, -0.25],
            "top_logprobs": [None, {"a": -1.0}, {"b": -0.1}, {"c": -0.25}],
        },
    }
    result = parse_choice(choice, prompt_len=4, n_cont=2)
    assert result.logprob == pytest.approx(-0.75)
    assert result.n_tokens == 2
    assert result.is_greedy is False  # token 2 lost to a -0.1 alternative
    assert completion_payload("m", [[1, 2]])["echo"] is True


@dataclass
class Served:
    model_dir: Path
    engine_url: str


@pytest.fixture(params=["olmoe", "qwen2_moe"])
def served(
    request: pytest.FixtureRequest,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """A tiny model of the family and a real engine serving it: the session engine for OLMoE
    (left on its base routers afterwards), an engine of its own for Qwen2-MoE."""
    model_dir = tiny_models[request.param]
    if request.param == "olmoe":
        engine = request.getfixturevalue("engine")
        try:
            yield Served(model_dir, engine.url)
        finally:
            engine.reset()
        return
    process = start(model_dir, tmp_path_factory.mktemp("qwen2-engine"), cpu_cores=spare_core())
    try:
        yield Served(model_dir, process.url)
    finally:
        process.stop()


async def test_trained_patch_scores_the_same_served_and_offline(
    served: Served, redis_server: LocalRedis, redis_prefix: str, tmp_path: Path
) -> None:
    model_dir, engine_url = served.model_dir, served.engine_url
    cfg = load_config(
        None,
        {
            "model": str(model_dir),
            "data": str(SAMPLE_DATA),
            "out": str(tmp_path / "patch.safetensors"),
            "objective": "manifold",
            "layers": "last2",
            "lr": 0.05,
            "epochs": 1,
            "seed": 0,
        },
    )
    patch_path = await asyncio.to_thread(run, cfg)
    patch = read_patch(patch_path)
    samples = load_samples(str(SAMPLE_DATA))[:18]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base_offline = evaluate(HFBackend(model, tokenizer), samples)
    apply_patch(model, patch_path, str(model_dir))
    offline_backend = HFBackend(model, tokenizer)
    offline = evaluate(offline_backend, samples)

    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
        url = str(gw.base_url)
        # Sync clients run in threads: the gateway serves from this same event loop.
        served_backend = await asyncio.to_thread(CompletionsBackend, url, tokenizer)
        base_served = await asyncio.to_thread(evaluate, served_backend, samples)
        answer = await asyncio.to_thread(push_patch, patch_path, url, ADMIN_TOKEN)
        assert answer["id"] == patch.id
        served_backend.router_versions.clear()
        served = await asyncio.to_thread(evaluate, served_backend, samples)
        assert served_backend.router_versions == {str(answer["version"])}

        requests = [(s.prompt, c) for s in samples for c in s.choices]
        remote_scores = await asyncio.to_thread(served_backend.loglikelihood, requests)
        served_backend.close()
    local_scores = offline_backend.loglikelihood(requests)

    # Per-choice log-likelihoods agree to float32 noise, so every argmax (accuracy) agrees too.
    for remote, local in zip(remote_scores, local_scores, strict=True):
        assert remote.n_tokens == local.n_tokens
        assert remote.logprob == pytest.approx(local.logprob, abs=1e-3, rel=1e-4)
    assert served.to_json() == offline.to_json()
    assert base_served.to_json() == base_offline.to_json()
    # The patch is really active on the served side: scores moved away from the base ones.
    base_scores = [
        r.logprob
        for r in HFBackend(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tokenizer
        ).loglikelihood(requests)
    ]
    assert max(abs(a - b.logprob) for a, b in zip(base_scores, remote_scores, strict=True)) > 1e-3


@pytest.fixture(scope="module")
def bench_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second real engine, on the benchmark model (the embedded default)."""
    process = start(
        bench_model_dir(), tmp_path_factory.mktemp("bench-engine-logs"), cpu_cores=spare_core()
    )
    try:
        yield process.url
    finally:
        process.stop()


async def test_benchmark_roma_patch_scores_the_same_served_and_offline(
    bench_engine: str, redis_server: LocalRedis, redis_prefix: str, tmp_path: Path
) -> None:
    """Issue 5 on the benchmark itself: a RoMA k-NN patch of the benchmark model, trained with
    the benchmark's settings on a slice of its pool, has the same test-split accuracy through
    the gateway as offline."""
    from roma_bench.protocol import METHODS
    from roma_bench.synthetic import tasks

    model_dir = bench_model_dir()
    data = tasks.write_splits(tmp_path / "data", seed=0, n_train=8, n_val=1, n_test=4)
    cfg = load_config(
        None,
        {
            "model": str(model_dir),
            "data": str(data["train"]),
            "out": str(tmp_path / "roma.safetensors"),
            "layers": "last5",
            "lr": 0.01,
            "lam": 1.0,
            "max_steps": 8,
            "epochs": 100,
            "batch_size": 16,
            "seed": 0,
            **METHODS["roma_knn"],
        },
    )
    patch_path = await asyncio.to_thread(run, cfg)
    test = load_samples(str(data["test"]))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    requests = [(s.prompt, c) for s in test for c in s.choices]
    base_scores = HFBackend(model, tokenizer).loglikelihood(requests)
    apply_patch(model, patch_path, str(model_dir))
    offline_backend = HFBackend(model, tokenizer)
    offline = evaluate(offline_backend, test)
    offline_scores = offline_backend.loglikelihood(requests)

    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [bench_engine]) as gw:
        url = str(gw.base_url)
        backend = await asyncio.to_thread(CompletionsBackend, url, tokenizer)
        answer = await asyncio.to_thread(push_patch, patch_path, url, ADMIN_TOKEN)
        backend.router_versions.clear()
        served = await asyncio.to_thread(evaluate, backend, test)
        served_scores = await asyncio.to_thread(backend.loglikelihood, requests)
        assert backend.router_versions == {str(answer["version"])}
        backend.close()

    assert served.to_json() == offline.to_json()
    for remote, local in zip(served_scores, offline_scores, strict=True):
        assert remote.logprob == pytest.approx(local.logprob, abs=1e-3, rel=1e-4)
    # The patch is really in effect: its scores moved away from the base model's.
    moved = max(
        abs(a.logprob - b.logprob) for a, b in zip(offline_scores, base_scores, strict=True)
    )
    assert moved > 1e-3


async def test_eval_cli_through_a_keyed_gateway_under_a_chosen_version(
    engine, redis_server: LocalRedis, redis_prefix: str, tmp_path: Path
) -> None:
    """`roma-train eval --gateway` sends the API key of a gateway that requires one and, with
    --router-version, scores under that resident version instead of the active one: version 0
    while a patch is active scores exactly as the base model offline."""
    import json

    from typer.testing import CliRunner

    from roma_trainer.cli import app
    from tests.fixtures.engine import patch_bytes

    model_dir = engine.model_dir
    samples = load_samples(str(SAMPLE_DATA))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base_offline = evaluate(HFBackend(model, AutoTokenizer.from_pretrained(model_dir)), samples)
    patch = tmp_path / "patch.safetensors"
    patch.write_bytes(patch_bytes(model_dir, scale=4.0, seed=11))

    def eval_cli(*args: str) -> tuple[int, str, dict]:
        out = tmp_path / "eval.json"
        out.unlink(missing_ok=True)
        result = CliRunner().invoke(
            app,
            ["eval", "--model", str(model_dir), "--data", str(SAMPLE_DATA), "--json", str(out),
             "--gateway", url, *args],
        )  # fmt: skip
        report = json.loads(out.read_text()) if out.exists() else {}
        return result.exit_code, result.output, report

    settings = gateway_settings(redis_prefix, api_keys=["client-key"])
    try:
        async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
            url = str(gw.base_url)
            answer = await asyncio.to_thread(push_patch, patch, url, ADMIN_TOKEN)
            code, output, _ = await asyncio.to_thread(eval_cli)
            assert code == 1 and "401" in output, output
            code, output, active = await asyncio.to_thread(eval_cli, "--api-key", "client-key")
            assert code == 0, output
            assert active["router_versions"] == [str(answer["version"])]
            code, output, base = await asyncio.to_thread(
                eval_cli, "--api-key", "client-key", "--router-version", "0"
            )
            assert code == 0, output
    finally:
        await asyncio.to_thread(engine.reset)
    assert base["router_versions"] == ["0"]
    assert base["tasks"] == base_offline.to_json()["tasks"]
    assert active["tasks"] != base["tasks"], "the patch changes some score for this to mean much"
