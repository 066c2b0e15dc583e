"""The slot-aware MoE gate: every token's router logits computed with its own request's slot.

One :class:`StepSlots` per worker says which slot each token of the current forward uses; it is
written before every model forward (see ``slots.py``) and read by every :class:`SlotGate`. A
SlotGate replaces the ``forward`` of one router module *on the instance*: vLLM's MoE runner holds
a reference to the gate module and calls it, so replacing the module in its parent would miss
those calls. The fused top-k and expert kernels after the gate are vLLM's, unchanged.

Two strategies:

* ``grouped`` (CPU; eager GPUs): a step whose tokens all use one slot calls that slot's gate
  directly: the very kernel vLLM runs without slots (on the CPU, the layer's packed SGL GEMM,
  re-packed for each slot by the layer's own ``process_weights_after_loading``). A mixed step
  whose stacked GEMM is small (``STACKED_MIXED_MAX_MACS``) runs that same kind of kernel packed
  over all slots' weights and takes each token's own slot's logits (``torch.take`` with a flat
  index worked out once per step); a larger one computes slot 0's logits for every token, then
  overwrites the rows of the tokens whose slot patches this layer (``index_select``, that
  slot's GEMM, ``index_copy_``).
  A layer that no resident patch changes runs slot 0's kernel for every step. Data-dependent, so
  under torch.compile it runs inside an opaque custom op (``roma::slot_gate``): vLLM drops
  Dynamo's guards, and a Python branch traced once would be frozen.
* ``stacked`` (CUDA graphs): one GEMM against the stacked ``[slots * experts, hidden]`` weights,
  then a per-token gather with the index buffer. No branch depends on the step, the stack and
  the index buffer keep their addresses (loads ``copy_`` into the stack; the per-step hook
  writes the indices in place), so captured CUDA graphs stay valid. Slot 0 of the stack *is*
  the layer's ``weight`` (a view), so the single-version swap, which copies into that weight,
  still changes slot 0. Costs ``slots`` times the gate's FLOPs; the gate computes in the weight
  dtype and casts to ``out_dtype`` (vLLM's specialised router GEMM tiers are bypassed).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from roma_service.engine.swap import packed_twin

Strategy = Literal["grouped", "stacked"]
# Grouped strategy, mixed steps: one GEMM against all slots' weights plus a ``take`` is cheaper
# than a GEMM per slot on its own tokens while the stacked GEMM stays under this many
# multiply-adds (tokens x slots x experts x hidden). The stacked GEMM does ``slots`` times the
# work; the per-slot path pays a kernel call, a row gather and a scatter per slot. On one core,
# 4 slots, routers from hidden 128 x 8 experts to 2048 x 128, the two cross near 2^23
# (``benchmarks/slot_gate_paths.py``; docs/engine.md, "Which mixed path"); the threshold sits
# where stacking won in every run.
STACKED_MIXED_MAX_MACS = 1 << 22
# The stacked twin is packed anew on every slot load (4 slots: OLMoE-1B-7B's router 0.8-1.1 ms
# a layer against 0.3 ms without one; 4096 x 128: 4-5 ms), so a gate has one only if mixed steps
# of at least this many tokens would use it.
_MIN_STACKED_TOKENS = 4
# GateLinear's flags for its kernels that only take the router's own (input, output) shape.
_SHAPE_BOUND_TIERS = ("allow_fp32_router_gemm", "allow_rocm_bf16x3_router_gemm")


class StepSlots:
    """Which slot each token of the current forward uses: ``single`` (one slot for all) or,
    for a mixed step, ``token_slots`` (numpy, the real tokens'), ``index`` (a persistent buffer
    of every token's slot, fixed address, written in place: by the stacked strategy on every
    step, single-slot ones too; for the grouped strategy only when the expert-load counters
    ask), ``flat_index`` (grouped gates' stacked GEMM) and ``rows`` (their GEMM per slot),
    each worked out on first use. A decode step laid out as the last one keeps them all
    (``repeats``)."""

    def __init__(
        self, slots: int, max_tokens: int, device: torch.device, strategy: Strategy
    ) -> None:
        self.slots = slots
        self.device = device
        self.index = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.write_index = strategy == "stacked"
        self.tokens = 0
        self.single: int | None = 0  # every token uses this slot; None: mixed
        self.token_slots: np.ndarray | None = None  # mixed: each real token's slot
        self._rows: dict[int, torch.Tensor] | None = {}
        self._flat: dict[int, torch.Tensor] = {}
        self._slot_rows = np.arange(max_tokens, dtype=np.int64) * slots
        self._index_written = True
        self._key: list[int] | None = None  # a decode step's slots, per request (``repeats``)

    @property
    def rows(self) -> dict[int, torch.Tensor]:
        """Mixed step: slot (not 0) -> the rows of its tokens; empty otherwise."""
        if self._rows is None:
            assert self.token_slots is not None
            slots = self.token_slots
            self._rows = {
                int(slot): torch.from_numpy(np.flatnonzero(slots == slot)).to(self.device)
                for slot in np.unique(slots)
                if slot != 0
            }
        return self._rows

    def flat_index(self, experts: int) -> torch.Tensor:
        """Mixed step: where each token's own slot's logits lie in the flattened ``[tokens,
        slots * experts]`` logits of all slots (``torch.take`` reads them in one call, where a
        ``gather`` needs three views of the index first). Worked out once per step."""
        flat = self._flat.get(experts)
        if flat is None:
            assert self.token_slots is not None
            slots = self.token_slots
            if len(slots) < self.tokens:  # padding tokens: slot 0
                slots = np.pad(slots, (0, self.tokens - len(slots)))
            rows = self._slot_rows[: self.tokens] + slots  # token * slots + its slot
            flat = torch.from_numpy((rows * experts)[:, None] + np.arange(experts))
            if self.device.type != "cpu":
                flat = flat.to(self.device)
            self._flat[experts] = flat
        return flat

    def uniform(self, slot: int, tokens: int) -> None:
        """Every token of a forward of ``tokens`` tokens uses ``slot``."""
        self.tokens, self.single, self.token_slots, self._rows = tokens, slot, None, {}
        self._flat, self._key = {}, None
        if self.write_index:
            self.index[:tokens].fill_(slot)

    def repeats(self, key: list[int], tokens: int) -> bool:
        """Whether a mixed step of ``tokens`` tokens, one per request, whose requests use the
        slots ``key`` (in batch order) is laid out as the last step was: then everything worked
        out for that one (index buffer, flat indices, rows) still holds. Decode steps of a batch
        that did not change repeat; comparing a list is cheaper than any array work."""
        return self.single is None and tokens == self.tokens and key == self._key

    def mixed(self, token_slots: np.ndarray, tokens: int, key: list[int] | None = None) -> None:
        """``token_slots``: the slot of each real token, in batch order; the rest of the
        ``tokens`` of the forward (CUDA-graph padding) use slot 0. ``key``: the requests' slots
        of a step of one token per request, for :meth:`repeats`."""
        self.tokens, self.single, self.token_slots, self._key = tokens, None, token_slots, key
        self._rows = {} if self.write_index else None
        self._flat = {}
        # The grouped gates read ``token_slots``; only the expert-load counters ask the grouped
        # strategy for the index buffer, so it is written when they do.
        self._index_written = False
        if self.write_index:
            self._write_index()

    def token_index(self) -> torch.Tensor:
        """Mixed step: every token's slot, ``[tokens]``, from the persistent index buffer."""
        if not self._index_written:
            self._write_index()
        return self.index[: self.tokens]

    def _write_index(self) -> None:
        assert self.token_slots is not None
        host = torch.zeros(self.tokens, dtype=torch.int64)
        host[: len(self.token_slots)] = torch.from_numpy(self.token_slots)
        # A fresh pageable tensor: the copy is staged at once, nothing reuses the source.
        self.index[: self.tokens].copy_(host, non_blocking=True)
        self._index_written = True

    @contextlib.contextmanager
    def forced(self, slot: int, tokens: int) -> Iterator[None]:
        """Run a probe batch of ``tokens`` tokens under ``slot`` (read-back, between steps)."""
        saved = (self.tokens, self.single, self.token_slots, self._rows, self._flat)
        self.uniform(slot, tokens)
        try:
            yield
        finally:
            # ``_key`` stays cleared (``uniform``): the probe may have overwritten the index buffer
            self.tokens, self.single, self.token_slots, self._rows, self._flat = saved


@dataclass(frozen=True)
class _Kernels:
    """What the grouped strategy runs for one layer; replaced whole on every change."""

    per_slot: tuple[nn.Module | None, ...]  # a packed twin per patched slot; None: slot 0's
    sources: tuple[torch.Tensor | None, ...]  # the weights they were packed from
    stacked: nn.Module | None = None  # a twin over all slots' weights (smaller mixed steps)

    @functools.cached_property
    def patched(self) -> bool:
        """Whether any slot patches this layer (else every slot computes with slot 0's); read
        on every mixed step, worked out once (the kernels are replaced whole)."""
        return any(kernel is not None for kernel in self.per_slot)


@dataclass
class _StagedSlot:
    """One layer's new content for one slot; commit/rollback only assign or copy. A gate's
    grouped kernels are replaced whole, so stage the next change only after committing this
    one (a commit over content changed since staging is refused)."""

    gate: SlotGate
    slot: int
    new: _Kernels | torch.Tensor
    old: _Kernels | torch.Tensor

    def commit(self) -> None:
        if isinstance(self.old, _Kernels) and self.gate.kernels is not self.old:
            raise RuntimeError(f"{self.gate.name}: slot {self.slot} was staged from older kernels")
        self.gate._set(self.slot, self.new)

    def rollback(self) -> None:
        self.gate._set(self.slot, self.old)


# Gates by key, for the custom op (it can only take tensors and plain values).
_GATES: dict[str, SlotGate] = {}
_KEYS = itertools.count()


class SlotGate:
    """The slots of one router module. ``base`` is the checkpoint's weight as the engine
    computes with it; a slot that does not patch this layer computes with slot 0's routers."""

    def __init__(
        self, name: str, layer: nn.Module, step: StepSlots, strategy: Strategy, base: torch.Tensor
    ) -> None:
        self.name = name
        self.layer = layer
        self.step = step
        self.strategy = strategy
        self.base = base
        self.experts = int(base.shape[0])
        self.class_forward = type(layer).forward
        self.kernels = _Kernels((None,) * step.slots, (None,) * step.slots)
        # Mixed steps of up to this many tokens run one GEMM over all slots' weights (0: none).
        limit = STACKED_MIXED_MAX_MACS // (step.slots * base.numel())
        bias = getattr(layer, "bias", None) is not None
        self.stack_tokens = 0 if bias or limit < _MIN_STACKED_TOKENS else limit
        self.stack: torch.Tensor | None = None
        if strategy == "stacked":
            self.stack = self._stack_weights()
        self.key = f"{next(_KEYS)}:{name}"
        _GATES[self.key] = self
        layer.forward = self.forward

    def _stack_weights(self) -> torch.Tensor:
        weight = self.layer.weight
        if getattr(self.layer, "bias", None) is not None or tuple(weight.shape) != tuple(
            self.base.shape
        ):
            raise ValueError(
                f"{self.name}: the stacked slot gate needs an unquantized, bias-free router "
                f"holding its weight (got weight {list(weight.shape)}); use the grouped strategy"
            )
        stack = weight.detach().new_empty((self.step.slots, *weight.shape))
        stack.copy_(weight.detach().expand_as(stack))
        self.layer.weight.data = stack[0]  # slot 0 is the live weight (single-version swaps)
        return stack

    # -- content --------------------------------------------------------------------------

    def stage(self, slot: int, weight: torch.Tensor | None) -> _StagedSlot:
        """Prepare ``slot`` to compute with ``weight`` (None: like slot 0) without touching
        what runs; the expensive part (re-packing) happens here."""
        if slot == 0:
            raise ValueError("slot 0 is changed by the single-version swap, not by slot loads")
        if self.stack is not None:
            new = (self.base if weight is None else weight).to(
                device=self.stack.device, dtype=self.stack.dtype
            )
            return _StagedSlot(self, slot, new, self.stack[slot].clone())
        per_slot, sources = list(self.kernels.per_slot), list(self.kernels.sources)
        per_slot[slot] = None if weight is None else packed_twin(self.layer, weight)
        sources[slot] = weight
        stacked = None
        if self.stack_tokens and any(s is not None for s in sources):
            weights = torch.cat([self.base if s is None else s for s in sources]).to(self.base)
            stacked = packed_twin(self.layer, weights)
            # vLLM's router GEMM tiers made for the router's exact shape would misread one of
            # ``slots`` times the rows: the stacked twin takes the tiers that fit any shape.
            for tier in _SHAPE_BOUND_TIERS:
                if getattr(stacked, tier, False):
                    setattr(stacked, tier, False)
        new_kernels = _Kernels(tuple(per_slot), tuple(sources), stacked)
        return _StagedSlot(self, slot, new_kernels, self.kernels)

    def _set(self, slot: int, content: _Kernels | torch.Tensor) -> None:
        if isinstance(content, _Kernels):
            self.kernels = content
        else:
            assert self.stack is not None
            with torch.no_grad():
                self.stack[slot].copy_(content)

    # -- forward --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> Any:
        """Replaces the router module's forward; same return shape as vLLM's GateLinear."""
        if self.stack is None and torch.compiler.is_compiling():
            logits = torch.ops.roma.slot_gate(x, self.key)
        else:
            logits = self.logits(x)
        return (logits, None) if getattr(self.layer, "return_bias", False) else logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.stack is not None:
            return self._stacked(x)
        return self._grouped(x)

    def _call(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = self.class_forward(module, x)
        return out[0] if isinstance(out, tuple) else out

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        step, kernels = self.step, self.kernels
        # A forward that is not the step's (vLLM's profiling and warm-up runs): slot 0.
        single = step.single if x.shape[0] == step.tokens else 0
        if single is not None:
            return self._call(kernels.per_slot[single] or self.layer, x)
        if not kernels.patched:  # a layer no patch tunes: mixed steps route as slot 0 does
            return self._call(self.layer, x)
        if kernels.stacked is not None and x.shape[0] <= self.stack_tokens:
            return torch.take(self._call(kernels.stacked, x), step.flat_index(self.experts))
        out = self._call(self.layer, x)
        for slot, rows in step.rows.items():
            kernel = kernels.per_slot[slot]
            if kernel is not None:
                out.index_copy_(0, rows, self._call(kernel, x.index_select(0, rows)))
        return out

    def _stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's own slot's logits, read through the persistent index buffer (what a
        captured CUDA graph replays): every token's logits under every slot, one GEMM against
        all slots' weights (``[slots * experts, hidden]``), then a gather."""
        assert self.stack is not None
        stacked = self.stack.view(-1, self.stack.shape[-1])
        logits = F.linear(x.to(stacked.dtype), stacked)
        out_dtype = getattr(self.layer, "out_dtype", None)
        if out_dtype is not None:
            logits = logits.to(out_dtype)
        tokens, experts = logits.shape[0], self.experts
        index = self.step.index[:tokens].view(tokens, 1, 1).expand(tokens, 1, experts)
        return logits.view(tokens, -1, experts).gather(1, index).view(tokens, experts)

    def out_dtype(self, x: torch.Tensor) -> torch.dtype:
        return getattr(self.layer, "out_dtype", None) or x.dtype


@torch.library.custom_op("roma::slot_gate", mutates_args=())
def _slot_gate_op(x: torch.Tensor, key: str) -> torch.Tensor:
    return _GATES[key].logits(x)


@_slot_gate_op.register_fake
def _slot_gate_fake(x: torch.Tensor, key: str) -> torch.Tensor:
    gate = _GATES[key]
    return x.new_empty((x.shape[0], gate.experts), dtype=gate.out_dtype(x))
