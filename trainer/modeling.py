"""Loading a base model and its tokenizer for training, evaluation and patch application."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from roma_patch import BaseRouters
from roma_trainer.routers import model_routers

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """The model cannot be loaded (bad path or id, not a causal LM, no routers)."""


@dataclass
class LoadedModel:
    """A model plus what the patch needs to know about its checkpoint."""

    model: nn.Module
    tokenizer: object
    model_id: str
    base: BaseRouters  # every router as stored in the checkpoint (its dtype, its bytes)
    checkpoint_dtype: dict[str, torch.dtype]  # router name -> dtype in the checkpoint


def resolve_model(model: str | Path | None) -> str:
    if model is None:
        from roma_models import default_model_dir

        return str(default_model_dir())
    return str(model)


def load_model(
    model: str | Path | None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load in the checkpoint's dtype, fingerprint its routers, then cast to ``dtype``.

    Fingerprinting before the cast matters: the patch's ``base_fingerprint`` must equal what
    the gateway computes from the checkpoint files, byte for byte. ``trust_remote_code`` is
    for checkpoints whose architecture transformers lacks (DeepSeekMoE 16B's
    ``DeepseekForCausalLM``), whose routers are named like DeepSeek-V2's (roma_patch.families).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id = resolve_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        net = AutoModelForCausalLM.from_pretrained(
            model_id, dtype="auto", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load model {model_id!r}: {exc}") from exc
    weights = model_routers(net)
    base = BaseRouters.from_torch(model_id, weights)
    ckpt_dtype = {name: w.dtype for name, w in weights.items()}
    if dtype != "auto":
        net = net.to(_DTYPES[dtype])
    net = net.to(device)
    net.eval()  # no dropout: the CE and the routing must be those the server will see
    return LoadedModel(net, tokenizer, model_id, base, ckpt_dtype)
