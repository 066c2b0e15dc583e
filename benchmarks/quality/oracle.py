"""The routing oracle: the best accuracy that re-routing one token can reach (C3PO-style).

For each test sample the router logits of the tuned layers at the chosen prompt token become
free variables, initialised at the base router's logits (a delta of 0 is added), and ``steps``
Adam steps minimise the gold answer's negative log-likelihood
``-sum_t log p(gold token t | prompt, earlier gold tokens)`` with the rest of the model frozen.
The sample is then scored with the optimised routing. Top-k selection is recomputed from the
moved logits on every forward, so the oracle may switch experts as well as re-weight them.

The delta of a sample is shared by all its choice sequences (they share the prompt, so the
routed token is the same). Adam is element-wise, so optimising a whole batch of samples at once
is exactly per-sample optimisation. The gold answer is used: this is an upper bound, not a
method. The hooks assume OLMoE/Qwen3's router output ``(logits, top-k weights, top-k
indices)`` (``OlmoeTopKRouter``), which the benchmark model has.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from roma_trainer.data import Sample
from roma_trainer.hidden_cache import HiddenCache
from roma_trainer.routers import find_routers
from roma_trainer.scoring import (
    Encoded,
    encode_pairs,
    max_length,
    score_encoded,
    token_position,
)


@dataclass
class OracleResult:
    correct: list[bool]  # per sample, after optimisation
    correct_before: list[bool]  # per sample, base routing
    gold_nll_before: float  # mean over samples
    gold_nll_after: float
    # Each sample's routing at its routed token, [samples, layers, experts]: the base routers'
    # and the optimised one (how far the oracle had to move it).
    routing_before: torch.Tensor | None = None
    routing_after: torch.Tensor | None = None


class _RoutingDelta:
    """Forward hooks that add ``delta[sample, layer]`` to the router logits of chosen rows, or,
    when ``target`` is set, make the routing of those rows exactly ``target[sample, layer]``
    (logits = log target, so softmax gives target back)."""

    def __init__(self, model: nn.Module, layers: Sequence[int]) -> None:
        self.routers = find_routers(model)
        self.layers = list(layers)
        self.rows: torch.Tensor | None = None  # flat (sequence, position) rows to move
        self.owner: torch.Tensor | None = None  # which sample each row belongs to
        self.delta: torch.Tensor | None = None  # [n_samples, n_layers, n_experts]
        self.target: torch.Tensor | None = None  # [n_samples, n_layers, n_experts], probs
        # slot -> the rows' logits before the delta is added: at the first forward (the base
        # model's) and at the latest (moved layers below change a layer's input).
        self.first_logits: dict[int, torch.Tensor] = {}
        self.last_logits: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _RoutingDelta:
        for slot, layer in enumerate(self.layers):
            self._handles.append(self.routers[layer].register_forward_hook(self._hook(slot)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, slot: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
            if self.delta is None and self.target is None:
                return output
            logits = output[0]
            self.last_logits[slot] = logits[self.rows].detach()
            self.first_logits.setdefault(slot, self.last_logits[slot])
            if self.target is not None:
                wanted = self.target[self.owner, slot].clamp_min(1e-12).log()
                logits = logits.index_put((self.rows,), wanted.to(logits.dtype))
            else:
                assert self.delta is not None
                shift = torch.zeros_like(logits)
                shift = shift.index_put((self.rows,), self.delta[self.owner, slot].to(logits.dtype))
                logits = logits + shift
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            top_value, top_index = torch.topk(probs, module.top_k, dim=-1)
            if getattr(module, "norm_topk_prob", False):
                top_value = top_value / top_value.sum(dim=-1, keepdim=True)
            return logits, top_value.to(logits.dtype), top_index

        return hook


def _encode_routed(
    model: nn.Module,
    tokenizer,
    samples: Sequence[Sample],
    token: str,
    cache: HiddenCache | None = None,
) -> tuple[Encoded, torch.Tensor, torch.Tensor]:
    """Every (prompt, choice) sequence of ``samples``, the flat row of each sequence's routed
    token, and the sample each sequence belongs to (what :class:`_RoutingDelta` needs). With
    ``cache`` the rows are those of its packed forward (a prompt once, its choices after it;
    the routed token is a prompt token, at the same position there)."""
    pairs, owner = [], []
    for i, sample in enumerate(samples):
        pairs.extend((sample.prompt, choice) for choice in sample.choices)
        owner.extend([i] * len(sample.choices))
    enc = encode_pairs(tokenizer, pairs, max_length(model))
    positions = torch.tensor([token_position(enc, r, token) for r in range(len(pairs))])
    if cache is None:
        rows = torch.arange(len(pairs)) * enc.input_ids.shape[1] + positions
    else:
        packed, width = cache.routing_rows(enc, range(len(pairs)))
        rows = torch.tensor(packed) * width + positions
    return enc, rows, torch.tensor(owner)


def _first_rows(samples: Sequence[Sample]) -> torch.Tensor:
    """The row of each sample's first choice among the consecutive choice rows of ``samples``."""
    return torch.tensor([0, *[len(s.choices) for s in samples[:-1]]]).cumsum(0)


