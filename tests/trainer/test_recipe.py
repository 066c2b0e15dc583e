"""The training recipe on real tiny models and the real MiniLM embedder, for each family.

One short manifold run per family (module-scoped), then checks on what it produced: the loss
went down, only the tuned routers changed, the patch reproduces the trained logits exactly on
a fresh base model and is fingerprinted like the gateway will fingerprint the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from roma_patch import (
    BaseRouters,
    PatchError,
    detect_family,
    read_checkpoint_routers,
    read_patch,
    validate_patch,
)
from roma_trainer import objectives
from roma_trainer.apply import apply_patch
from roma_trainer.config import TrainConfig
from roma_trainer.data import data_fingerprint, load_jsonl
from roma_trainer.modeling import load_model
from roma_trainer.recipe import RomaRecipe

pytestmark = pytest.mark.slow  # every test here trains (seconds each on 2 cores)

SAMPLE_FILE = Path(__file__).parents[2] / "trainer" / "data" / "sample.jsonl"
PROBE = torch.tensor([[5, 17, 42, 99, 100, 7, 250, 3, 64, 12]])


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four samples of each task of the shipped sample file."""
    lines = SAMPLE_FILE.read_text().splitlines()
    by_task: dict[str, list[str]] = {}
    for line in lines:
        by_task.setdefault(json.loads(line)["task"], []).append(line)
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(line + "\n" for rows in by_task.values() for line in rows[:4]))
    return path


def config(model: Path, data: Path, out: Path, **changes) -> TrainConfig:
    values = dict(
        model=str(model), data=str(data), out=out, objective="manifold", lr=0.01,
        batch_size=4, epochs=2, lam=0.5, lam_warmup_steps=2, layers="last3", seed=0,
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)


def train(cfg: TrainConfig, keep_hooks: bool = False) -> RomaRecipe:
    recipe = RomaRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.save_checkpoint()
    if not keep_hooks:
        recipe.cleanup()
    return recipe


