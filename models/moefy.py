"""MoEfication: split the FFNs of a dense Llama-style model into experts of a Qwen2-MoE model.

In each MoE layer the dense FFN's intermediate neurons are divided into a shared expert (the
neurons that contribute most on calibration text, always on) and ``num_experts`` routed experts
of equal size (balanced k-means on the rows of the gate projection, so neurons that respond to
similar inputs share an expert). The layers below stay dense (``mlp_only_layers``), so the model
is the dense model wherever no router acts.

Qwen2-MoE computes ``y = sum_{e in topk} p_e E_e(x) + sigmoid(g . x) S(x)`` with ``p =
softmax(router logits)`` over all experts (``norm_topk_prob: false``). The checkpoint is scaled
so that running every expert gives back the dense FFN:

* shared expert: ``shared_expert_gate`` is zero, so its sigmoid is exactly 0.5, and the shared
  down-projection is doubled (the gate has no bias that could saturate the sigmoid instead);
* routed experts: the down-projections are multiplied by ``num_experts`` and the router rows
  are scaled by a power of two that keeps every logit small, so ``p_e`` stays near
  ``1/num_experts``: each chosen expert then adds about its own neurons' dense contribution,
  and all of them add about the whole FFN. Powers of two scale floats exactly, and the top-k
  choice depends only on the order of the logits, which scaling keeps.

How small is a trade-off (:data:`ROUTER_LOGIT_BOUND_LOG2`). The smaller the logits, the closer
"all experts on" is to the dense model; but both transformers and vLLM pick the top-k on the
float32 softmax, whose values near ``1/E`` are ``~1e-7 / E`` apart, so logits closer than ~1e-7
become exact ties, broken differently by each library (and a patch served by vLLM would then
not score as it does in transformers). Measured on SmolLM2 (docs/real-model.md): with logits
below 2^-12, 3.8 % of (token, layer) top-k choices were exact ties and vLLM's log-probs differed
from transformers' by up to 1.4; below 2^-4 none were, vLLM matched to 7e-5, and all experts on
stays within 0.23 of the dense log-prob of a choice (same accuracy on every task).

The q/k/v biases Qwen2-MoE has (and vLLM always creates) are stored as zeros: Llama has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

# Largest |router logit| (over the calibration tokens) after scaling. 2^-4 keeps every p_e
# within ~6 % of 1/num_experts and the top-k choices free of float32 softmax ties (see the
# module docstring); 2^-12 would make all experts on equal the dense FFN to ~1e-5, but ties
# every few dozen tokens.
ROUTER_LOGIT_BOUND_LOG2 = -4


@dataclass(frozen=True)
class MoeShape:
    """Where the MoE layers are and how each one is cut."""

    moe_layers: int  # the top this many layers become MoE; the rest stay dense
    shared_size: int  # FFN neurons in the shared expert
    num_experts: int  # routed experts (equal size)
    top_k: int  # routed experts run per token

    def expert_size(self, intermediate_size: int) -> int:
        routed = intermediate_size - self.shared_size
        if routed <= 0 or routed % self.num_experts:
            raise ValueError(
                f"{intermediate_size} FFN neurons minus {self.shared_size} shared do not split "
                f"into {self.num_experts} equal experts"
            )
        return routed // self.num_experts

    def layers(self, num_hidden_layers: int) -> list[int]:
        if not 1 <= self.moe_layers <= num_hidden_layers:
            raise ValueError(f"moe_layers must be in 1..{num_hidden_layers}")
        return list(range(num_hidden_layers - self.moe_layers, num_hidden_layers))


@dataclass
class LayerSplit:
    """Which dense FFN neurons go where, in one MoE layer."""

    shared: torch.Tensor  # [shared_size] neuron indices
    experts: torch.Tensor  # [num_experts, expert_size] neuron indices


def ffn_activations(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(gate(x)) * up(x)``: each intermediate neuron's value, ``[tokens, intermediate]``."""
    return F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)