def _gold_rows(samples: Sequence[Sample]) -> torch.Tensor:
    """The row of each sample's gold choice among the consecutive choice rows of ``samples``."""
    return _first_rows(samples) + torch.tensor([s.answer for s in samples])


def _correct(samples: Sequence[Sample], logprob: torch.Tensor) -> list[bool]:
    """Per sample: is the best-scored of its choices (consecutive rows of ``logprob``) gold?"""
    out, cursor = [], 0
    for sample in samples:
        out.append(int(logprob[cursor : cursor + len(sample.choices)].argmax()) == sample.answer)
        cursor += len(sample.choices)
    return out


def oracle_batch(
    model: nn.Module,
    tokenizer,
    samples: Sequence[Sample],
    layers: Sequence[int],
    token: str = "last",
    steps: int = 10,
    lr: float = 0.5,
    cache: HiddenCache | None = None,
) -> OracleResult:
    """Optimise the routing of ``samples`` one token each; see the module docstring. ``cache``:
    the states below ``layers`` from it (:class:`roma_trainer.hidden_cache.HiddenCache`)."""
    enc, rows, owner = _encode_routed(model, tokenizer, samples, token, cache)
    gold = _gold_rows(samples)
    n_experts = find_routers(model)[layers[0]].weight.shape[0]
    with _RoutingDelta(model, layers) as hooks:
        hooks.rows = rows
        hooks.owner = owner
        delta = torch.zeros(len(samples), len(layers), n_experts, requires_grad=True)
        hooks.delta = delta
        opt = torch.optim.Adam([delta], lr=lr)
        first_nll: float | None = None
        correct_before: list[bool] = []
        for _ in range(steps):
            scores = score_encoded(model, enc, cache)
            nll = -scores.logprob[gold]
            if first_nll is None:
                first_nll = nll.detach().mean().item()
                correct_before = _correct(samples, scores.logprob.detach())
            opt.zero_grad(set_to_none=True)
            nll.sum().backward()
            opt.step()
        with torch.no_grad():
            final = score_encoded(model, enc, cache)
            # A sample's choices share its prompt, so its first choice's row says its routing.
            first = _first_rows(samples)
            slots = range(len(layers))
            base = torch.stack([hooks.first_logits[s][first] for s in slots], 1).float()
            moved = torch.stack([hooks.last_logits[s][first] for s in slots], 1).float()
            before = F.softmax(base, dim=-1)
            after = F.softmax(moved + delta.detach(), dim=-1)
    return OracleResult(
        correct=_correct(samples, final.logprob),
        correct_before=correct_before,
        gold_nll_before=first_nll if first_nll is not None else float("nan"),
        gold_nll_after=float(-final.logprob[gold].mean()),
        routing_before=before,
        routing_after=after,
    )


def run_oracle(
    model: nn.Module,
    tokenizer,
    samples: Sequence[Sample],
    layers: Sequence[int],
    token: str = "last",
    steps: int = 10,
    lr: float = 0.5,
    batch_size: int = 32,
    cache: HiddenCache | None = None,
) -> OracleResult:
    """:func:`oracle_batch` over ``samples`` in batches; only routing deltas get gradients."""
    with _frozen(model):
        parts = [
            oracle_batch(
                model, tokenizer, samples[i : i + batch_size], layers, token, steps, lr, cache
            )
            for i in range(0, len(samples), batch_size)
        ]
    sizes = [len(p.correct) for p in parts]
    n = sum(sizes)
    return OracleResult(
        correct=[c for p in parts for c in p.correct],
        correct_before=[c for p in parts for c in p.correct_before],
        gold_nll_before=sum(p.gold_nll_before * s for p, s in zip(parts, sizes, strict=True)) / n,
        gold_nll_after=sum(p.gold_nll_after * s for p, s in zip(parts, sizes, strict=True)) / n,
        routing_before=torch.cat([p.routing_before for p in parts if p.routing_before is not None]),
        routing_after=torch.cat([p.routing_after for p in parts if p.routing_after is not None]),
    )


