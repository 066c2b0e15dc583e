"""The routers of one vLLM worker: what they hold, applying a patch to all of them, reading back.

Every version is a complete state relative to the base checkpoint: applying a patch makes each
router hold the patch's tensor when the patch has one, and the base tensor otherwise. Restoring
version 0 is therefore "apply no patch". Only layers whose content changes are swapped.

Apply is all-or-none: every new weight is staged first (conversion, re-packing), then committed
together; if a commit throws, or the functional read-back afterwards does not match, every layer
is put back and the previous version keeps serving.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from roma_patch import (
    BaseRouters,
    Patch,
    PatchError,
    RawTensor,
    detect_family,
    read_checkpoint_routers,
    router_of_vllm_module,
    router_patterns,
    validate_patch,
)
from roma_service.engine.swap import StagedSwap, commit_all, stage

PROBE_TOKENS = 8
PROBE_SEED = 20260


def find_routers(model: nn.Module) -> dict[str, nn.Module]:
    """Router layers of a vLLM model, keyed by their checkpoint tensor name (naming:
    roma_patch.families; a multimodal wrapper's prefix is allowed)."""
    family = detect_family(getattr(model, "config", None))
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        ref = router_of_vllm_module(path, family)
        if ref and hasattr(module, "quant_method") and hasattr(module, "weight"):
            found[ref.tensor] = module
    return found


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local directory holding the served checkpoint: ``model`` itself, or the hub snapshot
    vLLM already downloaded (``local_files_only``: the engine loaded it, so it is cached)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model,
            revision=revision,
            local_files_only=True,
            allow_patterns=["*.safetensors", "*.json"],
        )
    )


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the read-back: the gate's GEMM vs an fp32 reference."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


@dataclass
class Held:
    """What the routers hold: the version and, per router, the source tensor's sha256 and the
    tensor as the engine computes with it (engine dtype and device, for the read-back)."""

    version: str | None
    checksums: dict[str, str]
    weights: dict[str, torch.Tensor]


