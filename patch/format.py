"""Router patch format, validation and fingerprints.

File layout: one safetensors file (https://github.com/huggingface/safetensors, never pickle).

* Tensors: only routers, each named exactly as in the Hugging Face checkpoint
  (``model.layers.<N>.mlp.gate.weight``; :mod:`roma_patch.families` owns the naming), shape
  ``[num_experts, hidden_size]``, in the base checkpoint's dtype.
* Metadata (safetensors allows ``str -> str`` only; structured values are JSON strings):

  ==================  ======================================================================
  ``format``          always ``roma-router-patch``
  ``format_version``  ``1``
  ``base_model``      the model id or path the patch was trained on (informative)
  ``base_fingerprint`` :func:`fingerprint` of the *base* router tensors this patch replaces
  ``layers``          JSON list of the layer indices it replaces
  ``objective``       e.g. ``manifold``
  ``hparams``         JSON object of the training hyper-parameters
  ``data_fingerprint`` sha256 of the training data
  ``metrics``         JSON object of training metrics
  ``created_at``      ISO-8601 UTC time
  ==================  ======================================================================

The patch id is the sha256 of the file's bytes, so the same bytes always get the same id.
Reading and validating needs no torch (the gateway image stays slim): values are checked for
finiteness from their IEEE bit patterns, and hashes are taken over the raw little-endian bytes,
which are identical whether a tensor came from a checkpoint file, a torch tensor or a patch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from safetensors import SafetensorError, deserialize, safe_open

from roma_patch.families import router_of_tensor, router_patterns

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "roma-router-patch"
FORMAT_VERSION = "1"
MAX_PATCH_BYTES = 64 * 1024 * 1024

# safetensors dtype code -> (element bytes, unsigned view, exponent mask). A float is not finite
# exactly when all its exponent bits are set, which lets us check bf16 without torch.
_FLOAT_BITS: dict[str, tuple[int, type[np.unsignedinteger], int]] = {
    "F64": (8, np.uint64, 0x7FF0000000000000),
    "F32": (4, np.uint32, 0x7F800000),
    "F16": (2, np.uint16, 0x7C00),
    "BF16": (2, np.uint16, 0x7F80),
}
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class PatchError(ValueError):
    """A patch that cannot be used. ``code`` is stable and machine-readable; ``param`` names the
    offending tensor or field when there is one."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass(frozen=True)
class TensorSpec:
    """What the validator needs to know about one base router tensor."""

    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, F16, F64
    sha256: str


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored: dtype code, shape and raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def spec(self) -> TensorSpec:
        return TensorSpec(self.shape, self.dtype, self.sha256)

    def to_torch(self) -> torch.Tensor:
        import torch

        dtype = getattr(torch, _TORCH_NAMES[self.dtype])
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape)


class PatchMeta(BaseModel):
    """The metadata block; see the module docstring for each field."""

    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION
    base_model: str
    base_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    layers: list[int]
    objective: str
    hparams: dict[str, Any] = Field(default_factory=dict)
    data_fingerprint: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    # ClassVar: a bare underscore name would become a pydantic private attribute (not iterable).
    _JSON_FIELDS: ClassVar[tuple[str, ...]] = ("layers", "hparams", "metrics")

    def to_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self.model_dump().items():
            out[key] = json.dumps(value, sort_keys=True) if key in self._JSON_FIELDS else str(value)
        return out

    @classmethod
    def from_metadata(cls, raw: Mapping[str, str] | None) -> PatchMeta:
        raw = dict(raw or {})
        if raw.get("format") != FORMAT_NAME:
            raise PatchError(
                "not_a_patch",
                f"safetensors metadata 'format' is {raw.get('format')!r}, expected "
                f"{FORMAT_NAME!r}: this file was not written by roma-train",
                "format",
            )
        if raw.get("format_version") != FORMAT_VERSION:
            raise PatchError(
                "format_version",
                f"patch format_version {raw.get('format_version')!r} is not supported "
                f"(this build reads {FORMAT_VERSION!r})",
                "format_version",
            )
        values: dict[str, Any] = dict(raw)
        for key in cls._JSON_FIELDS:
            if key in values:
                try:
                    values[key] = json.loads(values[key])
                except json.JSONDecodeError as exc:
                    raise PatchError("bad_metadata", f"metadata {key!r} is not JSON", key) from exc
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or None
            raise PatchError("bad_metadata", f"metadata {loc}: {first['msg']}", loc) from exc


