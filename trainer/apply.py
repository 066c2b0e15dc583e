"""Apply a router patch to a loaded Hugging Face model (for evaluation, or offline use).

Validation is :func:`roma_patch.validate_patch` against the model's own routers as loaded, so
the model must be in its checkpoint dtype (``load_model(..., dtype="auto")``); each failure is a
:class:`roma_patch.PatchError` with its code (``unknown_tensor``, ``shape_mismatch``,
``dtype_mismatch``, ``fingerprint_mismatch``, plus the read-time codes of ``read_patch``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from roma_patch import BaseRouters, Patch, read_patch, validate_patch
from roma_trainer.routers import model_routers


def apply_patch(
    model: nn.Module, patch: Patch | bytes | str | Path, model_id: str = "model"
) -> Patch:
    """Validate ``patch`` against ``model``'s current routers, then copy it in. Returns it.

    All checks run before the first copy, so a bad patch never leaves the model half-patched.
    """
    if not isinstance(patch, Patch):
        patch = read_patch(patch)
    routers = model_routers(model)
    validate_patch(patch, BaseRouters.from_torch(model_id, routers))
    with torch.no_grad():
        for name, raw in patch.tensors.items():
            routers[name].copy_(raw.to_torch())
    return patch
