"""The hidden-state cache: scoring and training from cached states equal the full model's
(every family, Qwen2-MoE with dense and sliding-window layers included), the cut sits exactly
at the first tuned layer, and the disk cache round-trips and is keyed by model and data.

Qwen2-MoE comes from this folder's conftest (dense layers, a shared expert, and alternating
sliding / full attention, so ``config.layer_types`` differs between the prefix and the suffix
and the cache runs one row per sequence there); the other families share prompts.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from roma_patch import read_patch
from roma_trainer.cli import app
from roma_trainer.config import TrainConfig
from roma_trainer.data import Sample, load_jsonl
from roma_trainer.hidden_cache import HiddenCache, only_layers, open_hidden_cache
from roma_trainer.recipe import RomaRecipe
from roma_trainer.routers import RoutingCapture, find_routers
from roma_trainer.scoring import encode_pairs, score_samples

SAMPLE_FILE = Path(__file__).parents[2] / "trainer" / "data" / "sample.jsonl"
TOL = 1e-5


@pytest.fixture(
    scope="session", params=["olmoe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "qwen2_moe"]
)
def family_model(
    request: pytest.FixtureRequest, tiny_models: dict[str, Path], tiny_qwen2_moe: Path
) -> Path:
    return tiny_qwen2_moe if request.param == "qwen2_moe" else tiny_models[request.param]


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return load_jsonl(SAMPLE_FILE)[:8]


def entering(model, layer: int, forward) -> torch.Tensor:
    """The hidden states entering ``layer`` while ``forward()`` runs (a pre-hook on it)."""
    seen = []
    handle = (
        model.get_decoder()
        .layers[layer]
        .register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
    )
    try:
        with torch.no_grad():
            forward()
    finally:
        handle.remove()
    return seen[-1]


def test_scores_and_routing_equal_the_full_model(family_model: Path, samples) -> None:
    model, tok = load(family_model)
    moe_layers = list(find_routers(model))
    for first in sorted({1, moe_layers[-2], moe_layers[-1]}):
        tuned = [layer for layer in moe_layers if layer >= first]
        cache = HiddenCache(model, first)
        with RoutingCapture(model, tuned) as capture, torch.no_grad():
            full = score_samples(model, tok, samples, "middle", capture)
            fill = score_samples(model, tok, samples, "middle", capture, cache)
            again = score_samples(model, tok, samples, "middle", capture, cache)
        for cached in (fill, again):
            torch.testing.assert_close(cached.logprob, full.logprob, atol=TOL, rtol=0)
            torch.testing.assert_close(cached.routing, full.routing, atol=TOL, rtol=0)
        assert cache.n_tokens > 0


def test_the_first_tuned_layer_gets_what_it_gets_in_the_full_model(tiny_qwen2_moe: Path) -> None:
    """Off by one either way would hand layer ``first`` the input of ``first - 1`` or ``+ 1``.
    (Qwen2-MoE here slides, so the cached forward keeps one row per sequence, as ``enc``.)"""
    model, tok = load(tiny_qwen2_moe)
    enc = encode_pairs(tok, [("The sky is", " blue"), ("Paris is", " the capital of France.")])
    real = enc.attention_mask.bool()
    cache = HiddenCache(model, 3)
    assert not cache.share

    def full() -> None:
        model.get_decoder()(input_ids=enc.input_ids, attention_mask=enc.attention_mask)

    cached = entering(model, 3, lambda: cache.last_hidden_state(enc))
    torch.testing.assert_close(cached[real], entering(model, 3, full)[real], atol=TOL, rtol=0)
    for other in (2, 4):
        assert not torch.allclose(cached[real], entering(model, other, full)[real], atol=1e-3)


def test_eager_attention_takes_the_shared_prompt_mask(
    tiny_models: dict[str, Path], samples
) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        tiny_models["deepseek_v2"], attn_implementation="eager"
    ).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["deepseek_v2"])
    cache = HiddenCache(model, 3)
    assert cache.share
    with torch.no_grad():
        full = score_samples(model, tok, samples).logprob
        cached = score_samples(model, tok, samples, cache=cache).logprob
    torch.testing.assert_close(cached, full, atol=TOL, rtol=0)


def test_the_first_tuned_layer_runs_live_and_the_layers_below_do_not(
    tiny_models: dict[str, Path], samples
) -> None:
    """After filling the cache, a change to layer ``first``'s router shows in the cached scores
    exactly as in the full model's; a change below ``first`` does not (the prefix is not run),
    which is why the cache is only valid while those layers are frozen."""
    model, tok = load(tiny_models["olmoe"])
    cache = HiddenCache(model, 4)
    routers = find_routers(model)
    with torch.no_grad():
        before = score_samples(model, tok, samples, cache=cache).logprob
        routers[4].weight.mul_(-1.0)
        full = score_samples(model, tok, samples).logprob
        cached = score_samples(model, tok, samples, cache=cache).logprob
        assert not torch.allclose(full, before, atol=1e-3)
        torch.testing.assert_close(cached, full, atol=TOL, rtol=0)

        routers[3].weight.mul_(-1.0)
        full_below = score_samples(model, tok, samples).logprob
        cached_below = score_samples(model, tok, samples, cache=cache).logprob
    assert not torch.allclose(full_below, full, atol=1e-3)
    torch.testing.assert_close(cached_below, cached, atol=0, rtol=0)


def test_only_layers_restores_the_model_after_an_error(tiny_qwen2_moe: Path) -> None:
    model, _ = load(tiny_qwen2_moe)
    decoder = model.get_decoder()
    layers, types = list(decoder.layers), list(model.config.layer_types)
    with pytest.raises(RuntimeError), only_layers(decoder, 3, None):
        assert list(decoder.layers) == layers[3:]
        assert model.config.layer_types == types[3:]
        raise RuntimeError("boom")
    assert list(decoder.layers) == layers
    assert model.config.layer_types == types


def test_no_cache_when_nothing_lies_below_the_first_layer(tiny_models, samples) -> None:
    model, tok = load(tiny_models["olmoe"])
    assert open_hidden_cache("memory", model, 0, tok, samples) is None
    assert open_hidden_cache("off", model, 3, tok, samples) is None
    with pytest.raises(ValueError, match="at least one layer"):
        HiddenCache(model, 0)


# ------------------------------------------------------------------------------ disk
def count_prefix_runs(model) -> list[int]:
    runs: list[int] = []
    model.get_decoder().layers[0].register_forward_pre_hook(lambda *_: runs.append(1))
    return runs


def test_disk_cache_round_trips(tiny_models: dict[str, Path], samples, tmp_path: Path) -> None:
    model, tok = load(tiny_models["deepseek_v3"])
    first = cache = open_hidden_cache("disk", model, 4, tok, samples, tmp_path)
    assert cache is not None and cache.path is not None and not cache.path.exists()
    with torch.no_grad():
        full = score_samples(model, tok, samples).logprob
        score_samples(model, tok, samples, cache=cache)
    cache.save()
    assert cache.path.is_file() and cache.path.parent == tmp_path

    fresh, _ = load(tiny_models["deepseek_v3"])
    runs = count_prefix_runs(fresh)
    loaded = open_hidden_cache("disk", fresh, 4, tok, samples, tmp_path)
    assert loaded is not None and loaded.path == first.path
    assert loaded.prompts.keys() == first.prompts.keys()
    assert loaded.choices.keys() == first.choices.keys()
    assert all(torch.equal(loaded.choices[k], v) for k, v in first.choices.items())
    with torch.no_grad():
        cached = score_samples(fresh, tok, samples, cache=loaded).logprob
    assert runs == [], "a loaded cache must not run the layers below it"
    torch.testing.assert_close(cached, full, atol=TOL, rtol=0)


def test_disk_cache_is_keyed_by_model_data_and_layer(
    tiny_models: dict[str, Path], samples, tmp_path: Path
) -> None:
    model, tok = load(tiny_models["olmoe"])
    cache = open_hidden_cache("disk", model, 4, tok, samples, tmp_path)
    with torch.no_grad():
        score_samples(model, tok, samples, cache=cache)
    cache.save()

    def path(model=model, data=samples, layer=4) -> Path:
        return open_hidden_cache("disk", model, layer, tok, data, tmp_path).path

    routers = find_routers(model)
    with torch.no_grad():
        routers[5].weight.add_(1.0)  # a tuned router (at or above the cut): same prefix
    assert path() == cache.path
    assert open_hidden_cache("disk", model, 4, tok, samples, tmp_path).choices
    assert path(data=samples[:-1]) != cache.path
    assert path(layer=3) != cache.path
    with torch.no_grad():
        routers[3].weight.add_(1.0)  # below the cut: the cached states are stale
    stale = open_hidden_cache("disk", model, 4, tok, samples, tmp_path)
    assert stale.path != cache.path and not stale.choices


@pytest.mark.parametrize("content", ["other-format", "damaged"])
def test_a_file_it_did_not_write_is_ignored_and_replaced(
    tiny_models, samples, tmp_path: Path, content: str
) -> None:
    from safetensors.torch import save_file

    model, tok = load(tiny_models["olmoe"])
    path = open_hidden_cache("disk", model, 4, tok, samples, tmp_path).path
    if content == "damaged":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    else:
        save_file({"x": torch.zeros(1)}, path, metadata={"format": "something-else"})
    reopened = open_hidden_cache("disk", model, 4, tok, samples, tmp_path)
    assert not reopened.prompts and not reopened.choices
    with torch.no_grad():
        score_samples(model, tok, samples, cache=reopened)
    reopened.save()
    assert open_hidden_cache("disk", model, 4, tok, samples, tmp_path).choices


# ------------------------------------------------------------------------------ training
STEP_RE = re.compile(r"step=(\d+) loss=(\S+) ce=(\S+) reg=(\S+)")


def run_recipe(model: Path, out: Path, mode: str, caplog, **changes) -> tuple[RomaRecipe, list]:
    # lr 0.01 (the default is 1e-3): AdamW divides by a gradient's running RMS, so where a
    # router gradient is near zero its float rounding can move a weight by up to about lr;
    # with lr 0.05 one weight of Qwen3-MoE's patch differed by 1.8e-5, with 0.01 by 1.2e-6.
    cfg = TrainConfig(
        model=str(model), data=str(SAMPLE_FILE), out=out, hidden_cache=mode, layers="last2",
        batch_size=4, max_steps=4, lr=0.01, lam=0.5, lam_warmup_steps=0, seed=0,
        hidden_cache_dir=out.parent / "hidden",
    ).model_copy(update=changes)  # fmt: skip
    caplog.clear()
    recipe = RomaRecipe(cfg)
    with caplog.at_level(logging.DEBUG, logger="roma_trainer.recipe"):
        try:
            recipe.setup()
            recipe.train()
            recipe.save_checkpoint()
        finally:
            recipe.cleanup()
    steps = [tuple(map(float, m.groups()[1:])) for m in map(STEP_RE.search, caplog.messages) if m]
    assert len(steps) == 4
    return recipe, steps


def assert_same_training(model: Path, tmp_path: Path, caplog, **changes) -> RomaRecipe:
    """Train with the cache off and on: same losses at every step, same metrics, same patch."""
    off, off_steps = run_recipe(model, tmp_path / "off.safetensors", "off", caplog, **changes)
    on, on_steps = run_recipe(model, tmp_path / "on.safetensors", "memory", caplog, **changes)
    assert off.cache is None
    assert on.cache is not None and on.cache.first_layer == min(on.layers)
    torch.testing.assert_close(torch.tensor(on_steps), torch.tensor(off_steps), atol=TOL, rtol=0)
    for key in ("train_acc_before", "train_acc_after", "train_ce_before", "train_ce_after"):
        assert on.metrics[key] == pytest.approx(off.metrics[key], abs=TOL), key
    patch_on = read_patch(on.cfg.out).to_torch()
    patch_off = read_patch(off.cfg.out).to_torch()
    assert patch_on.keys() == patch_off.keys()
    base = {n: t for n, t in load(model)[0].state_dict().items() if n in patch_on}
    for name in patch_off:
        torch.testing.assert_close(patch_on[name], patch_off[name], atol=TOL, rtol=0)
        assert not torch.equal(patch_off[name], base[name]), f"{name} did not train"
    return on


@pytest.mark.slow
def test_training_with_the_cache_equals_training_without(
    family_model: Path, tmp_path: Path, caplog
) -> None:
    """RoMA with live neighbour routing: the routing capture, the neighbours' extra forward and
    the success set's scoring all go through the cache."""
    on = assert_same_training(family_model, tmp_path, caplog, neighbour_routing="live")
    assert on.cache.first_layer == 4  # last2 of 6 layers


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "changes", "first"),
    [
        ("olmoe", {"objective": "entropy", "token": "first"}, 4),
        # layer 0 is dense; lr 0.002: with all layers, one AdamW weight with a near-zero
        # gradient moved 3.3e-5 apart at lr 0.01 (see run_recipe).
        ("deepseek_v3", {"objective": "ce", "layers": "all", "lr": 0.002}, 1),
    ],
    ids=["entropy", "ce-all-layers"],
)
def test_other_objectives_and_layers_train_the_same(
    tiny_models: dict[str, Path], tmp_path: Path, caplog, family: str, changes: dict, first: int
) -> None:
    on = assert_same_training(tiny_models[family], tmp_path, caplog, **changes)
    assert on.cache.first_layer == first


