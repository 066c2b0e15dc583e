"""Router discovery, layer selection, freezing, live routing capture, and where the manifold
term's gradients go, for each family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from roma_patch import FAMILIES, detect_family
from roma_trainer import objectives
from roma_trainer.data import Sample
from roma_trainer.routers import (
    RouterError,
    RoutingCapture,
    find_routers,
    freeze_all_but_routers,
    model_routers,
    select_layers,
)
from roma_trainer.scoring import encode_pairs, score_samples, token_position

SAMPLES = [
    Sample("a", "Question: what is 2 + 3?\nAnswer:", (" 5", " 6", " 7"), 0),
    Sample("a", "The sky is", (" blue", " green"), 0),
    Sample("b", "Paris is the capital of", (" France", " Spain"), 0),
]
MOE_LAYERS = {
    "olmoe": [0, 1, 2, 3, 4, 5],
    "qwen3_moe": [0, 1, 2, 3, 4, 5],
    "qwen2_moe": [1, 2, 3, 4, 5],  # mlp_only_layers=[0]; shared_expert_gate is no router
    "deepseek_v2": [1, 2, 3, 4, 5],  # first_k_dense_replace=1: layer 0 is a dense MLP
    "deepseek_v3": [1, 2, 3, 4, 5],
}
ALL_FAMILIES = list(MOE_LAYERS)


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_find_routers_names_every_moe_layer(tiny_models: dict[str, Path], family: str) -> None:
    model, _ = load(tiny_models[family])
    routers = find_routers(model)
    assert list(routers) == MOE_LAYERS[family]
    naming = detect_family(model.config)
    assert naming is FAMILIES[family]
    params = dict(model.named_parameters())
    for layer, module in routers.items():
        assert params[naming.tensor_name(layer)] is module.weight
        assert module.weight.shape == (8, 128)
    weights = model_routers(model)
    assert list(weights) == [naming.tensor_name(layer) for layer in MOE_LAYERS[family]]
    assert all(weights[naming.tensor_name(layer)] is m.weight for layer, m in routers.items())
    assert list(model_routers(model, [5, 3])) == [naming.tensor_name(5), naming.tensor_name(3)]


def test_find_routers_refuses_a_dense_model() -> None:
    with pytest.raises(RouterError, match=r"no model\.layers\.N\.mlp\.gate"):
        find_routers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("all", [1, 2, 3, 4, 5]), ("last5", [1, 2, 3, 4, 5]), ("last2", [4, 5]),
     ("last9", [1, 2, 3, 4, 5]), ([5, 3, 3], [3, 5])],
)  # fmt: skip
def test_select_layers(spec, expected) -> None:
    assert select_layers([1, 2, 3, 4, 5], spec) == expected


@pytest.mark.parametrize(
    ("spec", "words"),
    [([0, 2], r"\[0\] have no router"), ("first2", "use 'all'"), ("last0", "N >= 1")],
)
def test_select_layers_errors(spec, words: str) -> None:
    with pytest.raises(RouterError, match=words):
        select_layers([1, 2, 3, 4, 5], spec)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_capture_equals_the_routers_own_logits(tiny_models: dict[str, Path], family: str) -> None:
    """r from the pre-hook == softmax of what each gate itself computes, at the chosen token."""
    model, tok = load(tiny_models[family])
    layers = find_routers(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _a, out, layer=layer: seen.__setitem__(layer, out[0]))
        for layer, m in layers.items()
    ]
    with RoutingCapture(model, list(layers)) as cap, torch.no_grad():
        scores = score_samples(model, tok, SAMPLES, "middle", cap)
    for h in handles:
        h.remove()
    pairs = [(s.prompt, c) for s in SAMPLES for c in s.choices]
    enc = encode_pairs(tok, pairs)
    width = enc.input_ids.shape[1]
    first_rows = [0, 3, 5]
    for i, layer in enumerate(layers):
        logits = seen[layer].reshape(-1, 8)
        for b, row in enumerate(first_rows):
            pos = token_position(enc, row, "middle")
            expected = torch.softmax(logits[row * width + pos].float(), -1)
            assert torch.allclose(scores.routing[b, i], expected, atol=1e-6)
    assert torch.allclose(scores.routing.sum(-1), torch.ones(3, len(layers)), atol=1e-6)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_manifold_term_alone_reaches_every_tuned_router_and_nothing_else(
    tiny_models: dict[str, Path], family: str
) -> None:
    model, tok = load(tiny_models[family])
    moe = MOE_LAYERS[family]
    tuned = moe[-3:]  # leave some routers untuned to see that they get nothing
    trainable = freeze_all_but_routers(model, tuned)
    assert [p.shape for p in trainable] == [(8, 128)] * 3
    with RoutingCapture(model, tuned) as cap:
        routing = score_samples(model, tok, SAMPLES, "last", cap).routing.flatten(1)
    # Neighbours: the other samples' routing under the same (base) routers, detached.
    neighbours = routing.detach()[[1, 2, 0]][:, None, :]
    objectives.manifold_term(routing, neighbours, torch.ones(3, 1)).backward()
    tuned_names = set(model_routers(model, tuned))
    for name, param in model.named_parameters():
        if name in tuned_names:
            assert param.requires_grad
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad, name
            assert param.grad is None, name


def test_capture_without_forward_is_an_error(tiny_olmoe: Path) -> None:
    model, _ = load(tiny_olmoe)
    with RoutingCapture(model, [5]) as cap, pytest.raises(RouterError, match="did the forward run"):
        cap.routing()
    assert not any(m._forward_pre_hooks for m in find_routers(model).values())