@torch.no_grad()
def pool_routing(
    model: nn.Module,
    tokenizer,
    pool: Sequence[Sample],
    layers: Sequence[int],
    token: str = "last",
    cache: HiddenCache | None = None,
) -> tuple[torch.Tensor, list[bool]]:
    """The base routing ``[n, layers, experts]`` at ``token`` of every pool sample, and whether
    the base model answers it (the success set S is where this is True)."""
    from roma_trainer.routers import RoutingCapture
    from roma_trainer.scoring import score_samples

    routing: list[torch.Tensor] = []
    correct: list[bool] = []
    with RoutingCapture(model, layers) as capture:
        for i in range(0, len(pool), 32):
            batch = list(pool[i : i + 32])
            scores = score_samples(model, tokenizer, batch, token, capture, cache)
            assert scores.routing is not None
            routing.append(scores.routing.detach())
            correct += [
                int(lp.argmax()) == s.answer for s, lp in zip(batch, scores.logprob, strict=True)
            ]
    return torch.cat(routing), correct


def success_routing_by_task(
    model: nn.Module, tokenizer, pool: Sequence[Sample], layers: Sequence[int], token: str = "last"
) -> dict[str, torch.Tensor]:
    """Mean base routing ``[layers, experts]`` at ``token`` of the pool samples the base model
    answers correctly (the success set S), per task (:func:`task_success_means`)."""
    routing, correct = pool_routing(model, tokenizer, pool, layers, token)
    return task_success_means(pool, routing, correct)


def task_success_means(
    pool: Sequence[Sample], routing: torch.Tensor, correct: Sequence[bool]
) -> dict[str, torch.Tensor]:
    """Mean routing of the success-set members of each task (from :func:`pool_routing`). A
    task none of whose pool samples is answered (a small pool of a hard task) gets the mean over
    all its pool samples, so that every task has a starting point."""
    means = {}
    for task in dict.fromkeys(s.task for s in pool):
        rows = [i for i, s in enumerate(pool) if s.task == task]
        hits = [i for i in rows if correct[i]] or rows
        means[task] = routing[hits].mean(dim=0)
    return means


def neighbour_routing_targets(
    pool: Sequence[Sample],
    routing: torch.Tensor,
    correct: Sequence[bool],
    samples: Sequence[Sample],
    modes: Sequence[str],
    k: int,
    seed: int,
    embedder: str | None = None,
) -> dict[str, tuple[torch.Tensor, float]]:
    """Per neighbourhood mode (``roma_trainer.neighbours``: ``knn``, or the ``random``
    control): for each of ``samples`` the kernel-weighted mean routing of its neighbours N(i)
    in the pool's success set, i.e. where RoMA's term pulls its routing; and the kernel's sigma.
    The prompts are embedded once for all modes."""
    from roma_trainer.neighbours import embed, find_neighbours

    success = [i for i, hit in enumerate(correct) if hit]
    if not success:
        raise ValueError("the base model answers no pool sample: the success set is empty")
    vectors = embed([s.prompt for s in pool] + [s.prompt for s in samples], embedder)
    members = routing[torch.tensor(success)]  # [S, layers, experts]
    out = {}
    for mode in modes:
        found = find_neighbours(vectors, success, mode=mode, k=k, seed=seed)
        index, weight = found.index[len(pool) :], found.weight[len(pool) :]
        picked = members[index.clamp_min(0)]  # [n, K, layers, experts]; weight 0 where padded
        out[mode] = ((picked * weight[:, :, None, None]).sum(dim=1), found.sigma)
    return out


@torch.no_grad()
def correct_with_routing(
    model: nn.Module,
    tokenizer,
    samples: Sequence[Sample],
    layers: Sequence[int],
    targets: torch.Tensor,
    token: str = "last",
    batch_size: int = 32,
    cache: HiddenCache | None = None,
) -> list[bool]:
    """Whether each sample is answered correctly when the routing of ``layers`` at ``token`` is
    set to ``targets[i]`` (``[n, layers, experts]`` probabilities): routing transplanted, the
    rest of the model as it is."""
    correct: list[bool] = []
    with _RoutingDelta(model, layers) as hooks:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            enc, hooks.rows, hooks.owner = _encode_routed(model, tokenizer, batch, token, cache)
            hooks.target = targets[start : start + batch_size]
            correct += _correct(batch, score_encoded(model, enc, cache).logprob)
    return correct


