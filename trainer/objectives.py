"""The training objectives, one small function each; the formula is in each docstring.

Notation for a batch of B samples: s_ic = log p(choice c | prompt i) (sum over the choice's
tokens, :mod:`roma_trainer.scoring`), a_i the gold choice, r_i in R^{L*E} the routing weights of
sample i (softmax over all E experts at the chosen prompt token, for each of the L tuned
layers, concatenated), W^l the router weight of tuned layer l and W0^l its base value.

Every objective is ``CE + lam * regulariser``; the batch loss is the mean over samples of
L(i) (for the weight-space terms, which do not depend on i, the term is simply added once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

OBJECTIVES = ("manifold", "ce", "l1", "l2", "entropy")


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