@pytest.mark.slow
def test_a_second_disk_run_skips_the_prefix_and_trains_the_same(
    tiny_models: dict[str, Path], tmp_path: Path, caplog
) -> None:
    model = tiny_models["qwen3_moe"]
    first, first_steps = run_recipe(model, tmp_path / "a.safetensors", "disk", caplog)
    path = first.cache.path
    assert path.is_file() and path.parent == tmp_path / "hidden"
    written = path.stat().st_mtime_ns
    second, second_steps = run_recipe(model, tmp_path / "b.safetensors", "disk", caplog)
    assert second.cache.path == path
    assert path.stat().st_mtime_ns == written, "nothing new to compute, so nothing rewritten"
    torch.testing.assert_close(
        torch.tensor(second_steps), torch.tensor(first_steps), atol=TOL, rtol=0
    )
    # The pool's base scores: scored by the first two runs (the first wrote the hidden states
    # while scoring), stored by the second, read by the third, which trains the same.
    assert not first.base_stored and not second.base_stored
    third, third_steps = run_recipe(model, tmp_path / "c.safetensors", "disk", caplog)
    assert third.base_stored
    assert third.metrics == second.metrics and third_steps == second_steps
    assert third.success == second.success
    torch.testing.assert_close(third.success_routing, second.success_routing, atol=0, rtol=0)
    patches = [read_patch(tmp_path / f"{n}.safetensors").to_torch() for n in "bc"]
    for name, tensor in patches[0].items():
        torch.testing.assert_close(patches[1][name], tensor, atol=0, rtol=0)
    # Another objective (no routing needed) reads the same file.
    ce, _ = run_recipe(model, tmp_path / "d.safetensors", "disk", caplog, objective="ce")
    assert ce.base_stored
    assert ce.metrics["success_set_size"] == second.metrics["success_set_size"]
    # Written by an objective that needs no routing, the file still serves one that does.
    for stored in tmp_path.glob("hidden/*-base-scores.safetensors"):
        stored.unlink()
    ce, _ = run_recipe(model, tmp_path / "e.safetensors", "disk", caplog, objective="ce")
    again, again_steps = run_recipe(model, tmp_path / "f.safetensors", "disk", caplog)
    assert not ce.base_stored and again.base_stored and again_steps == second_steps


