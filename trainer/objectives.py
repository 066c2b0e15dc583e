"""The training objectives: one formula function each, and the registry the recipe, the config
and the CLI read them from.

Notation for a batch of B samples: s_ic = log p(choice c | prompt i) (sum over the choice's
tokens, :mod:`roma_trainer.scoring`), a_i the gold choice, r_i in R^{L*E} the routing weights of
sample i (softmax over all E experts at the chosen prompt token, for each of the L tuned
layers, concatenated), W^l the router weight of tuned layer l and W0^l its base value.

Every objective is ``CE + lam * regulariser``; the batch loss is the mean over samples of
L(i) (for the weight-space terms, which do not depend on i, the term is simply added once).

A new objective is one function ``Terms -> scalar tensor`` and one :func:`register` line; say
whether it reads the routing (the recipe then captures it) and the neighbours (the recipe then
finds the success set's neighbours and their routing). Nothing else names objectives: the
config's choices, ``roma-train train --help`` and the default YAML's comments come from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Terms:
    """What a regulariser may read for one batch. Routing and neighbours are there only for
    objectives registered with ``routing=True`` / ``neighbours=True``."""

    objective: str
    weights: Sequence[torch.Tensor]  # the tuned routers' live weights W^l
    base_weights: Sequence[torch.Tensor]  # their base values W0^l
    _routing: torch.Tensor | None = None
    _neighbour_routing: torch.Tensor | None = None
    _neighbour_weights: torch.Tensor | None = None
    neighbours_live: bool = False  # r_j under the routers being trained (with grad), not base

    @property
    def routing(self) -> torch.Tensor:
        """r_i per tuned layer, ``[B, L, E]``, with grad."""
        return self._need(self._routing, "routing")

    @property
    def neighbour_routing(self) -> torch.Tensor:
        """r_j of each sample's neighbours, ``[B, K, L*E]`` (padded slots: any value)."""
        return self._need(self._neighbour_routing, "neighbours")

    @property
    def neighbour_weights(self) -> torch.Tensor:
        """W_ij, ``[B, K]``; 0 for padded slots, so a sample without neighbours adds 0."""
        return self._need(self._neighbour_weights, "neighbours")

    def _need(self, value: torch.Tensor | None, flag: str) -> torch.Tensor:
        if value is None:
            raise ValueError(f"objective {self.objective!r} reads {flag}: register it {flag}=True")
        return value


Term = Callable[[Terms], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """A registered objective: ``CE + lam * term`` (``term`` None: CE alone, lam unused)."""

    name: str
    term: Term | None
    summary: str  # one line, for --help and the default config's comments
    routing: bool = False  # the term reads r_i: capture it in the forward pass
    neighbours: bool = False  # the term reads the neighbours N(i) and their routing r_j


REGISTRY: dict[str, Objective] = {}


def register(
    name: str, term: Term | None, summary: str, *, routing: bool = False, neighbours: bool = False
) -> Objective:
    """Add an objective; returns it. Neighbours imply routing (r_i is compared with r_j)."""
    if name in REGISTRY:
        raise ValueError(f"objective {name!r} is already registered")
    objective = Objective(name, term, summary, routing or neighbours, neighbours)
    REGISTRY[name] = objective
    return objective


def get(name: str) -> Objective:
    """The registered objective ``name``; ValueError naming the choices otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}: choose one of {' | '.join(REGISTRY)}")
    return REGISTRY[name]


def choice_cross_entropy(scores: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """CE = mean_i -log softmax_c(s_ic)[a_i].

    The choices' log-likelihoods are treated as logits of a classifier over the choices (absent
    choices are -inf, weight 0): this is the task loss on the gold choice, and unlike
    -s_{i,a_i} alone it also pushes the wrong choices down.
    """
    return F.cross_entropy(scores, answers)


def manifold_term(
    routing: torch.Tensor,
    neighbour_routing: torch.Tensor,
    weights: torch.Tensor,
    detach_neighbours: bool = True,
) -> torch.Tensor:
    """mean_i sum_{j in N(i)} W_ij ||r_i - r_j||^2.

    ``routing`` [B, D] (live, with grad); ``neighbour_routing`` [B, K, D]: fixed targets
    (detached here) or, with ``detach_neighbours=False``, live routing whose gradient moves the
    neighbours too; ``weights`` [B, K], 0 for padded slots, so a sample without neighbours
    contributes 0.
    """
    targets = neighbour_routing.detach() if detach_neighbours else neighbour_routing
    diff = routing[:, None, :] - targets
    return (weights * diff.pow(2).sum(-1)).sum(-1).mean()


def l1_term(weights: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_l ||W^l - W0^l||_1 (element-wise absolute sum): pulls routers back to base."""
    return sum((w.float() - b.float()).abs().sum() for w, b in zip(weights, base, strict=True))


def l2_term(weights: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_l ||W^l - W0^l||_2^2 (squared Frobenius norm): pulls routers back to base."""
    return sum((w.float() - b.float()).pow(2).sum() for w, b in zip(weights, base, strict=True))


def entropy_term(routing: torch.Tensor) -> torch.Tensor:
    """mean_i mean_l H(r_i^l), H(p) = -sum_e p_e log p_e, on ``routing`` [B, L, E].

    Added with a + sign, so minimising the loss *lowers* entropy, i.e. sharpens routing (the
    paper's entropy-regularisation baseline).
    """
    p = routing.clamp_min(1e-12)
    return -(routing * p.log()).sum(-1).mean()


register(
    "manifold",
    lambda t: manifold_term(
        t.routing.flatten(1),
        t.neighbour_routing,
        t.neighbour_weights,
        detach_neighbours=not t.neighbours_live,
    ),
    "RoMA: sum_j W_ij ||r_i - r_j||^2 over the successful neighbours j of sample i",
    neighbours=True,
)
register("ce", None, "CE alone (no regulariser; lam is unused)")
register("l1", lambda t: l1_term(t.weights, t.base_weights), "||W - W_base||_1 over tuned layers")
register("l2", lambda t: l2_term(t.weights, t.base_weights), "||W - W_base||_2^2 over tuned layers")
register("entropy", lambda t: entropy_term(t.routing), "mean routing entropy of r_i", routing=True)
