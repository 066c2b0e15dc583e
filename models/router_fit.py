"""Training the routers of a MoEfied model to reproduce its dense FFNs.

Calibration text is what the dense model itself writes: seeded samples from a fixed list of
prompts (chat requests and plain-text openings, as the benchmarks are plain text). Each MoE
layer's router is then trained on its own, router-only, on the dense model's FFN inputs at
that layer.

Since each chosen expert adds exactly its neurons' dense contribution ``c_e(x)`` (see
:mod:`roma_models.moefy`), the error of a choice ``S`` is ``|| sum_{e not in S} c_e(x) ||^2
= (1 - m)^T G (1 - m)`` with ``m`` the 0/1 mask of ``S`` and ``G = [<c_e, c_f>]`` the experts'
Gram matrix at ``x``, computed once per token. From it each token's best ``k`` experts are
found greedily, and the router learns to pick them (binary cross-entropy per expert) with a
Switch-style load-balancing term. Errors are reported relative to the dense output's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from roma_models.moefy import LayerSplit, ffn_activations

CHAT_PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a short story about a lost dog finding its way home.",
    "What are the main causes of climate change?",
    "Give me three tips for studying for an exam.",
    "Describe the water cycle to a ten-year-old.",
    "How does a bicycle stay upright?",
    "Write a polite email asking a neighbour to turn down their music.",
    "What is the difference between a virus and a bacterium?",
    "Summarise the plot of a classic fairy tale.",
    "How do I bake bread at home?",
    "Why do we have seasons on Earth?",
    "List some healthy breakfast ideas.",
    "What happens when you mix baking soda and vinegar?",
    "How should I prepare for a job interview?",
    "Explain what gravity is.",
    "Describe a busy market in the morning.",
    "What should I pack for a camping trip?",
    "How do plants make their food?",
    "Why is exercise good for the heart?",
    "Tell me about the history of the printing press.",
    "How can I calm down when I feel nervous?",
    "What is a food chain? Give an example.",
    "How do you clean a stain from a shirt?",
    "Write a short poem about the ocean.",
]
TEXT_PROMPTS = [
    "The best way to keep tomatoes fresh is",
    "Question: Why do leaves change colour in autumn?\nAnswer:",
    "Question: What tool is used to measure temperature?\nAnswer:",
    "How to change a flat tyre: First,",
    "She opened the door and saw that",
    "Metals conduct electricity because",
    "The children wanted to play outside, but",
    "Question: Which planet is closest to the Sun?\nAnswer:",
    "To make a paper airplane, you",
    "When he lost his keys, he",
    "The heart pumps blood through",
    "After the storm, the town",
    "Question: What do bees collect from flowers?\nAnswer:",
    "A good friend is someone who",
    "Ice floats on water because",
    "The man put on his coat because",
    "Goal: Keep bread from going stale.\nAnswer:",
    "In the kitchen, the chef",
    "Question: What gas do plants take in from the air?\nAnswer:",
    "Jordan forgot her lunch at home, so",
    "The volcano erupted and",
    "To remove rust from a bike chain,",
    "Question: How many legs does an insect have?\nAnswer:",
    "The students were nervous before the test because",
]


@torch.no_grad()
def generate_calibration(
    model: nn.Module,
    tokenizer,
    new_tokens: int = 96,
    samples_per_prompt: int = 2,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[int]]:
    """Token ids of prompt + what ``model`` samples after it (temperature 0.8, top-p 0.95),
    ``samples_per_prompt`` per prompt, seeded per batch so a run repeats exactly."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in CHAT_PROMPTS
    ] + TEXT_PROMPTS
    texts = [t for t in texts for _ in range(samples_per_prompt)]
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id
    sequences: list[list[int]] = []
    for batch, start in enumerate(range(0, len(texts), batch_size)):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        torch.manual_seed(seed * 1000 + batch)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=new_tokens,
            pad_token_id=pad,
        )
        for row, mask in zip(out, enc.attention_mask, strict=True):
            prompt_pad = int((mask == 0).sum())
            ids = row[prompt_pad:].tolist()
            while ids and ids[-1] == pad:  # sequences that stopped early are right-padded
                ids.pop()
            sequences.append(ids)
    return sequences


