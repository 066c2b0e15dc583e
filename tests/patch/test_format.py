"""roma_patch: round trip, fingerprints, and every PatchError code, for each model family.

The base routers come from the real tiny checkpoints (``read_checkpoint_routers``), the same
way the gateway reads them; patches are written with ``write_patch`` or, for malformed files
``write_patch`` refuses to produce, with safetensors directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from roma_models.tiny import build_tiny_model
from roma_patch import (
    BaseRouters,
    PatchError,
    PatchMeta,
    RawTensor,
    detect_family,
    read_checkpoint_routers,
    read_patch,
    router_layer,
    router_of_tensor,
    validate_patch,
    write_patch,
)


def base_of(model_dir: Path) -> tuple[BaseRouters, dict[str, torch.Tensor]]:
    raw = read_checkpoint_routers(model_dir)
    return BaseRouters.from_raw(str(model_dir), raw), {n: t.to_torch() for n, t in raw.items()}


def last_two(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = sorted(tensors, key=router_layer)[-2:]
    return {n: tensors[n].clone() for n in names}


def layers_of(tensors: dict[str, torch.Tensor]) -> list[int]:
    return sorted(router_layer(n) for n in tensors)


def meta_for(base: BaseRouters, tensors: dict[str, torch.Tensor], **changes) -> PatchMeta:
    values = dict(
        base_model=base.model,
        base_fingerprint=base.fingerprint(tensors),
        layers=layers_of(tensors),
        objective="manifold",
        hparams={"lr": 1e-3},
        data_fingerprint="0" * 64,
        metrics={"train_acc_after": 0.5},
    )
    values.update(changes)
    return PatchMeta(**values)


def raw_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """A safetensors file with arbitrary names/metadata (write_patch would refuse some)."""
    return save({n: t.contiguous() for n, t in tensors.items()}, metadata)


@pytest.fixture
def family(tiny_model: Path) -> tuple[BaseRouters, dict[str, torch.Tensor]]:
    return base_of(tiny_model)


def code_of(fn, *args, **kwargs) -> PatchError:
    with pytest.raises(PatchError) as info:
        fn(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------- round trip


def test_round_trip_keeps_tensors_metadata_and_id(family, tmp_path: Path) -> None:
    base, tensors = family
    patch_tensors = {n: t + 0.25 for n, t in last_two(tensors).items()}
    meta = meta_for(base, patch_tensors)
    data = write_patch(patch_tensors, meta, tmp_path / "p.safetensors")
    assert (tmp_path / "p.safetensors").read_bytes() == data

    patch = read_patch(tmp_path / "p.safetensors")
    assert patch.id == hashlib.sha256(data).hexdigest()
    assert patch.size == len(data)
    assert patch.layers == layers_of(patch_tensors)
    assert patch.meta.model_dump() == meta.model_dump()
    for name, tensor in patch.to_torch().items():
        assert torch.equal(tensor, patch_tensors[name])
    validate_patch(patch, base)


def test_fingerprint_is_the_same_from_checkpoint_and_from_torch(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, _ = base_of(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    live = {n: p for n, p in model.named_parameters() if router_of_tensor(n)}
    assert BaseRouters.from_torch("x", live).fingerprint() == base.fingerprint()
    names = sorted(live)[-2:]
    assert BaseRouters.from_torch("x", live).fingerprint(names) == base.fingerprint(names)
    # Order-independent, but sensitive to which tensors are covered.
    assert base.fingerprint(reversed(names)) == base.fingerprint(names)
    assert base.fingerprint(names[:1]) != base.fingerprint(names)


def test_fingerprint_changes_with_one_value_and_survives_json(family) -> None:
    base, tensors = family
    changed = dict(tensors)
    name = sorted(tensors)[0]
    changed[name] = tensors[name].clone()
    changed[name][0, 0] += 1e-3
    assert BaseRouters.from_torch("m", changed).fingerprint() != base.fingerprint()
    assert BaseRouters.from_json(json.loads(json.dumps(base.to_json()))).fingerprint() == (
        base.fingerprint()
    )


def test_bf16_patch_round_trips_and_nan_is_caught_in_bf16(family) -> None:
    _, tensors = family
    bf16 = {n: t.to(torch.bfloat16) for n, t in tensors.items()}
    base = BaseRouters.from_torch("bf16-model", bf16)
    assert {s.dtype for s in base.specs.values()} == {"BF16"}
    patch_tensors = last_two(bf16)
    patch = read_patch(write_patch(patch_tensors, meta_for(base, patch_tensors)))
    validate_patch(patch, base)
    name = next(iter(patch_tensors))
    patch_tensors[name][1, 2] = float("nan")
    err = code_of(read_patch, write_patch(patch_tensors, meta_for(base, patch_tensors)))
    assert (err.code, err.param) == ("non_finite", name)


# --------------------------------------------------------------------------- read-time errors


def test_empty_bytes(family) -> None:
    assert code_of(read_patch, b"").code == "empty"


def test_no_tensors(family) -> None:
    base, tensors = family
    meta = meta_for(base, last_two(tensors)).model_copy(update={"layers": []})
    assert code_of(read_patch, raw_file({}, meta.to_metadata())).code == "empty"


@pytest.mark.parametrize(
    "data",
    [b"hello, this is not a patch at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson", b"\x01"],
    ids=["text", "bad-json-header", "one-byte"],
)
def test_not_safetensors(family, data: bytes) -> None:
    assert code_of(read_patch, data).code == "not_safetensors"


class _Trap:
    """Unpickling this would create a file: proof that read_patch never unpickles."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("kind", ["torch-zip", "torch-legacy", "raw-pickle"])
