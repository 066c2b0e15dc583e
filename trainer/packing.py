"""Choices packed behind their shared prompt: each prompt runs once, not once per choice.

A multiple-choice batch (see :mod:`roma_trainer.scoring`) holds one row per (prompt, choice),
right-padded, so a 4-choice question with a 60-token prompt and 3-token choices computes 252
token states where 72 differ: causal attention makes the prompt's states identical in every
choice's row. :class:`Layout` regroups consecutive rows that share a prompt into one packed
row, ``prompt + choice 1 + choice 2 + ...``, with the positions each token has in its own
sequence (a choice's first token sits at position ``len(prompt)``) and a 4D mask under which a
prompt token sees the prompt tokens before it and a choice token sees the whole prompt and
the tokens of its own choice before it, never another choice. Every state is then the one the
unpacked row computes (up to float rounding), and :meth:`Layout.unpack_index` maps the packed
output back to the unpacked rows, so the caller scores it as usual.

The model must take a custom 4D mask as it is: transformers' ``sdpa`` and ``eager`` attention
do; a sliding window would be lost (the mask is used as given), so a model with one, or
another attention implementation, gets one row per sequence (``share=False``) and its own
2D-mask path, as without packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from roma_trainer.scoring import Encoded


def can_share_prompts(model: nn.Module) -> bool:
    """Whether ``model``'s attention takes the packed 4D mask as it is (see module docstring)."""
    config = model.config
    return config._attn_implementation in ("sdpa", "eager") and not getattr(
        config, "sliding_window", None
    )


@dataclass
class Layout:
    """Where each row of an :class:`Encoded` batch lies once its prompts are shared."""

    row_of: list[int]  # packed row of each unpacked row
    start_of: list[int]  # where each unpacked row's continuation starts in its packed row
    width: int
    position_ids: torch.Tensor  # [B, W] position of each token in its own sequence
    segment: torch.Tensor  # [B, W] 0 = prompt, i + 1 = the i-th continuation, -1 = padding
    shared: bool  # some packed row holds more than one continuation

    @classmethod
    def of(cls, enc: Encoded, share: bool = True) -> Layout:
        """Consecutive rows with the same prompt ids share a packed row when ``share``."""
        groups: list[list[int]] = []
        for row, n_prompt in enumerate(enc.context_lens):
            prompt = enc.input_ids[row, :n_prompt]
            first = groups[-1][0] if groups else None
            if (
                share
                and first is not None
                and enc.context_lens[first] == n_prompt
                and torch.equal(enc.input_ids[first, :n_prompt], prompt)
            ):
                groups[-1].append(row)
            else:
                groups.append([row])
        row_of, start_of, lengths = [0] * len(enc.context_lens), [0] * len(enc.context_lens), []
        for b, rows in enumerate(groups):
            end = enc.context_lens[rows[0]]
            for row in rows:
                row_of[row], start_of[row] = b, end
                end += enc.continuation_lens[row]
            lengths.append(end)
        width = max(lengths)
        position_ids = torch.zeros((len(groups), width), dtype=torch.long)
        segment = torch.full((len(groups), width), -1, dtype=torch.long)
        for b, rows in enumerate(groups):
            n_prompt = enc.context_lens[rows[0]]
            position_ids[b, :n_prompt] = torch.arange(n_prompt)
            segment[b, :n_prompt] = 0
            for i, row in enumerate(rows):
                n, start = enc.continuation_lens[row], start_of[row]
                position_ids[b, start : start + n] = torch.arange(n_prompt, n_prompt + n)
                segment[b, start : start + n] = i + 1
        shared = any(len(rows) > 1 for rows in groups)
        return cls(row_of, start_of, width, position_ids, segment, shared)

    def pack(self, enc: Encoded, values: torch.Tensor) -> torch.Tensor:
        """``values`` per unpacked token ``[N, S, ...]`` -> per packed token ``[B, W, ...]``
        (zeros on padding); each row's prompt is taken from the first row of its group."""
        out = values.new_zeros((len(self.position_ids), self.width, *values.shape[2:]))
        for row, (b, start) in enumerate(zip(self.row_of, self.start_of, strict=True)):
            n_prompt, n = enc.context_lens[row], enc.continuation_lens[row]
            out[b, :n_prompt] = values[row, :n_prompt]
            out[b, start : start + n] = values[row, n_prompt : n_prompt + n]
        return out

    def unpack_index(self, enc: Encoded) -> torch.Tensor:
        """``[N * S]`` flat index into the packed ``[B * W]`` tokens for each unpacked token
        (padding points at its packed row's first token, a real one)."""
        n_rows, seq = enc.input_ids.shape
        t = torch.arange(seq)
        index = torch.empty((n_rows, seq), dtype=torch.long)
        for row, (b, start) in enumerate(zip(self.row_of, self.start_of, strict=True)):
            n_prompt, n = enc.context_lens[row], enc.continuation_lens[row]
            local = torch.where(t < n_prompt, t, start + t - n_prompt)
            index[row] = b * self.width + torch.where(t < n_prompt + n, local, 0)
        return index.reshape(-1)

    def attention_mask(self, model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The model's input mask: ``[B, W]`` (the model builds its causal mask) when no row is
        shared, else the packed ``[B, 1, W, W]`` mask, boolean for sdpa, additive for eager."""
        seg = self.segment
        if not self.shared:
            return (seg >= 0).long()
        idx = torch.arange(self.width)
        causal = idx[None, :, None] >= idx[None, None, :]
        key, query = seg[:, None, :], seg[:, :, None]
        allowed = (causal & (key >= 0) & ((key == 0) | (key == query)))[:, None]
        if model.config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return allowed