@torch.no_grad()
def base_correct(
    model: nn.Module, tokenizer, samples: Sequence[Sample], batch_size: int = 32
) -> list[bool]:
    """Whether each sample is answered correctly by the model as it is (no routing changed):
    the baseline ``correct_with_routing`` is compared with."""
    correct: list[bool] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        pairs = [(s.prompt, c) for s in batch for c in s.choices]
        enc = encode_pairs(tokenizer, pairs, max_length(model))
        correct += _correct(batch, score_encoded(model, enc).logprob)
    return correct


def run_shared_oracle(
    model: nn.Module,
    tokenizer,
    samples: Sequence[Sample],
    layers: Sequence[int],
    init: dict[str, torch.Tensor],
    token: str = "last",
    steps: int = 30,
    lr: float = 0.3,
    batch_size: int = 32,
    cache: HiddenCache | None = None,
) -> OracleResult:
    """The best routing *shared by all samples of a task*, found with their gold answers.

    One routing distribution per task and tuned layer (logits initialised at ``init[task]``,
    e.g. the success-set mean of ``success_routing_by_task``) is optimised by full-batch Adam
    on the summed gold NLL of the task's samples, and every sample of the task is scored with
    its routing at ``token`` set to it. An upper bound, with the labels in hand, on what routing
    each sample like the other samples of its task can do: the correction RoMA's neighbours
    (nearly all of the same task) teach. Not a method. ``correct_before`` is the accuracy
    with the initial routing (with the success-set mean: the domain-routing diagnostic).
    """
    by_task: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_task.setdefault(sample.task, []).append(i)
    correct, before = [False] * len(samples), [False] * len(samples)
    nll_before = nll_after = 0.0
    with _frozen(model), _RoutingDelta(model, layers) as hooks:

        def logprob(chunk: _Chunk, probs: torch.Tensor) -> torch.Tensor:
            hooks.rows, hooks.owner = chunk.rows, chunk.owner
            hooks.target = probs.expand(len(chunk.samples), *probs.shape)
            return score_encoded(model, chunk.enc, cache).logprob

        def evaluate(chunks: list[_Chunk], probs: torch.Tensor, out: list[bool]) -> float:
            nll = 0.0
            with torch.no_grad():
                for chunk in chunks:
                    scores = logprob(chunk, probs)
                    nll -= float(scores[chunk.gold].sum())
                    for i, ok in zip(chunk.index, _correct(chunk.samples, scores), strict=True):
                        out[i] = ok
            return nll

        for task, index in by_task.items():
            chunks = [
                _Chunk.of(model, tokenizer, samples, index[i : i + batch_size], token, cache)
                for i in range(0, len(index), batch_size)
            ]
            logits = init[task].clamp_min(1e-12).log().clone().requires_grad_(True)
            nll_before += evaluate(chunks, logits.softmax(-1), before)
            opt = torch.optim.Adam([logits], lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                for chunk in chunks:  # full-batch gradient, accumulated chunk by chunk
                    (-logprob(chunk, logits.softmax(-1))[chunk.gold].sum()).backward()
                opt.step()
            nll_after += evaluate(chunks, logits.softmax(-1), correct)
    return OracleResult(correct, before, nll_before / len(samples), nll_after / len(samples))


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` takes gradients inside; each gets its own flag back after."""
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)


@dataclass
class _Chunk:
    """Some samples of one task, encoded for :class:`_RoutingDelta`, with their gold rows."""

    index: list[int]
    samples: list[Sample]
    enc: Encoded
    rows: torch.Tensor
    owner: torch.Tensor
    gold: torch.Tensor

    @classmethod
    def of(
        cls,
        model: nn.Module,
        tokenizer,
        samples: Sequence[Sample],
        index: list[int],
        token: str,
        cache: HiddenCache | None = None,
    ) -> _Chunk:
        batch = [samples[i] for i in index]
        enc, rows, owner = _encode_routed(model, tokenizer, batch, token, cache)
        return cls(index, batch, enc, rows, owner, _gold_rows(batch))