@pytest.fixture(scope="module")
def trained(
    tiny_model: Path, small_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> RomaRecipe:
    """Full-batch (12 samples a step, 4 epochs), constant lambda: the objective is the same
    function at every step, so "the loss went down" is a like-for-like comparison."""
    out = tmp_path_factory.mktemp("patch") / "manifold.safetensors"
    cfg = config(tiny_model, small_data, out, batch_size=12, epochs=4, lam_warmup_steps=0)
    recipe = train(cfg, keep_hooks=True)
    yield recipe
    recipe.cleanup()


def test_training_lowers_the_loss(trained: RomaRecipe) -> None:
    m = trained.metrics
    assert m["steps"] == 4
    with torch.no_grad():
        _, final = trained.loss(list(range(12)), trained.cfg.lam)
    assert final["loss"] < m["first_loss"] - 0.01, (final, m)
    assert m["success_set_size"] == round(m["train_acc_before"] * 12)
    assert m["mean_neighbours"] > 0


def test_only_tuned_routers_changed(trained: RomaRecipe, tiny_model: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = trained.model.state_dict()
    family = detect_family(trained.model.config)
    tuned = {family.tensor_name(layer) for layer in trained.layers}
    assert set(base) == set(after)
    for name, tensor in base.items():
        if name in tuned:
            assert not torch.equal(tensor, after[name]), f"{name} did not train"
        else:
            assert torch.equal(tensor, after[name]), f"{name} changed"
            assert tensor.dtype == after[name].dtype


def test_patch_on_fresh_base_model_reproduces_trained_logits(
    trained: RomaRecipe, tiny_model: Path
) -> None:
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        before = fresh(input_ids=PROBE).logits
        applied = apply_patch(fresh, trained.cfg.out, str(tiny_model))
        patched = fresh(input_ids=PROBE).logits
        expected = trained.model(input_ids=PROBE).logits
    assert applied.layers == trained.layers
    assert torch.equal(patched, expected)
    assert not torch.equal(before, expected)


def test_patch_holds_only_tuned_routers_and_full_metadata(
    trained: RomaRecipe, tiny_model: Path
) -> None:
    patch = read_patch(trained.cfg.out)
    family = detect_family(trained.model.config)
    names = sorted(family.tensor_name(layer) for layer in trained.layers)
    assert sorted(patch.tensors) == names
    assert all(t.dtype == "F32" for t in patch.tensors.values())
    checkpoint = BaseRouters.from_raw(str(tiny_model), read_checkpoint_routers(tiny_model))
    assert patch.meta.base_fingerprint == checkpoint.fingerprint(names)
    assert patch.meta.base_model == str(tiny_model)
    assert patch.meta.layers == trained.layers == list(trained.layers)
    assert patch.meta.objective == "manifold"
    assert patch.meta.data_fingerprint == data_fingerprint(load_jsonl(trained.cfg.data))
    assert patch.meta.hparams["lr"] == 0.01 and patch.meta.hparams["k"] == 3
    assert patch.meta.metrics["steps"] == 4
    assert patch.meta.created_at


def test_bad_patch_leaves_the_model_untouched(
    trained: RomaRecipe, tiny_model: Path, tmp_path: Path
) -> None:
    """A patch trained on other base routers is refused before anything is copied."""
    from roma_models.tiny import build_tiny_model

    other = AutoModelForCausalLM.from_pretrained(build_tiny_model("olmoe", tmp_path / "o", seed=3))
    snapshot = {n: t.clone() for n, t in other.state_dict().items()}
    with pytest.raises(PatchError) as info:
        apply_patch(other, trained.cfg.out)
    assert info.value.code == "fingerprint_mismatch"
    assert all(torch.equal(t, other.state_dict()[n]) for n, t in snapshot.items())


def test_manifold_and_ce_with_the_same_seed_give_different_patches(
    tiny_olmoe: Path, small_data: Path, tmp_path: Path
) -> None:
    runs = {}
    for objective in ("manifold", "ce"):
        cfg = config(
            tiny_olmoe,
            small_data,
            tmp_path / f"{objective}.safetensors",
            objective=objective,
            max_steps=2,
        )
        runs[objective] = read_patch(train(cfg).cfg.out).to_torch()
    assert runs["manifold"].keys() == runs["ce"].keys()
    assert any(not torch.equal(runs["manifold"][n], runs["ce"][n]) for n in runs["ce"])
    again = read_patch(train(config(tiny_olmoe, small_data, tmp_path / "again.safetensors",
                                     objective="ce", max_steps=2)).cfg.out).to_torch()  # fmt: skip
    assert all(torch.equal(again[n], runs["ce"][n]) for n in again), "same seed must reproduce"


@pytest.mark.parametrize(
    "changes",
    [
        {"objective": "l1"},
        {"objective": "l2"},
        {"objective": "entropy", "token": "first"},
        {"objective": "manifold", "neighbours": "random", "token": "middle"},
        {"objective": "manifold", "neighbours": "eps", "eps": 1.5, "layers": "all"},
    ],
    ids=["l1", "l2", "entropy", "random", "eps"],
)
def test_every_objective_trains_with_a_live_regulariser(
    tiny_olmoe: Path, small_data: Path, tmp_path: Path, changes: dict
) -> None:
    cfg = config(
        tiny_olmoe,
        small_data,
        tmp_path / "p.safetensors",
        max_steps=2,
        lam_warmup_steps=0,
        **changes,
    )
    recipe = RomaRecipe(cfg)
    recipe.setup()
    losses = [recipe.loss(list(range(i, i + 4)), cfg.lam)[1] for i in (0, 4)]
    recipe.train()
    recipe.save_checkpoint()
    recipe.cleanup()
    assert read_patch(cfg.out).meta.objective == cfg.objective
    if cfg.objective in ("l1", "l2"):
        # zero at the base weights, positive once the routers moved
        assert losses[0]["reg"] == 0.0
        assert recipe.loss([0, 1, 2, 3], cfg.lam)[1]["reg"] > 0
    else:
        assert all(part["reg"] > 0 for part in losses)
    if changes.get("layers") == "all":
        assert recipe.layers == [0, 1, 2, 3, 4, 5]


def test_an_objective_registered_here_trains_through_the_recipe(
    tiny_olmoe: Path, small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One register() line and its function, nothing else: the config accepts the name, the
    recipe captures routing and finds neighbours because the entry asks for them, and a step
    trains the routers with the term."""
    monkeypatch.setattr(objectives, "REGISTRY", dict(objectives.REGISTRY))  # dropped afterwards
    seen: list[objectives.Terms] = []

    def nearest_neighbour(terms: objectives.Terms) -> torch.Tensor:
        """||r_i - r_j||^2 to the first neighbour only."""
        seen.append(terms)
        return (terms.routing.flatten(1) - terms.neighbour_routing[:, 0]).pow(2).sum(-1).mean()

    objectives.register("nearest", nearest_neighbour, "toy: the first neighbour", neighbours=True)
    cfg = config(tiny_olmoe, small_data, tmp_path / "nearest.safetensors", objective="nearest",
                 max_steps=1, lam_warmup_steps=0, layers="last2", k=2)  # fmt: skip
    recipe = RomaRecipe(cfg)
    recipe.setup()
    try:
        assert recipe.neighbours is not None and recipe.metrics["mean_neighbours"] > 0
        _, parts = recipe.loss([0, 1, 2, 3], cfg.lam)
        terms = seen[-1]
        assert terms.routing.shape == (4, 2, 8) and terms.routing.requires_grad
        assert terms.neighbour_routing.shape == (4, 2, 16)
        assert parts["reg"] == pytest.approx(nearest_neighbour(terms).item())
        assert parts["reg"] > 0
        before = [p.detach().clone() for p in recipe.params]
        recipe.train()
        recipe.save_checkpoint()
    finally:
        recipe.cleanup()
    assert recipe.metrics["steps"] == 1
    assert all(not torch.equal(b, p) for b, p in zip(before, recipe.params, strict=True))
    assert read_patch(cfg.out).meta.objective == "nearest"


def test_live_neighbour_routing_starts_equal_to_base_and_trains_the_neighbours_too(
    tiny_olmoe: Path, small_data: Path, tmp_path: Path
) -> None:
    """At the base routers live r_j equal the stored base r_j, so the first loss is the same;
    after training they differ (the stored targets never move, live ones do)."""
    recipes = {}
    for mode in ("base", "live"):
        cfg = config(
            tiny_olmoe, small_data, tmp_path / f"{mode}.safetensors", max_steps=3,
            lam=5.0, lam_warmup_steps=0, neighbour_routing=mode,
        )  # fmt: skip
        recipe = RomaRecipe(cfg)
        recipe.setup()
        recipes[mode] = recipe
    try:
        idx = list(range(8))
        first = {m: r.loss(idx, 5.0)[1]["reg"] for m, r in recipes.items()}
        assert first["base"] > 0
        assert math.isclose(first["live"], first["base"], rel_tol=1e-4)
        live = recipes["live"]
        nb = live.neighbours.index[idx].clamp_min(0)
        live_before = live.live_routing(nb).detach()
        torch.testing.assert_close(live_before, live.success_routing[nb], rtol=1e-4, atol=1e-6)
        live.train()
        assert not torch.allclose(live.live_routing(nb).detach(), live_before, atol=1e-4)
    finally:
        for recipe in recipes.values():
            recipe.cleanup()


def test_deepseek_v3_round_trip(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path
) -> None:
    """V3 (sigmoid scoring, grouped top-k, e_score_correction_bias): same guarantees."""
    path = tiny_models["deepseek_v3"]
    recipe = train(
        config(path, small_data, tmp_path / "v3.safetensors", max_steps=2, layers="last2")
    )
    fresh = AutoModelForCausalLM.from_pretrained(path).eval()
    base_state = {n: t.clone() for n, t in fresh.state_dict().items()}
    with torch.no_grad():
        apply_patch(fresh, recipe.cfg.out, str(path))
        assert torch.equal(fresh(input_ids=PROBE).logits, recipe.model(input_ids=PROBE).logits)
    changed = {n for n, t in recipe.model.state_dict().items() if not torch.equal(t, base_state[n])}
    assert changed == {detect_family(fresh.config).tensor_name(layer) for layer in (4, 5)}


def test_bf16_checkpoint_gives_a_bf16_patch_with_the_checkpoint_fingerprint(
    tiny_olmoe: Path, small_data: Path, tmp_path: Path
) -> None:
    """Real MoE checkpoints are bf16: train in float32, store the patch in the base dtype."""
    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_olmoe).to(torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(tiny_olmoe).save_pretrained(bf16_dir)
    cfg = config(
        bf16_dir, small_data, tmp_path / "p.safetensors", objective="ce", max_steps=2, lr=0.05
    )
    recipe = train(cfg)
    assert recipe.model.dtype == torch.float32
    patch = read_patch(cfg.out)
    assert {t.dtype for t in patch.tensors.values()} == {"BF16"}
    checkpoint = BaseRouters.from_raw(str(bf16_dir), read_checkpoint_routers(bf16_dir))
    validate_patch(patch, checkpoint)
    served = load_model(bf16_dir).model  # loaded as stored: bf16
    apply_patch(served, patch)
    for layer, weight in zip(recipe.layers, recipe.params, strict=True):
        live = dict(served.named_parameters())[detect_family(served.config).tensor_name(layer)]
        assert live.dtype == torch.bfloat16
        assert torch.equal(live, weight.detach().to(torch.bfloat16))


def test_lambda_warmup_is_linear(tiny_olmoe: Path, small_data: Path, tmp_path: Path) -> None:
    recipe = RomaRecipe(config(tiny_olmoe, small_data, tmp_path / "p", lam=2.0, lam_warmup_steps=4))
    assert [recipe.lam_at(s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_an_eps_ball_that_reaches_no_neighbour_is_said(
    tiny_olmoe: Path, small_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """eps small enough that no sample has a successful neighbour: the run is the CE alone,
    and the log says so (with how to reach further); a reaching eps says nothing."""
    for eps, warned in ((1e-6, True), (1.9, False)):
        caplog.clear()
        cfg = config(tiny_olmoe, small_data, tmp_path / f"{eps}.safetensors",
                     neighbours="eps", eps=eps, max_steps=1)  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="roma_trainer.recipe"):
            recipe = RomaRecipe(cfg)
            recipe.setup()
            recipe.cleanup()
        said = [r.getMessage() for r in caplog.records if "no neighbour in S" in r.getMessage()]
        assert bool(said) == warned, said
        if warned:
            n = recipe.metrics["num_samples"]
            assert recipe.metrics["samples_without_neighbours"] == n
            assert f"{n} of {n} samples" in said[0] and "--eps" in said[0]
