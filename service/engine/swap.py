"""Replacing one router's weight inside a loaded vLLM layer, in two phases: stage, then commit.

Staging does everything that can fail (dtype/device conversion, re-packing, allocation) without
touching the live layer; committing only assigns attributes or copies memory, so a whole patch
can be staged first and then committed layer after layer, and rolled back if a commit throws.

Two ways, chosen by where the weight lives:

* GPU (CUDA/ROCm): the layer keeps its ``weight`` tensor, and captured CUDA graphs (and
  torch.compile graphs, which read parameters as inputs) hold its *address*. Replacing the tensor
  would leave those graphs reading the old memory, so we ``copy_`` the new values into the same
  storage. Any tensor derived from the weight at load time (ROCm's ``_bf16x3_weight`` split) is
  rebuilt at staging and copied in place too.
* CPU: ``process_weights_after_loading`` packs small linear weights into a oneDNN/SGL handle,
  captured by the closure ``layer.cpu_linear``, and replaces ``layer.weight`` with an empty tensor.
  A ``copy_`` would write into that empty tensor and change nothing. We re-run the layer's own
  ``process_weights_after_loading`` on a shallow twin of the layer holding the new weight, then
  move the twin's resulting attributes (``cpu_linear``, ``weight``) onto the live layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

# Attributes of an nn.Module that are containers, never results of packing.
_MODULE_CONTAINERS = frozenset({"_parameters", "_buffers", "_modules"})


class StagedSwap(Protocol):
    """A prepared weight change for one layer."""

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


def packed_twin(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A shallow copy of ``layer`` that computes with ``weight``, prepared by the layer's own
    ``process_weights_after_loading`` (on the CPU: packed into a new SGL/oneDNN handle). The
    live layer is not touched. Call the twin through its class's ``forward``: it has none of the
    live layer's instance-level overrides (the slot gate's)."""
    twin = copy.copy(layer)  # new __dict__, but the containers are still shared...
    twin._parameters = dict(layer._parameters)  # ...so give the twin its own
    twin._buffers = dict(layer._buffers)
    twin.__dict__.pop("forward", None)
    twin.weight = nn.Parameter(weight, requires_grad=False)
    layer.quant_method.process_weights_after_loading(twin)
    return twin


def stage(layer: nn.Module, new_weight: torch.Tensor) -> StagedSwap:
    """Prepare ``layer`` to compute with ``new_weight`` (any dtype/device; converted here)."""
    device = _weight_device(layer)
    target = new_weight.to(device=device, dtype=layer.weight.dtype).contiguous()
    if device.type == "cpu":
        return _RepackSwap.prepare(layer, target)
    return _InPlaceSwap.prepare(layer, target)


def _weight_device(layer: nn.Module) -> torch.device:
    return layer.weight.device


@dataclass
class _InPlaceSwap:
    """GPU: same storage, new values (keeps captured CUDA graphs valid)."""

    layer: nn.Module
    new: torch.Tensor
    old: torch.Tensor
    derived_new: dict[str, torch.Tensor] = field(default_factory=dict)
    derived_old: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def prepare(cls, layer: nn.Module, new: torch.Tensor) -> _InPlaceSwap:
        if tuple(layer.weight.shape) != tuple(new.shape):
            raise ValueError(
                f"{getattr(layer, 'prefix', 'gate')}: engine weight has shape "
                f"{list(layer.weight.shape)}, patch has {list(new.shape)}"
            )
        swap = cls(layer, new, layer.weight.detach().clone())
        split = getattr(layer, "_bf16x3_weight", None)
        if split is not None:
            # ROCm bf16x3 router GEMM reads a split of the weight built at load time.
            from vllm.model_executor.layers.fused_moe.router import bf16x3_router_gemm_rocm

            swap.derived_new["_bf16x3_weight"] = bf16x3_router_gemm_rocm.split_bf16x3(new)
            swap.derived_old["_bf16x3_weight"] = split.detach().clone()
        return swap

    def _write(self, weight: torch.Tensor, derived: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.layer.weight.data.copy_(weight)
            for name, value in derived.items():
                getattr(self.layer, name).copy_(value)

    def commit(self) -> None:
        self._write(self.new, self.derived_new)

    def rollback(self) -> None:
        self._write(self.old, self.derived_old)


@dataclass
class _RepackSwap:
    """CPU: re-pack on a twin, then move the packed result onto the live layer."""

    layer: nn.Module
    new_attrs: dict[str, Any]
    new_params: dict[str, nn.Parameter | None]
    new_buffers: dict[str, torch.Tensor | None]
    old_attrs: dict[str, Any]
    old_params: dict[str, nn.Parameter | None]
    old_buffers: dict[str, torch.Tensor | None]

    @classmethod
    def prepare(cls, layer: nn.Module, new: torch.Tensor) -> _RepackSwap:
        twin = packed_twin(layer, new)
        changed_attrs = {
            k: v
            for k, v in twin.__dict__.items()
            if k not in _MODULE_CONTAINERS and layer.__dict__.get(k, _MISSING) is not v
        }
        changed_params = {
            k: v for k, v in twin._parameters.items() if layer._parameters.get(k) is not v
        }
        changed_buffers = {k: v for k, v in twin._buffers.items() if layer._buffers.get(k) is not v}
        return cls(
            layer=layer,
            new_attrs=changed_attrs,
            new_params=changed_params,
            new_buffers=changed_buffers,
            old_attrs={k: layer.__dict__.get(k, _MISSING) for k in changed_attrs},
            old_params={k: layer._parameters.get(k) for k in changed_params},
            old_buffers={k: layer._buffers.get(k) for k in changed_buffers},
        )

    def _write(
        self,
        attrs: dict[str, Any],
        params: dict[str, nn.Parameter | None],
        buffers: dict[str, torch.Tensor | None],
    ) -> None:
        # Plain dict writes: nothing here can fail half-way for a reason of ours.
        for key, value in attrs.items():
            if value is _MISSING:
                self.layer.__dict__.pop(key, None)
            else:
                self.layer.__dict__[key] = value
        self.layer._parameters.update(params)
        self.layer._buffers.update(buffers)

    def commit(self) -> None:
        self._write(self.new_attrs, self.new_params, self.new_buffers)

    def rollback(self) -> None:
        self._write(self.old_attrs, self.old_params, self.old_buffers)


_MISSING: Any = object()


def commit_all(swaps: list[StagedSwap]) -> None:
    """Commit every staged swap, or none: on an exception, undo the ones already committed."""
    touched: list[StagedSwap] = []
    try:
        for swap in swaps:
            touched.append(swap)  # before commit: a commit that throws half-way is undone too
            swap.commit()
    except BaseException:
        for swap in reversed(touched):
            swap.rollback()
        raise
