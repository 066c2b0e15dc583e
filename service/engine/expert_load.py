"""Opt-in per-expert load counters, from forward hooks on the routers.

vLLM can return the routed experts per request (``--enable-return-routed-experts``), but only on
Model Runner V2, which needs Triton: not on the CPU. So we count in the worker instead: a hook on
each router re-derives the top-k choice from its logits and adds it to a per-layer counter.

Off by default: it adds a top-k and an index_add per router per forward (see
benchmarks/engine_decode.py for the measured cost). With CUDA graphs, hooks do not run inside
graph replays; count on an engine started with ``--enforce-eager``.

The selection mirrors the model's own: softmax top-k (OLMoE, Qwen3-MoE, DeepSeek-V2 greedy), or
sigmoid scores plus the correction bias with group-limited top-k (DeepSeek-V3 ``noaux_tc``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from roma_service.engine.routers import RouterTable


class ExpertLoad:
    """Counters for every router of one worker; ``enable`` registers the hooks."""

    def __init__(self, table: RouterTable, hf_config: Any) -> None:
        self.table = table
        self.top_k = int(getattr(hf_config, "num_experts_per_tok", 0) or 1)
        self.grouped = getattr(hf_config, "topk_method", None) == "noaux_tc"
        self.n_group = int(getattr(hf_config, "n_group", 1) or 1)
        self.topk_group = int(getattr(hf_config, "topk_group", 1) or 1)
        self.counts: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    def enable(self) -> None:
        if self.enabled:
            return
        for name, module in self.table.routers.items():
            experts = int(self.table.base[name].shape[0])
            device = self.table.held.weights[name].device
            self.counts.setdefault(name, torch.zeros(experts, dtype=torch.int64, device=device))
            self.tokens.setdefault(name, 0)
            self._handles.append(module.register_forward_hook(self._hook(name, module)))

    def disable(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, module: torch.nn.Module):  # -> forward hook
        counts = self.counts

        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            if self.table.reading_back:
                return
            logits = output[0] if isinstance(output, tuple) else output
            chosen = self.select(logits, getattr(module, "e_score_correction_bias", None))
            flat = chosen.reshape(-1)
            # index_add_ rather than bincount: no device->host sync on the GPU.
            counts[name].index_add_(0, flat, torch.ones_like(flat))
            self.tokens[name] += int(logits.shape[0])

        return hook

    def select(self, logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The experts each token is routed to, [tokens, top_k]."""
        logits = logits.float()
        if not self.grouped:
            return logits.topk(self.top_k, dim=-1).indices
        scores = logits.sigmoid()
        if bias is not None:
            scores = scores + bias.float()
        tokens, experts = scores.shape
        groups = scores.view(tokens, self.n_group, experts // self.n_group)
        group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
        keep = group_scores.topk(self.topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        masked = scores.masked_fill(~mask.repeat_interleave(experts // self.n_group, 1), -1e30)
        return masked.topk(self.top_k, dim=-1).indices

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        out = {
            "enabled": self.enabled,
            "top_k": self.top_k,
            "tokens": dict(self.tokens),
            "counts": {n: c.tolist() for n, c in self.counts.items()},
        }
        if reset:
            for name, counter in self.counts.items():
                counter.zero_()
                self.tokens[name] = 0
        return out
