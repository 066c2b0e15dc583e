"""Neighbour search on hand-made embeddings (knn, eps-ball, random, self-exclusion, kernel
weights), and the real MiniLM embedder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from roma_trainer.neighbours import embed, find_neighbours

# Five points on a line (already unit-free; the search does not renormalise).
POINTS = np.array([[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [1.0, 0.0], [3.0, 0.0]], dtype=np.float32)


def members(nb, i: int) -> list[int]:
    return [int(j) for j in nb.index[i] if j >= 0]


def test_knn_picks_nearest_members_of_s_and_never_itself() -> None:
    success = [0, 1, 2, 3]  # point 4 is not in S
    nb = find_neighbours(POINTS, success, "knn", k=2, sigma=1.0)
    # index refers to positions in `success`; here positions equal point ids.
    assert members(nb, 0) == [1, 2]
    assert members(nb, 1) == [0, 2]
    assert members(nb, 2) == [1, 0]
    assert members(nb, 3) == [2, 1]
    assert members(nb, 4) == [3, 2]  # not in S itself, still gets neighbours from S
    for i in range(5):
        assert i not in [success[j] for j in members(nb, i)] or i == 4


def test_index_points_into_success_order() -> None:
    success = [3, 0]  # positions: 0 -> point 3, 1 -> point 0
    nb = find_neighbours(POINTS, success, "knn", k=1, sigma=1.0)
    assert members(nb, 1) == [1]  # point 1's nearest in S is point 0, at position 1
    assert members(nb, 0) == [0]  # point 0 cannot pick itself: point 3 at position 0
    assert members(nb, 4) == [0]


def test_eps_ball_includes_exactly_the_points_within_eps() -> None:
    nb = find_neighbours(POINTS, [0, 1, 2, 3, 4], "eps", eps=0.35, sigma=1.0)
    assert sorted(members(nb, 0)) == [1, 2]
    assert sorted(members(nb, 2)) == [0, 1]
    assert members(nb, 3) == []  # nearest is 0.7 away
    assert members(nb, 4) == []
    assert nb.weight[3].sum() == 0 and nb.weight[4].sum() == 0
    assert nb.count().tolist() == [2, 2, 2, 0, 0]


def test_kernel_weights_are_gaussian_and_normalised() -> None:
    sigma = 0.2
    nb = find_neighbours(POINTS, [0, 1, 2, 3, 4], "knn", k=3, sigma=sigma)
    row = 0  # neighbours 1, 2, 3 at distances 0.1, 0.3, 1.0
    d = torch.tensor([0.1, 0.3, 1.0])
    expected = torch.exp(-(d**2) / (2 * sigma**2))
    expected = expected / expected.sum()
    assert members(nb, row) == [1, 2, 3]
    assert torch.allclose(nb.distance[row], d, atol=1e-6)
    assert torch.allclose(nb.weight[row], expected, atol=1e-6)
    assert torch.allclose(nb.weight.sum(1), torch.ones(5), atol=1e-6)
    assert nb.sigma == sigma


def test_tiny_sigma_does_not_underflow_to_nan() -> None:
    nb = find_neighbours(POINTS, [0, 1, 2, 3, 4], "knn", k=2, sigma=1e-4)
    assert torch.isfinite(nb.weight).all()
    assert nb.weight[0].tolist() == [1.0, 0.0]  # all mass on the nearest


def test_default_sigma_is_median_neighbour_distance() -> None:
    nb = find_neighbours(POINTS, [0, 1, 2, 3, 4], "knn", k=1)
    nearest = [0.1, 0.1, 0.2, 0.7, 2.0]
    assert math.isclose(nb.sigma, float(np.median(nearest)), rel_tol=1e-6)


def test_random_draws_k_members_of_s_excluding_self_and_depends_on_seed() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    success = list(range(0, 40, 2))
    a = find_neighbours(emb, success, "random", k=3, seed=1)
    b = find_neighbours(emb, success, "random", k=3, seed=2)
    knn = find_neighbours(emb, success, "knn", k=3)
    for i in range(40):
        picked = [success[j] for j in members(a, i)]
        assert len(picked) == 3 and len(set(picked)) == 3
        assert i not in picked
    assert not torch.equal(a.index, b.index)
    assert not torch.equal(a.index, knn.index)


def test_empty_success_set_means_no_neighbours() -> None:
    nb = find_neighbours(POINTS, [], "knn", k=3)
    assert nb.count().tolist() == [0] * 5
    assert nb.weight.sum() == 0


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="use knn, eps or random"):
        find_neighbours(POINTS, [0, 1], "cosine")


def test_minilm_embeddings_are_normalised_and_semantic() -> None:
    texts = [
        "What is the capital of France?",
        "Which city is the capital of France?",
        "What is 7 plus 5?",
    ]
    emb = embed(texts)
    assert emb.shape == (3, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    nb = find_neighbours(emb, [0, 1, 2], "knn", k=1)
    assert members(nb, 0) == [1]
    assert members(nb, 1) == [0]


def test_row_blocks_do_not_change_the_result() -> None:
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(23, 5))
    success = list(range(1, 23, 3))
    whole = find_neighbours(emb, success, "knn", k=4)
    blocked = find_neighbours(emb, success, "knn", k=4, block_rows=4)
    assert torch.equal(whole.index, blocked.index)
    assert torch.allclose(whole.weight, blocked.weight)
