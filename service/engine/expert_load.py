"""Opt-in per-expert load counters, from forward hooks on the routers, per router version.

vLLM can return the routed experts per request (``--enable-return-routed-experts``), but only on
Model Runner V2, which needs Triton: not on the CPU. So we count in the worker instead: a hook on
each router re-derives the top-k choice from its logits and adds it to a per-layer counter.

Counts are kept per slot (``[slots, experts]`` per router; one row without slots): each token is
counted in the row of the slot its request is bound to, read from the step's
:class:`~roma_service.engine.slot_gate.StepSlots` (one slot for all, or the per-token index of a
mixed step), with one ``index_add_`` on ``slot * experts + expert`` (no device->host sync).
Before a slot's content changes (a slot load or free, or the single-version swap of slot 0), the
slot table calls :meth:`ExpertLoad.settle`, which moves that slot's row to the version it held:
a version loaded later into the same slot starts from zero. Reads report every version's counts
and tokens (a token adds ``top_k`` counts, so tokens are counts / top_k). The read-back's probe
batch is never counted.

Off by default: it adds a top-k and an index_add per router per forward (see
benchmarks/engine_decode.py for the measured cost). With CUDA graphs, hooks do not run inside
graph replays; count on an engine started with ``--enforce-eager``.

The selection mirrors the model's own: softmax top-k (OLMoE, Qwen3-MoE, DeepSeek-V2 greedy), or
sigmoid scores plus the correction bias with group-limited top-k (DeepSeek-V3 ``noaux_tc``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from roma_service.engine.slots import BASE_VERSION

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from roma_service.engine.routers import RouterTable
    from roma_service.engine.slots import SlotTable


class ExpertLoad:
    """Counters for every router of one worker; ``enable`` registers the hooks. ``slots``: the
    worker's slot table (None: one version at a time, slot 0)."""

    def __init__(self, table: RouterTable, hf_config: Any, slots: SlotTable | None = None) -> None:
        self.table = table
        self.slots = slots
        self.top_k = int(getattr(hf_config, "num_experts_per_tok", 0) or 1)
        self.grouped = getattr(hf_config, "topk_method", None) == "noaux_tc"
        self.n_group = int(getattr(hf_config, "n_group", 1) or 1)
        self.topk_group = int(getattr(hf_config, "topk_group", 1) or 1)
        self.rows = len(slots.slots) if slots is not None else 1
        self.counts: dict[str, torch.Tensor] = {}  # router -> [slots, experts], live
        self.settled: dict[str, dict[str, torch.Tensor]] = {}  # version -> router -> [experts]
        self._handles: list[RemovableHandle] = []
        table.before_change = self.settle

    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    def enable(self) -> None:
        if self.enabled:
            return
        for name, module in self.table.routers.items():
            experts = int(self.table.base[name].shape[0])
            device = self.table.held.weights[name].device
            self.counts.setdefault(
                name, torch.zeros(self.rows, experts, dtype=torch.int64, device=device)
            )
            self._handles.append(module.register_forward_hook(self._hook(name, module)))

    def disable(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, module: torch.nn.Module):  # -> forward hook
        counts = self.counts[name].view(-1)
        experts = self.counts[name].shape[1]

        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            if self.table.reading_back:
                return
            logits = output[0] if isinstance(output, tuple) else output
            chosen = self.select(logits, getattr(module, "e_score_correction_bias", None))
            flat = self._slot_major(chosen, experts)
            # index_add_ rather than bincount: no device->host sync on the GPU.
            counts.index_add_(0, flat, torch.ones_like(flat))

        return hook

    def _slot_major(self, chosen: torch.Tensor, experts: int) -> torch.Tensor:
        """``slot * experts + expert`` of every choice, flat: each token's own slot's row."""
        step = self.slots.step if self.slots is not None else None
        tokens = chosen.shape[0]
        # A forward that is not the step's (vLLM's profiling and warm-up runs): slot 0, as the
        # slot gate computes it.
        if step is None or tokens != step.tokens or step.single == 0:
            return chosen.reshape(-1)
        if step.single is not None:
            return (chosen + step.single * experts).reshape(-1)
        return (chosen + step.token_index()[:, None] * experts).reshape(-1)

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

    # -- versions ---------------------------------------------------------------------------

    def version_of(self, slot: int) -> str | None:
        """The version slot ``slot`` holds now (None: free)."""
        if slot == 0:
            return self.table.held.version or BASE_VERSION
        assert self.slots is not None
        return self.slots.version_of(self.slots.slots[slot])

    def settle(self, slot: int) -> None:
        """Move ``slot``'s counts to the version it holds; called before its content changes."""
        version = self.version_of(slot)
        for name, counts in self.counts.items():
            if version is not None:
                booked = self.settled.setdefault(version, {})
                row = counts[slot]
                booked[name] = row.clone() if name not in booked else booked[name] + row
            counts[slot].zero_()  # a free slot runs no request: nothing is dropped

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        """Counts and tokens per version (versions that routed no token are left out), and
        their totals over versions."""
        per_version: dict[str, dict[str, list[int]]] = {}
        for version, routers in self.settled.items():
            for name, row in routers.items():
                _add(per_version.setdefault(version, {}), name, row.tolist())
        for name, counts in self.counts.items():
            for slot, row in enumerate(counts.tolist()):
                version = self.version_of(slot)
                if version is not None:
                    _add(per_version.setdefault(version, {}), name, row)
        versions = {
            version: {
                "tokens": {n: sum(row) // self.top_k for n, row in routers.items()},
                "counts": routers,
            }
            for version, routers in per_version.items()
            if any(any(row) for row in routers.values())
        }
        totals: dict[str, list[int]] = {n: [0] * c.shape[1] for n, c in self.counts.items()}
        for routers in per_version.values():
            for name, row in routers.items():
                _add(totals, name, row)
        out = {
            "enabled": self.enabled,
            "top_k": self.top_k,
            "tokens": {n: sum(row) // self.top_k for n, row in totals.items()},
            "counts": totals,
            "versions": versions,
        }
        if reset:
            for counter in self.counts.values():
                counter.zero_()
            self.settled.clear()
        return out


def _add(into: dict[str, list[int]], name: str, row: list[int]) -> None:
    if name in into:
        into[name] = [a + b for a, b in zip(into[name], row, strict=True)]
    else:
        into[name] = list(row)