def test_pickle_is_rejected_without_being_loaded(family, tmp_path: Path, kind: str) -> None:
    _, tensors = family
    trap = tmp_path / "unpickled"
    payload = {"state": last_two(tensors), "trap": _Trap(str(trap))}
    if kind == "raw-pickle":
        data = pickle.dumps(payload, protocol=4)
    else:
        buffer = io.BytesIO()
        torch.save(payload, buffer, _use_new_zipfile_serialization=kind == "torch-zip")
        data = buffer.getvalue()
    err = code_of(read_patch, data)
    assert err.code == "not_safetensors"
    assert "pickle" in err.message
    assert not trap.exists()


def test_truncated(family) -> None:
    base, tensors = family
    patch_tensors = last_two(tensors)
    data = write_patch(patch_tensors, meta_for(base, patch_tensors))
    assert code_of(read_patch, data[:-7]).code == "truncated"


def test_too_large(family) -> None:
    base, tensors = family
    patch_tensors = last_two(tensors)
    data = write_patch(patch_tensors, meta_for(base, patch_tensors))
    assert code_of(read_patch, data, max_bytes=len(data) - 1).code == "too_large"
    assert read_patch(data, max_bytes=len(data)).size == len(data)


def test_non_router_tensor_name(family) -> None:
    base, tensors = family
    patch_tensors = last_two(tensors)
    meta = meta_for(base, patch_tensors).to_metadata()
    bad = dict(patch_tensors) | {"model.embed_tokens.weight": torch.zeros(4, 4)}
    err = code_of(read_patch, raw_file(bad, meta))
    assert (err.code, err.param) == ("unknown_tensor", "model.embed_tokens.weight")


def test_non_float_dtype(family) -> None:
    base, tensors = family
    patch_tensors = last_two(tensors)
    meta = meta_for(base, patch_tensors).to_metadata()
    name = next(iter(patch_tensors))
    bad = dict(patch_tensors) | {name: patch_tensors[name].to(torch.int32)}
    assert code_of(read_patch, raw_file(bad, meta)).code == "dtype_mismatch"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(family, value: float) -> None:
    base, tensors = family
    patch_tensors = last_two(tensors)
    name = sorted(patch_tensors)[-1]
    patch_tensors[name][3, 5] = value
    err = code_of(read_patch, write_patch(patch_tensors, meta_for(base, patch_tensors)))
    assert (err.code, err.param) == ("non_finite", name)