# ------------------------------------------------------------------------------ eval
def write_test_patch(model_dir: Path, layers: list[int], out: Path) -> Path:
    """The base routers of ``layers`` negated: a valid patch that changes the scores."""
    from roma_patch import BaseRouters, PatchMeta, write_patch

    model, _ = load(model_dir)
    base = {f"model.layers.{i}.mlp.gate.weight": find_routers(model)[i].weight for i in layers}
    meta = PatchMeta(
        base_model=str(model_dir),
        base_fingerprint=BaseRouters.from_torch(str(model_dir), base).fingerprint(list(base)),
        layers=layers,
        objective="ce",
    )
    write_patch({n: -w.detach() for n, w in base.items()}, meta, out)
    return out


def test_eval_with_a_disk_cache_equals_eval_without(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """``roma-train eval --patch P --hidden-cache disk``: the same report, from a file under
    ``$ROMA_CACHE_DIR/hidden-states`` cut below the first patched layer; a second patch of
    the same layers reuses it."""
    model_dir = tiny_models["olmoe"]
    env = {"ROMA_CACHE_DIR": str(tmp_path / "state")}
    reports = {}
    for name, layers, mode in [
        ("plain", [4, 5], "off"), ("cached", [4, 5], "disk"), ("other", [5], "disk"),
        ("again", [4, 5], "disk"),
    ]:  # fmt: skip
        patch = write_test_patch(model_dir, layers, tmp_path / f"{name}.safetensors")
        out = tmp_path / f"{name}.json"
        result = CliRunner().invoke(
            app,
            ["eval", "--model", str(model_dir), "--data", str(SAMPLE_FILE), "--patch",
             str(patch), "--hidden-cache", mode, "--json", str(out)],
            env=env,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        reports[name] = json.loads(out.read_text())
        files = sorted(p.name for p in (tmp_path / "state" / "hidden-states").glob("*"))
        if name == "cached":
            assert len(files) == 1 and "-layer4-float32" in files[0], files
    assert len(files) == 2 and any("-layer5-" in f for f in files), files
    for name in ("cached", "again"):
        assert reports[name]["tasks"] == reports["plain"]["tasks"]


def test_eval_refuses_a_memory_cache(tiny_models: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_models["olmoe"]), "--data", str(SAMPLE_FILE),
              "--hidden-cache", "memory"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "use off or disk" in result.output


def test_train_refuses_an_unknown_cache_mode(tiny_models: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        app, ["train", "--model", str(tiny_models["olmoe"]), "--data", str(SAMPLE_FILE),
              "--hidden-cache", "ram"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "hidden_cache" in result.output