class ApplyFailed(Exception):
    """Apply failed after staging; the previous routers are serving again."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}


class RouterTable:
    """One worker's routers. ``base`` holds every router of the checkpoint (used to validate
    patches); ``routers`` the ones this worker runs (all of them, except under pipeline
    parallelism)."""

    def __init__(
        self, model_id: str, routers: Mapping[str, nn.Module], base: Mapping[str, RawTensor]
    ) -> None:
        if not routers:
            raise PatchError(
                "no_routers", f"the served model has no {router_patterns('module')} routers"
            )
        missing = sorted(set(routers) - set(base))
        if missing:
            raise PatchError(
                "no_routers", f"the checkpoint has no tensor for engine routers {missing[:3]}"
            )
        self.model_id = model_id
        self.routers = dict(routers)
        self.base = dict(base)
        self.base_specs = BaseRouters.from_raw(model_id, self.base)
        self.held = Held(
            version=None,
            checksums={n: self.base_specs.specs[n].sha256 for n in self.routers},
            weights={n: self._engine_tensor(n, self.base[n]) for n in self.routers},
        )
        self.previous: Held | None = None
        self._probes: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self.reading_back = False  # lets the expert-load hooks ignore the probe batch
        # With resident slots (slots.py), the probe batch must run under the slot read back.
        self.probe_slot: Callable[[int, int], contextlib.AbstractContextManager[None]] = (
            lambda slot, tokens: contextlib.nullcontext()
        )
        # Called with a slot's index before its routers change (the expert-load counters book
        # what that slot counted to the version it held until then).
        self.before_change: Callable[[int], None] = lambda slot: None

    @classmethod
    def of_model(cls, model_config: Any, model: nn.Module) -> RouterTable:
        """The routers of a loaded vLLM model, with the base routers read from its checkpoint."""
        model_dir = resolve_model_dir(model_config.model, getattr(model_config, "revision", None))
        return cls(model_config.model, find_routers(model), read_checkpoint_routers(model_dir))

    # -- applying -------------------------------------------------------------------------

    def target_for(self, patch: Patch | None, version: str) -> Held:
        """The state a patch asks for (validated against the base routers)."""
        tensors: dict[str, RawTensor] = {}
        if patch is not None:
            validate_patch(patch, self.base_specs)
            tensors = patch.tensors
        checksums: dict[str, str] = {}
        weights: dict[str, torch.Tensor] = {}
        for name in self.routers:
            if name in tensors:
                checksums[name] = tensors[name].sha256
                weights[name] = self._engine_tensor(name, tensors[name])
            else:
                checksums[name] = self.base_specs.specs[name].sha256
                weights[name] = self.held.weights[name]
                if self.held.checksums[name] != checksums[name]:
                    weights[name] = self._engine_tensor(name, self.base[name])
        return Held(version, checksums, weights)

    def switch(self, target: Held) -> dict[str, Any]:
        """Make the routers hold ``target``: all layers or none. Returns timings and read-back."""
        changed = [n for n in self.routers if target.checksums[n] != self.held.checksums[n]]
        start = time.perf_counter()
        swaps: list[StagedSwap] = [stage(self.routers[n], target.weights[n]) for n in changed]
        staged = time.perf_counter()
        self.before_change(0)
        try:
            commit_all(swaps)
        except Exception as exc:
            raise ApplyFailed("swap_failed", f"swapping the routers failed: {exc!r}") from exc
        _synchronize(target.weights.values())
        done = time.perf_counter()

        previous, self.held = self.held, target
        readback = self.readback()
        if not readback["verified"]:
            for swap in reversed(swaps):
                swap.rollback()
            self.held = previous
            raise ApplyFailed(
                "readback_failed",
                "the routers did not compute with the new weights; previous routers restored",
                readback,
            )
        self.previous = previous
        return {
            "changed": changed,
            "stage_ms": (staged - start) * 1e3,
            "apply_ms": (done - start) * 1e3,
            **readback,
        }

    def undo(self, version: str) -> bool:
        """Go back to the state before ``version`` if it is the one held (used by the client
        when another worker failed the same apply). Returns whether anything changed."""
        if self.held.version != version or self.previous is None:
            return False
        self.switch(self.previous)
        self.previous = None
        return True

    # -- reading back -----------------------------------------------------------------------

    def readback(self, held: Held | None = None, slot: int = 0) -> dict[str, Any]:
        """Run a fixed probe batch through every live router and compare with probe @ W^T,
        W being what ``held`` (default: the routers' own state) says ``slot`` computes with."""
        held = held or self.held
        layers: dict[str, dict[str, Any]] = {}
        start = time.perf_counter()
        self.reading_back = True
        try:
            with torch.inference_mode(), self.probe_slot(slot, PROBE_TOKENS):
                for name, module in self.routers.items():
                    weight = held.weights[name]
                    probe = self._probe(weight.shape[1], weight.device, weight.dtype)
                    out = module(probe)
                    out = out[0] if isinstance(out, tuple) else out
                    ref = probe.float() @ weight.float().T
                    err = (out.float() - ref).abs().max().item()
                    tol = _tolerance(weight.dtype) * (1.0 + ref.abs().max().item())
                    layers[name] = {
                        "sha256": held.checksums[name],
                        "max_abs_err": err,
                        "verified": bool(err <= tol),
                    }
        finally:
            self.reading_back = False
        return {
            "layers": layers,
            "max_abs_err": max(v["max_abs_err"] for v in layers.values()),
            "verified": all(v["verified"] for v in layers.values()),
            "verify_ms": (time.perf_counter() - start) * 1e3,
        }

    def _probe(self, hidden: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (hidden, device, dtype)
        if key not in self._probes:
            gen = torch.Generator().manual_seed(PROBE_SEED)
            probe = torch.randn(PROBE_TOKENS, hidden, generator=gen)
            self._probes[key] = probe.to(device=device, dtype=dtype)
        return self._probes[key]

    def _engine_tensor(self, name: str, raw: RawTensor) -> torch.Tensor:
        """A checkpoint/patch tensor as the engine computes with it (its dtype and device)."""
        live = self.routers[name].weight
        return raw.to_torch().to(device=live.device, dtype=live.dtype).contiguous()


def _synchronize(tensors: Any) -> None:
    """Wait for queued GPU copies so that apply_ms is the real cost (no-op on the CPU)."""
    for tensor in tensors:
        if tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
            return
