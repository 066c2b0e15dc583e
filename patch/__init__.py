"""The router patch format: the one contract between the trainer and the service.

A patch is a single safetensors file holding only router tensors, named as in the Hugging Face
checkpoint (``model.layers.N.mlp.gate.weight``) and stored in the base checkpoint's dtype, plus
string metadata (see :mod:`roma_patch.format`). :mod:`roma_patch.families` is the table of the
MoE families we support, the one place that knows how each names its routers. Nothing here
imports torch model code, the trainer or vLLM, so both sides (and the engine worker) can depend
on it.
"""

from roma_patch.families import (
    FAMILIES,
    Family,
    RouterRef,
    detect_family,
    router_of_hf_module,
    router_of_tensor,
    router_of_vllm_module,
    router_patterns,
    supported_families,
)
from roma_patch.format import (
    FORMAT_VERSION,
    MAX_PATCH_BYTES,
    BaseRouters,
    Patch,
    PatchError,
    PatchMeta,
    RawTensor,
    TensorSpec,
    fingerprint,
    patch_id,
    raw_from_torch,
    read_checkpoint_routers,
    read_patch,
    router_layer,
    validate_patch,
    write_patch,
)

__all__ = [
    "FAMILIES",
    "FORMAT_VERSION",
    "MAX_PATCH_BYTES",
    "BaseRouters",
    "Family",
    "Patch",
    "PatchError",
    "PatchMeta",
    "RawTensor",
    "RouterRef",
    "TensorSpec",
    "detect_family",
    "fingerprint",
    "patch_id",
    "raw_from_torch",
    "read_checkpoint_routers",
    "read_patch",
    "router_layer",
    "router_of_hf_module",
    "router_of_tensor",
    "router_of_vllm_module",
    "router_patterns",
    "supported_families",
    "validate_patch",
    "write_patch",
]