@dataclass
class Patch:
    """A parsed patch: metadata, tensors, and the id (sha256) of the bytes it came from."""

    meta: PatchMeta
    tensors: dict[str, RawTensor]
    id: str
    size: int

    @property
    def layers(self) -> list[int]:
        return sorted(router_layer(name) for name in self.tensors)

    def specs(self) -> dict[str, TensorSpec]:
        return {name: t.spec() for name, t in self.tensors.items()}

    def to_torch(self) -> dict[str, torch.Tensor]:
        return {name: t.to_torch() for name, t in self.tensors.items()}


@dataclass
class BaseRouters:
    """The router tensors of a base model, as the validator sees them."""

    model: str
    specs: dict[str, TensorSpec] = field(default_factory=dict)

    def fingerprint(self, names: Iterable[str] | None = None) -> str:
        names = list(self.specs if names is None else names)
        return fingerprint({n: self.specs[n] for n in names})

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "specs": {
                n: {"shape": list(s.shape), "dtype": s.dtype, "sha256": s.sha256}
                for n, s in self.specs.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BaseRouters:
        specs = {
            n: TensorSpec(tuple(s["shape"]), s["dtype"], s["sha256"])
            for n, s in data["specs"].items()
        }
        return cls(model=data["model"], specs=specs)

    @classmethod
    def from_raw(cls, model: str, tensors: Mapping[str, RawTensor]) -> BaseRouters:
        return cls(model=model, specs={n: t.spec() for n, t in tensors.items()})

    @classmethod
    def from_torch(cls, model: str, tensors: Mapping[str, torch.Tensor]) -> BaseRouters:
        return cls.from_raw(model, {n: raw_from_torch(t) for n, t in tensors.items()})


def router_layer(name: str) -> int:
    """The layer of a router tensor; :class:`PatchError` ``unknown_tensor`` if it is none."""
    ref = router_of_tensor(name)
    if ref is None:
        raise PatchError(
            "unknown_tensor",
            f"tensor {name!r} is not a router (expected {router_patterns()})",
            name,
        )
    return ref.layer


def raw_from_torch(tensor: torch.Tensor) -> RawTensor:
    import torch

    t = tensor.detach().to("cpu").contiguous()
    code = {v: k for k, v in _TORCH_NAMES.items()}.get(str(t.dtype).removeprefix("torch."))
    if code is None:
        raise PatchError("dtype_mismatch", f"router dtype {t.dtype} is not a float type")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return RawTensor(code, tuple(t.shape), data)


def fingerprint(specs: Mapping[str, TensorSpec]) -> str:
    """sha256 over (name, dtype, shape, content hash) of each tensor, in name order."""
    lines = [
        f"{n}|{s.dtype}|{','.join(map(str, s.shape))}|{s.sha256}" for n, s in sorted(specs.items())
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def patch_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_patch(
    tensors: Mapping[str, torch.Tensor], meta: PatchMeta, path: str | Path | None = None
) -> bytes:
    """Serialise router tensors + metadata; write to ``path`` when given. Returns the bytes."""
    from safetensors.torch import save

    for name in tensors:
        router_layer(name)
    data = save(
        {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, meta.to_metadata()
    )
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise PatchError(
            "not_safetensors", f"{len(data)} bytes is too short to be a safetensors file"
        )
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > min(len(data) - 8, 100 * 1024 * 1024):
        # A pickle (torch.save) starts with 0x80 0x02..0x05: its first 8 bytes read as an
        # absurd header length, which is how we reject it without ever unpickling.
        kind = "a pickle" if data[:1] == b"\x80" or data[:2] == b"PK" else "not safetensors"
        raise PatchError("not_safetensors", f"the upload is {kind}: bad safetensors header length")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PatchError("not_safetensors", "safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise PatchError("not_safetensors", "safetensors header is not a JSON object")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > len(data):
        raise PatchError(
            "truncated", f"file is truncated: tensors need {8 + n + end} bytes, got {len(data)}"
        )
    return header


def read_patch(source: bytes | str | Path, max_bytes: int = MAX_PATCH_BYTES) -> Patch:
    """Parse and check a patch on its own (format, names, finiteness). No pickle, no torch."""
    data = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
    if not data:
        raise PatchError("empty", "the patch is empty")
    if len(data) > max_bytes:
        raise PatchError("too_large", f"patch is {len(data)} bytes; the limit is {max_bytes}")
    header = _header(data)
    meta = PatchMeta.from_metadata(header.get("__metadata__"))
    try:
        entries = deserialize(data)
    except SafetensorError as exc:
        raise PatchError("not_safetensors", f"safetensors could not parse the file: {exc}") from exc
    if not entries:
        raise PatchError("empty", "the patch holds no tensors")
    tensors: dict[str, RawTensor] = {}
    for name, entry in entries:
        router_layer(name)
        raw = RawTensor(entry["dtype"], tuple(entry["shape"]), bytes(entry["data"]))
        _check_finite(name, raw)
        tensors[name] = raw
    layers = sorted(router_layer(n) for n in tensors)
    if sorted(meta.layers) != layers:
        raise PatchError(
            "bad_metadata",
            f"metadata layers {sorted(meta.layers)} do not match the tensors' layers {layers}",
            "layers",
        )
    return Patch(meta=meta, tensors=tensors, id=patch_id(data), size=len(data))


def _check_finite(name: str, raw: RawTensor) -> None:
    if raw.dtype not in _FLOAT_BITS:
        raise PatchError("dtype_mismatch", f"{name}: dtype {raw.dtype} is not a float type", name)
    _, view, mask = _FLOAT_BITS[raw.dtype]
    bits = np.frombuffer(raw.data, dtype=np.dtype(view).newbyteorder("<"))
    if np.any((bits & view(mask)) == view(mask)):
        raise PatchError("non_finite", f"{name} holds NaN or infinite values", name)


def validate_patch(patch: Patch, base: BaseRouters) -> None:
    """Check a parsed patch against a model's base routers; raise the first problem found."""
    for name, raw in sorted(patch.tensors.items()):
        spec = base.specs.get(name)
        if spec is None:
            raise PatchError(
                "unknown_tensor", f"{name} is not a router of the served model {base.model}", name
            )
        if raw.shape != spec.shape:
            raise PatchError(
                "shape_mismatch",
                f"{name} has shape {list(raw.shape)}; the served model's is {list(spec.shape)}",
                name,
            )
        if raw.dtype != spec.dtype:
            raise PatchError(
                "dtype_mismatch", f"{name} has dtype {raw.dtype}; the base is {spec.dtype}", name
            )
    expected = base.fingerprint(patch.tensors)
    if patch.meta.base_fingerprint != expected:
        raise PatchError(
            "fingerprint_mismatch",
            f"patch was trained on other base routers (fingerprint "
            f"{patch.meta.base_fingerprint[:12]}..., served model's {expected[:12]}...)",
            "base_fingerprint",
        )


def read_checkpoint_routers(model_dir: str | Path) -> dict[str, RawTensor]:
    """Router tensors straight from a checkpoint directory's ``*.safetensors`` files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    out: dict[str, RawTensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if router_of_tensor(name) is not None:
                    out[name] = raw_from_torch(handle.get_tensor(name))
    if not out:
        raise PatchError("no_routers", f"{model_dir} holds no {router_patterns()}")
    return out
