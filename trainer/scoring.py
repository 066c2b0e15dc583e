"""Log-likelihood of a continuation given a context: the one scoring rule of the project.

Tokenization (the gateway's completions-API backend must reproduce it exactly)::

    context_ids      = tokenizer(context).input_ids                      # the tokenizer's own
                                                                         # special tokens, as vLLM
                                                                         # adds to a text prompt
    continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    sequence         = context_ids + continuation_ids

i.e. context and continuation are tokenized *separately* and concatenated, so the boundary is
exact and never depends on a BPE merge across it. A remote backend sends ``sequence`` as token
ids (``/tokenize`` the two parts, then ``/v1/completions`` with ``prompt=[ids]``, ``echo=true``,
``logprobs=0``, ``max_tokens=0`` or ``1``) and sums the echoed logprobs of the last
``len(continuation_ids)`` tokens. If the sequence is longer than the model's
``max_position_embeddings``, context tokens are dropped from the left.

Scores: ``logprob`` = sum over continuation tokens of log p(token | everything before it);
``n_tokens`` = len(continuation_ids); the length-normalised score is ``logprob / n_tokens``
(per token, so it does not depend on the tokenizer's bytes-per-token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from roma_trainer.data import Sample
from roma_trainer.routers import RoutingCapture

if TYPE_CHECKING:  # hidden_cache imports Encoded from here
    from roma_trainer.hidden_cache import HiddenCache

TokenPosition = str  # "last" | "first" | "middle" (validated by the config)


@dataclass
class Encoded:
    """A right-padded batch of context+continuation sequences."""

    input_ids: torch.Tensor  # [N, S]
    attention_mask: torch.Tensor  # [N, S]
    context_lens: list[int]
    continuation_lens: list[int]
    first_text_token: list[int]  # index of the first context token after leading specials


def encode_pairs(
    tokenizer, pairs: Sequence[tuple[str, str]], max_length: int | None = None
) -> Encoded:
    """Tokenize (context, continuation) pairs as the module docstring specifies."""
    special = set(tokenizer.all_special_ids)
    rows: list[list[int]] = []
    context_lens, continuation_lens, first_text = [], [], []
    for context, continuation in pairs:
        ctx = list(tokenizer(context).input_ids)
        cont = list(tokenizer(continuation, add_special_tokens=False).input_ids)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        if max_length is not None and len(ctx) + len(cont) > max_length:
            keep = max_length - len(cont)
            if keep < 1:
                raise ValueError(
                    f"continuation {continuation[:40]!r}... alone exceeds {max_length} tokens"
                )
            ctx = ctx[-keep:]
        lead = 0
        while lead < len(ctx) - 1 and ctx[lead] in special:
            lead += 1
        rows.append(ctx + cont)
        context_lens.append(len(ctx))
        continuation_lens.append(len(cont))
        first_text.append(lead)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return Encoded(input_ids, attention_mask, context_lens, continuation_lens, first_text)


def token_position(enc: Encoded, row: int, token: TokenPosition) -> int:
    """Index of the routed token in sequence ``row``: last/first/middle *context* token."""
    first, last = enc.first_text_token[row], enc.context_lens[row] - 1
    if token == "last":
        return last
    if token == "first":
        return first
    if token == "middle":
        return (first + last) // 2
    raise ValueError(f"token position {token!r}: use last, first or middle")


@dataclass
class PairScores:
    logprob: torch.Tensor  # [N] sum of continuation token log-probs (float32)
    n_tokens: torch.Tensor  # [N]
    is_greedy: torch.Tensor  # [N] bool: every continuation token is the argmax


def score_encoded(model: nn.Module, enc: Encoded, cache: HiddenCache | None = None) -> PairScores:
    """Run the model once over the batch and score each continuation (keeps the graph).

    Only the rows that predict continuation tokens go through the LM head, so memory is
    ``sum(continuation tokens) x vocab`` rather than ``N x S x vocab``. With ``cache``, the
    layers below its first layer are not run: their output comes from the cache.
    """
    device = next(model.parameters()).device
    if cache is not None:
        hidden = cache.last_hidden_state(enc)
    else:
        hidden = model.get_decoder()(
            input_ids=enc.input_ids.to(device),
            attention_mask=enc.attention_mask.to(device),
            use_cache=False,
        ).last_hidden_state
    width = enc.input_ids.shape[1]
    rows, targets, owner = [], [], []
    for i, (ctx, cont) in enumerate(zip(enc.context_lens, enc.continuation_lens, strict=True)):
        positions = torch.arange(ctx - 1, ctx + cont - 1)
        rows.append(i * width + positions)
        targets.append(enc.input_ids[i, ctx : ctx + cont])
        owner.append(torch.full((cont,), i, dtype=torch.long))
    flat_rows = torch.cat(rows).to(device)
    flat_targets = torch.cat(targets).to(device)
    flat_owner = torch.cat(owner).to(device)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_rows)
    logprobs = torch.log_softmax(model.get_output_embeddings()(picked).float(), dim=-1)
    token_lp = logprobs.gather(1, flat_targets[:, None]).squeeze(1)
    greedy = logprobs.argmax(dim=-1) == flat_targets
    n = len(enc.context_lens)
    total = torch.zeros(n, device=device).index_add(0, flat_owner, token_lp)
    n_greedy = torch.zeros(n, device=device, dtype=torch.long).index_add(
        0, flat_owner, greedy.long()
    )
    n_tokens = torch.tensor(enc.continuation_lens, device=device)
    return PairScores(total, n_tokens, n_greedy == n_tokens)


@dataclass
class ChoiceScores:
    """Scores of every choice of a batch of samples, padded to the widest sample with -inf."""

    logprob: torch.Tensor  # [B, C]
    routing: torch.Tensor | None  # [B, L, E] when a RoutingCapture was given


def max_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def score_samples(
    model: nn.Module,
    tokenizer,
    samples: Sequence[Sample],
    token: TokenPosition = "last",
    capture: RoutingCapture | None = None,
    cache: HiddenCache | None = None,
) -> ChoiceScores:
    """One forward over all choices of ``samples``; routing of each sample's prompt when
    ``capture`` is given (taken from its first choice's sequence: causal attention makes the
    prompt's hidden states identical in every choice's sequence); the layers below ``cache``'s
    first layer come from it when given."""
    pairs, first_row = [], []
    for sample in samples:
        first_row.append(len(pairs))
        pairs.extend((sample.prompt, choice) for choice in sample.choices)
    enc = encode_pairs(tokenizer, pairs, max_length(model))
    if capture is not None:
        positions = [token_position(enc, row, token) for row in first_row]
        rows, width = (
            cache.routing_rows(enc, first_row) if cache else (first_row, enc.input_ids.shape[1])
        )
        capture.target(torch.tensor(rows), torch.tensor(positions), width)
    scores = score_encoded(model, enc, cache)
    width = max(len(s.choices) for s in samples)
    device = scores.logprob.device
    logprob = torch.full((len(samples), width), float("-inf"), device=device)
    for b, (sample, row) in enumerate(zip(samples, first_row, strict=True)):
        c = len(sample.choices)
        logprob[b, :c] = scores.logprob[row : row + c]
    routing = capture.routing() if capture is not None else None
    return ChoiceScores(logprob, routing)