@torch.no_grad()
def ffn_inputs(
    model: nn.Module, sequences: Sequence[Sequence[int]], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """The input of each chosen layer's FFN (after its norm) at every calibration token."""
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = [
        model.model.layers[layer].mlp.register_forward_pre_hook(
            lambda _m, args, layer=layer: seen[layer].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for layer in layers
    ]
    try:
        for ids in sequences:
            model.model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(chunks) for layer, chunks in seen.items()}


@dataclass
class ExpertGram:
    """Per token: the routed experts' Gram matrix and the dense FFN output's squared norm."""

    gram: torch.Tensor  # [N, E, E]
    dense_sq: torch.Tensor  # [N]

    def error(self, mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Relative squared error, sum over tokens, of choosing ``mask`` ([N, E], 1 = on)."""
        gram = self.gram if rows is None else self.gram[rows]
        dense = self.dense_sq if rows is None else self.dense_sq[rows]
        off = 1.0 - mask
        return torch.einsum("be,bef,bf->", off, gram, off) / dense.sum()


@torch.no_grad()
def expert_gram(
    mlp: nn.Module, split: LayerSplit, x: torch.Tensor, chunk: int = 1024
) -> ExpertGram:
    down = mlp.down_proj.weight.detach()
    routed_down = down[:, split.experts]  # [H, E, size]
    grams, dense = [], []
    for start in range(0, len(x), chunk):
        act = ffn_activations(mlp, x[start : start + chunk])
        contrib = torch.einsum("nes,hes->neh", act[:, split.experts], routed_down)
        grams.append(contrib @ contrib.transpose(1, 2))
        dense.append((act @ down.T).pow(2).sum(-1))
    return ExpertGram(torch.cat(grams), torch.cat(dense))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1 at each row's ``k`` largest entries, 0 elsewhere."""
    return torch.zeros_like(scores).scatter(1, scores.topk(k, dim=1).indices, 1.0)


def best_experts(gram: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the ``k`` experts that best reproduce the dense output, chosen greedily:
    each step adds the expert whose inclusion lowers ``(1 - m)^T G (1 - m)`` the most, i.e.
    by ``2 (G (1 - m))_e - G_ee``. Returns the 0/1 mask, ``[N, E]``."""
    chosen = torch.zeros(gram.shape[:2])
    for _ in range(k):
        gain = 2 * torch.einsum("nef,nf->ne", gram, 1.0 - chosen)
        gain -= torch.diagonal(gram, dim1=1, dim2=2)
        gain[chosen.bool()] = float("-inf")
        chosen.scatter_(1, gain.argmax(1, keepdim=True), 1.0)
    return chosen


def balance_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's ``E * sum_e f_e P_e``: 1 when the load is even, up to E.

    ``f`` is the share of top-k slots each expert gets (no gradient), ``P`` the mean routing
    probability, taken on per-token standardised logits so it does not depend on their scale.
    """
    num_experts = logits.shape[1]
    share = mask.mean(0) / mask.sum(1).mean()
    return num_experts * (share * torch.softmax(_standardise(logits), dim=1).mean(0)).sum()


def _standardise(logits: torch.Tensor) -> torch.Tensor:
    """Per-token zero mean, unit spread (spread without gradient): the router's scale is free,
    only the order of its logits matters once deployed."""
    return (logits - logits.mean(1, keepdim=True)) / logits.std(1, keepdim=True).detach()


@dataclass
class RouterFit:
    weight: torch.Tensor  # [E, H], unscaled
    error_before: float  # relative squared error on held-out tokens, initial router
    error_after: float  # same, trained router
    error_best: float  # same, each token's best experts (greedy; what no router sees)
    load_max: float  # busiest expert's share of top-k slots / an even share, held-out tokens


def fit_router(
    x: torch.Tensor,
    gram: ExpertGram,
    init: torch.Tensor,
    top_k: int,
    steps: int = 1000,
    lr: float = 3e-3,
    balance: float = 0.01,
    sharpness: float = 2.0,
    batch: int = 1024,
    seed: int = 0,
) -> RouterFit:
    """Train one router (see the module docstring) on 90 % of the tokens; report on 10 %.

    The targets are each token's :func:`best_experts`; the router learns them as ``E``
    independent yes/no decisions (binary cross-entropy on its standardised logits times
    ``sharpness``), plus ``balance`` times :func:`balance_loss`.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    held = order[: max(1, len(x) // 10)]
    train = order[len(held) :]
    targets = best_experts(gram.gram, top_k)
    weight = nn.Parameter(init.clone() / init.norm(dim=1).mean())
    optimiser = torch.optim.Adam([weight], lr=lr)
    with torch.enable_grad():  # callers may build the model under no_grad
        for _ in range(steps):
            rows = train[torch.randint(len(train), (min(batch, len(train)),), generator=generator)]
            logits = x[rows] @ weight.T
            loss = F.binary_cross_entropy_with_logits(
                sharpness * _standardise(logits), targets[rows]
            )
            loss = loss + balance * balance_loss(logits, top_k_mask(logits.detach(), top_k))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        final = weight.detach()
        held_mask = top_k_mask(x[held] @ final.T, top_k)
        return RouterFit(
            weight=final,
            error_before=gram.error(top_k_mask(x[held] @ init.T, top_k), held).item(),
            error_after=gram.error(held_mask, held).item(),
            error_best=gram.error(targets[held], held).item(),
            load_max=(held_mask.mean(0).max() / top_k * len(final)).item(),
        )
