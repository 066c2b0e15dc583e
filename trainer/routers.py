"""Find, select, freeze and observe the routers of an MoE model.

Where each family keeps its routers is :mod:`roma_patch.families`' business (every family we
support: ``model.layers.N.mlp.gate``, a module whose ``weight`` is ``[num_experts, hidden]``);
DeepSeek's first ``first_k_dense_replace`` layers are dense MLPs (``gate_proj``, no ``gate``),
so they have no router. A router's module path plus ``.weight`` is its checkpoint name, hence
its patch name.

Routing capture: a forward pre-hook on each tuned gate sees the hidden states the router sees
(OLMoE and Qwen3 flatten them to ``[batch*seq, H]`` before the gate, DeepSeek passes
``[batch, seq, H]``; both are row-major over (batch, seq), so row ``b*seq + t`` is token t of
sequence b either way), picks the rows of the chosen token positions and recomputes
``r = softmax(h @ W^T)`` over all experts (before top-k) with the live weight, so gradients flow
into W from both the model's own use of the router and the regulariser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from roma_patch import detect_family, router_of_hf_module, router_patterns, supported_families


class RouterError(ValueError):
    """The model has no routers we recognise, or the layer selection does not fit it."""


def _named_routers(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """Layer index -> (checkpoint name, router module), in layer order. A model of a known
    family is read with its own naming, any other with every family's."""
    family = detect_family(getattr(model, "config", None))
    routers: dict[int, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules():
        ref = router_of_hf_module(path, family)
        weight = getattr(module, "weight", None)
        if ref and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            routers[ref.layer] = (ref.tensor, module)
    if not routers:
        raise RouterError(
            f"{type(model).__name__} has no {router_patterns('module')} routers: "
            f"supported families are {supported_families()}"
        )
    return dict(sorted(routers.items()))


def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> router module, for every MoE layer, in layer order."""
    return {layer: module for layer, (_, module) in _named_routers(model).items()}


def model_routers(model: nn.Module, layers: Sequence[int] | None = None) -> dict[str, nn.Parameter]:
    """Checkpoint (and patch) name -> live router weight (not a copy), for ``layers`` (default:
    every MoE layer), in layer order."""
    routers = _named_routers(model)
    chosen = routers.values() if layers is None else [routers[layer] for layer in layers]
    return {name: module.weight for name, module in chosen}


def select_layers(available: Sequence[int], spec: str | Sequence[int]) -> list[int]:
    """Resolve ``all`` / ``lastN`` / an explicit list against the model's MoE layers."""
    available = sorted(available)
    if isinstance(spec, str):
        if spec == "all":
            return available
        if spec.startswith("last") and spec[4:].isdigit():
            n = int(spec[4:])
            if n < 1:
                raise RouterError("layers: lastN needs N >= 1")
            return available[-n:]
        raise RouterError(f"layers {spec!r}: use 'all', 'lastN' or a list of layer indices")
    missing = sorted(set(spec) - set(available))
    if missing:
        raise RouterError(f"layers {missing} have no router; MoE layers are {available}")
    return sorted(set(spec))


def freeze_all_but_routers(model: nn.Module, layers: Sequence[int]) -> list[nn.Parameter]:
    """Select-then-freeze: only the chosen routers' weights require grad; returns them."""
    routers = find_routers(model)
    for param in model.parameters():
        param.requires_grad_(False)
    params = []
    for layer in layers:
        weight = routers[layer].weight
        weight.requires_grad_(True)
        params.append(weight)
    return params


@dataclass
class RoutingCapture:
    """Records r = softmax(h_t W^T) at one token per sample for each tuned layer.

    Usage: ``with RoutingCapture(model, layers) as cap: cap.target(rows, seq_len); model(...)``
    then ``cap.routing()`` is ``[n, len(layers), num_experts]`` (float32, with grad).
    """

    model: nn.Module
    layers: Sequence[int]
    _rows: torch.Tensor | None = None
    _records: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    def __enter__(self) -> RoutingCapture:
        routers = find_routers(self.model)
        for layer in self.layers:
            self._handles.append(routers[layer].register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def target(self, sequences: torch.Tensor, positions: torch.Tensor, seq_len: int) -> None:
        """Capture token ``positions[i]`` of sequence ``sequences[i]`` in the next forward."""
        self._rows = sequences.long() * seq_len + positions.long()
        self._records.clear()

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self._rows is None:
                return
            hidden = args[0]
            flat = hidden.reshape(-1, hidden.shape[-1])
            rows = flat.index_select(0, self._rows.to(flat.device))
            logits = F.linear(rows.float(), module.weight.float())
            self._records[layer] = torch.softmax(logits, dim=-1)

        return hook

    def routing(self) -> torch.Tensor:
        """The captured routing; also disarms the hooks until the next :meth:`target`."""
        self._rows = None
        missing = [layer for layer in self.layers if layer not in self._records]
        if missing:
            raise RouterError(f"no routing captured for layers {missing}: did the forward run?")
        out = torch.stack([self._records[layer] for layer in self.layers], dim=1)
        self._records.clear()
        return out