def neuron_importance(mlp: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Mean size of each neuron's contribution to the output: ``E|a_i| * ||down[:, i]||``."""
    total = torch.zeros(mlp.down_proj.weight.shape[1])
    for start in range(0, len(x), chunk):
        total += ffn_activations(mlp, x[start : start + chunk]).abs().sum(0)
    return total / len(x) * mlp.down_proj.weight.norm(dim=0)


def balanced_kmeans(
    points: torch.Tensor, n_clusters: int, seed: int = 0, iterations: int = 10
) -> torch.Tensor:
    """k-means whose clusters all have ``len(points) / n_clusters`` members.

    Lloyd's iterations with the assignment step solved exactly under the size constraint (a
    linear assignment of points to ``size`` copies of each centroid). Returns the member
    indices, ``[n_clusters, size]``, each row sorted.
    """
    n = len(points)
    size = n // n_clusters
    data = points.double().numpy()
    rng = np.random.default_rng(seed)
    centroids = data[rng.choice(n, n_clusters, replace=False)]
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        distance = ((data[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # [n, clusters]
        rows, slots = linear_sum_assignment(np.repeat(distance, size, axis=1))
        new_labels = np.empty(n, dtype=np.int64)
        new_labels[rows] = slots // size
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centroids = np.stack([data[labels == c].mean(0) for c in range(n_clusters)])
    members = [np.sort(np.flatnonzero(labels == c)) for c in range(n_clusters)]
    return torch.from_numpy(np.stack(members))


def split_layer(mlp: nn.Module, x: torch.Tensor, shape: MoeShape, seed: int = 0) -> LayerSplit:
    """Shared expert = the most important neurons on ``x``; the rest by balanced k-means."""
    intermediate = mlp.gate_proj.weight.shape[0]
    shape.expert_size(intermediate)  # validates the cut
    order = torch.argsort(neuron_importance(mlp, x), descending=True)
    shared = torch.sort(order[: shape.shared_size]).values
    routed = torch.sort(order[shape.shared_size :]).values
    clusters = balanced_kmeans(mlp.gate_proj.weight[routed].detach(), shape.num_experts, seed)
    return LayerSplit(shared=shared, experts=routed[clusters])


def initial_router(mlp: nn.Module, split: LayerSplit) -> torch.Tensor:
    """Router rows = the mean gate row of each expert: the logit is the mean pre-activation."""
    return mlp.gate_proj.weight.detach()[split.experts].mean(1)


def router_scale(
    router: torch.Tensor, x: torch.Tensor, bound_log2: int = ROUTER_LOGIT_BOUND_LOG2
) -> float:
    """The power of two that brings the largest |logit| on ``x`` to at most 2^bound_log2."""
    peak = (x @ router.T).abs().max().item()
    return 2.0 ** (bound_log2 - math.ceil(math.log2(peak)))


def top_k_ties(router: torch.Tensor, x: torch.Tensor, top_k: int) -> int:
    """Tokens of ``x`` whose k-th and (k+1)-th routing probabilities are equal in float32, as
    Qwen2-MoE computes them (softmax, then top-k): which expert runs is then up to each
    library's tie-breaking."""
    if top_k >= router.shape[0]:
        return 0
    probs = torch.softmax((x @ router.T).float(), dim=-1)
    top = probs.topk(top_k + 1, dim=-1).values
    return int((top[:, top_k - 1] == top[:, top_k]).sum())


def qwen2_moe_config(dense_config, shape: MoeShape):  # -> Qwen2MoeConfig
    """The Qwen2-MoE config holding a dense Llama config's model, MoE in the top layers."""
    from transformers import Qwen2MoeConfig

    layers = shape.layers(dense_config.num_hidden_layers)
    intermediate = dense_config.intermediate_size
    head_dim = getattr(dense_config, "head_dim", None)
    if head_dim not in (None, dense_config.hidden_size // dense_config.num_attention_heads):
        raise ValueError("Qwen2-MoE derives head_dim from hidden_size / num_attention_heads")
    return Qwen2MoeConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        rope_parameters=dict(dense_config.rope_parameters),
        use_sliding_window=False,
        decoder_sparse_step=1,
        mlp_only_layers=list(range(layers[0])),
        moe_intermediate_size=shape.expert_size(intermediate),
        shared_expert_intermediate_size=shape.shared_size,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=False,
        qkv_bias=True,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
    )


def _moe_block_state(
    prefix: str, mlp: nn.Module, split: LayerSplit, router: torch.Tensor, num_experts: int
) -> dict[str, torch.Tensor]:
    gate, up, down = (p.weight.detach() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    idx = split.experts
    return {
        f"{prefix}.gate.weight": router,
        f"{prefix}.experts.gate_up_proj": torch.cat([gate[idx], up[idx]], dim=1),
        f"{prefix}.experts.down_proj": down[:, idx].permute(1, 0, 2) * num_experts,
        f"{prefix}.shared_expert.gate_proj.weight": gate[split.shared],
        f"{prefix}.shared_expert.up_proj.weight": up[split.shared],
        f"{prefix}.shared_expert.down_proj.weight": down[:, split.shared] * 2.0,
        f"{prefix}.shared_expert_gate.weight": torch.zeros(1, gate.shape[1], dtype=gate.dtype),
    }


def assemble(
    dense: nn.Module,
    shape: MoeShape,
    splits: dict[int, LayerSplit],
    routers: dict[int, torch.Tensor],
):  # -> Qwen2MoeForCausalLM
    """The Qwen2-MoE model: ``dense``'s weights, its top FFNs cut by ``splits``, with the
    given (already scaled) router weights. Every parameter is set (strict load)."""
    from transformers import Qwen2MoeForCausalLM

    config = qwen2_moe_config(dense.config, shape)
    state = {
        name: tensor.detach()
        for name, tensor in dense.state_dict().items()
        if ".mlp." not in name or int(name.split(".")[2]) not in splits
    }
    for layer, split in splits.items():
        mlp = dense.model.layers[layer].mlp
        state |= _moe_block_state(
            f"model.layers.{layer}.mlp", mlp, split, routers[layer], shape.num_experts
        )
    for layer, block in enumerate(dense.model.layers):
        attn = block.self_attn
        for proj in ("q_proj", "k_proj", "v_proj"):
            rows = getattr(attn, proj).weight.shape[0]
            state[f"model.layers.{layer}.self_attn.{proj}.bias"] = torch.zeros(rows)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = Qwen2MoeForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"weights left unset: {missing}; not in the model: {unexpected}")
    return model.eval()