@pytest.mark.parametrize(
    ("edit", "param"),
    [
        ({"layers": "[1, 2"}, "layers"),
        ({"hparams": "{oops"}, "hparams"),
        ({"layers": "[0]"}, "layers"),
        ({"base_fingerprint": "not-a-sha256"}, "base_fingerprint"),
        ({"base_model": None}, "base_model"),
        ({"objective": None}, "objective"),
    ],
    ids=["layers-not-json", "hparams-not-json", "layers-disagree", "fingerprint-format",
         "missing-base-model", "missing-objective"],
)  # fmt: skip
def test_bad_metadata(family, edit: dict[str, str | None], param: str) -> None:
    base, tensors = family
    patch_tensors = last_two(tensors)
    meta = meta_for(base, patch_tensors).to_metadata()
    for key, value in edit.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    err = code_of(read_patch, raw_file(patch_tensors, meta))
    assert err.code == "bad_metadata"
    assert err.param == param


def test_not_a_patch_and_format_version(family) -> None:
    base, tensors = family
    patch_tensors = last_two(tensors)
    assert code_of(read_patch, raw_file(patch_tensors, None)).code == "not_a_patch"
    meta = meta_for(base, patch_tensors).to_metadata() | {"format_version": "99"}
    assert code_of(read_patch, raw_file(patch_tensors, meta)).code == "format_version"


# --------------------------------------------------------------------------- validation vs a model


def test_router_of_a_layer_the_model_does_not_have(family, tiny_model: Path) -> None:
    base, tensors = family
    patch_tensors = last_two(tensors)
    first = sorted(patch_tensors)[0]
    config = json.loads((tiny_model / "config.json").read_text())
    layer_40 = detect_family(config).tensor_name(40)
    moved = {layer_40 if n == first else n: t for n, t in patch_tensors.items()}
    patch = read_patch(write_patch(moved, meta_for(base, patch_tensors, layers=layers_of(moved))))
    err = code_of(validate_patch, patch, base)
    assert (err.code, err.param) == ("unknown_tensor", "model.layers.40.mlp.gate.weight")


def test_shape_mismatch(family) -> None:
    base, tensors = family
    patch_tensors = last_two(tensors)
    name = sorted(patch_tensors)[0]
    patch_tensors[name] = torch.cat(
        [patch_tensors[name], patch_tensors[name][:1]]
    )  # one expert more
    patch = read_patch(raw_file(patch_tensors, meta_for(base, last_two(tensors)).to_metadata()))
    err = code_of(validate_patch, patch, base)
    assert (err.code, err.param) == ("shape_mismatch", name)


def test_dtype_mismatch(family) -> None:
    base, tensors = family
    patch_tensors = {n: t.to(torch.bfloat16) for n, t in last_two(tensors).items()}
    patch = read_patch(write_patch(patch_tensors, meta_for(base, last_two(tensors))))
    err = code_of(validate_patch, patch, base)
    assert err.code == "dtype_mismatch"


def test_fingerprint_mismatch_against_other_base_weights(family, tmp_path: Path) -> None:
    """Same names, shapes and dtype, but trained on another checkpoint's routers."""
    base, tensors = family
    other, _ = base_of(build_tiny_model("olmoe", tmp_path / "other", seed=7))
    patch_tensors = last_two(tensors)
    assert set(patch_tensors) <= set(other.specs)
    patch = read_patch(write_patch(patch_tensors, meta_for(other, patch_tensors)))
    err = code_of(validate_patch, patch, base)
    assert (err.code, err.param) == ("fingerprint_mismatch", "base_fingerprint")


def test_raw_tensor_spec_matches_bytes() -> None:
    raw = RawTensor("F32", (2,), torch.tensor([1.0, 2.0]).numpy().tobytes())
    assert raw.spec().sha256 == hashlib.sha256(raw.data).hexdigest()
    assert torch.equal(raw.to_torch(), torch.tensor([1.0, 2.0]))
