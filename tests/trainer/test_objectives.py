"""Each objective's value equals its documented formula on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from roma_trainer import objectives


def test_choice_cross_entropy_is_softmax_over_choices_with_padding() -> None:
    scores = torch.tensor([[-1.0, -2.0, float("-inf")], [-3.0, -0.5, -4.0]])
    answers = torch.tensor([1, 1])
    first = -math.log(math.exp(-2.0) / (math.exp(-1.0) + math.exp(-2.0)))
    second = -math.log(math.exp(-0.5) / (math.exp(-3.0) + math.exp(-0.5) + math.exp(-4.0)))
    got = objectives.choice_cross_entropy(scores, answers)
    assert math.isclose(got.item(), (first + second) / 2, rel_tol=1e-6)


def test_manifold_term_matches_formula_and_detaches_neighbours() -> None:
    r = torch.tensor([[0.2, 0.8, 0.5, 0.5], [1.0, 0.0, 0.0, 1.0]], requires_grad=True)
    nb = torch.tensor(
        [
            [[0.0, 1.0, 0.5, 0.5], [1.0, 0.0, 0.0, 1.0]],
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],  # sample 2 has no neighbours
        ],
        requires_grad=True,
    )
    w = torch.tensor([[0.75, 0.25], [0.0, 0.0]])
    d0 = 0.75 * (0.2**2 + 0.2**2) + 0.25 * (0.8**2 + 0.8**2 + 0.5**2 + 0.5**2)
    got = objectives.manifold_term(r, nb, w)
    assert math.isclose(got.item(), d0 / 2, rel_tol=1e-6)
    got.backward()
    assert nb.grad is None
    assert r.grad is not None and r.grad[0].abs().sum() > 0
    assert r.grad[1].abs().sum() == 0

    # Live neighbours: the same value, and the gradient now reaches them too.
    live = objectives.manifold_term(r, nb, w, detach_neighbours=False)
    assert math.isclose(live.item(), d0 / 2, rel_tol=1e-6)
    live.backward()
    assert nb.grad is not None and nb.grad[0].abs().sum() > 0


def test_l1_and_l2_pull_toward_base() -> None:
    w = [torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5]])]
    base = [torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0]])]
    assert objectives.l1_term(w, base).item() == 1.0 + 2.0 + 0.5
    assert objectives.l2_term(w, base).item() == 1.0 + 4.0 + 0.25
    assert objectives.l2_term(base, base).item() == 0.0


def test_entropy_is_mean_over_samples_and_layers() -> None:
    uniform = torch.full((4,), 0.25)
    onehot = torch.tensor([1.0, 0.0, 0.0, 0.0])
    routing = torch.stack([torch.stack([uniform, onehot]), torch.stack([uniform, uniform])])
    expected = (math.log(4) + 0.0 + math.log(4) + math.log(4)) / 4
    assert math.isclose(objectives.entropy_term(routing).item(), expected, rel_tol=1e-6)
    # Minimising it sharpens: the gradient step lowers the entropy of a soft distribution.
    logits = torch.tensor([[[0.3, 0.1, 0.0, -0.2]]], requires_grad=True)
    h0 = objectives.entropy_term(torch.softmax(logits, -1))
    h0.backward()
    with torch.no_grad():
        h1 = objectives.entropy_term(torch.softmax(logits - 0.5 * logits.grad, -1))
    assert h1 < h0


def test_registry_entries_compute_their_formulas_from_terms() -> None:
    w, base = [torch.tensor([[1.0, -2.0]])], [torch.tensor([[0.0, 0.0]])]
    routing = torch.softmax(torch.tensor([[[0.3, 0.1, 0.0, -0.2]]]), -1)
    terms = objectives.Terms("x", w, base, routing, routing.flatten(1)[:, None], torch.ones(1, 1))
    registry = objectives.REGISTRY
    assert registry["l1"].term(terms).item() == objectives.l1_term(w, base).item() == 3.0
    assert registry["l2"].term(terms).item() == objectives.l2_term(w, base).item() == 5.0
    assert registry["entropy"].term(terms).item() == objectives.entropy_term(routing).item()
    assert registry["manifold"].term(terms).item() == 0.0  # its only neighbour routes alike
    assert registry["ce"].term is None
    assert [n for n, o in registry.items() if o.routing] == ["manifold", "entropy"]
    assert [n for n, o in registry.items() if o.neighbours] == ["manifold"]


def test_a_term_reading_what_its_entry_did_not_ask_for_is_told_so() -> None:
    terms = objectives.Terms("mine", [], [])
    with pytest.raises(ValueError, match="objective 'mine' reads routing: register it routing="):
        _ = terms.routing
    with pytest.raises(ValueError, match="reads neighbours: register it neighbours=True"):
        _ = terms.neighbour_routing


def test_names_are_unique_and_unknown_names_list_the_choices() -> None:
    with pytest.raises(ValueError, match="'l1' is already registered"):
        objectives.register("l1", None, "again")
    with pytest.raises(ValueError, match="unknown objective 'magic': choose one of manifold"):
        objectives.get("magic")
