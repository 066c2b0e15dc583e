"""Bad input to the control routes: each gets its 4xx and an OpenAI error body saying why, and
nothing changes: the registry holds the same versions, the same one is active, and completions
are still the active patch's, token for token."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from roma_patch import FAMILIES, PatchMeta
from roma_service.registry import LocalRedis
from tests.fixtures.engine import patch_bytes, perturbed_routers
from tests.service.gateway_support import (
    ALL_LAYERS,
    AUTH,
    gateway_settings,
    greedy,
    running_gateway,
)

pytestmark = pytest.mark.slow
LIMIT = 64 * 1024
router_name = FAMILIES["olmoe"].tensor_name  # the gateway serves the tiny OLMoE


def _pickle(legacy: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save({router_name(0): torch.zeros(8, 128)}, buffer,
               _use_new_zipfile_serialization=not legacy)  # fmt: skip
    return buffer.getvalue()


def _bad_patches(model: Path) -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, expected status, expected error code)."""
    good = perturbed_routers(model, ALL_LAYERS, scale=2.0, seed=7)
    first = router_name(0)
    valid = patch_bytes(model, layers=ALL_LAYERS, scale=2.0, seed=7)
    not_router = save(
        {"model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(8, 128)},
        PatchMeta(base_model="x", base_fingerprint="0" * 64, layers=[0], objective="t")
        .to_metadata(),
    )  # fmt: skip
    nan = dict(good)
    nan[first] = good[first].clone()
    nan[first][3, 5] = float("nan")
    inf = dict(good)
    inf[first] = good[first].clone()
    inf[first][0, 0] = float("inf")
    return {
        "not safetensors": (b"this is not a patch file\n" * 40, 400, "not_safetensors"),
        "pickle (zip)": (_pickle(legacy=False), 400, "not_safetensors"),
        "pickle (legacy)": (_pickle(legacy=True), 400, "not_safetensors"),
        "truncated": (valid[: len(valid) - 1000], 400, "truncated"),
        "empty": (b"", 400, "empty"),
        "no metadata": (save({first: good[first]}), 400, "not_a_patch"),
        "not a router tensor": (not_router, 400, "unknown_tensor"),
        "router of a layer the model lacks": (
            patch_bytes(model, {router_name(99): torch.zeros(8, 128)}),
            400,
            "unknown_tensor",
        ),
        "wrong shape": (
            patch_bytes(model, {first: torch.zeros(4, 128)}),
            400,
            "shape_mismatch",
        ),
        "wrong dtype": (
            patch_bytes(model, {first: good[first].to(torch.bfloat16)}),
            400,
            "dtype_mismatch",
        ),
        "NaN": (patch_bytes(model, nan), 400, "non_finite"),
        "inf": (patch_bytes(model, inf), 400, "non_finite"),
        "wrong base fingerprint": (
            patch_bytes(model, good, fingerprint="ab" * 32),
            400,
            "fingerprint_mismatch",
        ),
        "too large": (b"\0" * (LIMIT + 1), 413, "too_large"),
    }


def _assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, (code, response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["message"]


@pytest.mark.usefixtures("base_routers_after")
async def test_bad_input_is_refused_and_changes_nothing(
    engine_url: str, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    settings = gateway_settings(redis_prefix, max_patch_bytes=LIMIT)
    async with running_gateway(settings, redis_server.url, [engine_url]) as gw:
        active = patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=5)
        assert (await gw.post("/routers", headers=AUTH, content=active)).status_code == 201
        before_tokens, _ = await greedy(gw)
        before = (await gw.get("/routers", headers=AUTH)).json()

        async def unchanged() -> None:
            assert (await gw.get("/routers", headers=AUTH)).json() == before
            tokens, response = await greedy(gw)
            assert tokens == before_tokens and response.headers["X-Router-Version"] == "1"

        # Authentication first: nothing is read without the token.
        valid = patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=6)
        _assert_error(await gw.post("/routers", content=valid), 401, "missing_token")
        bad = {"Authorization": "Bearer not-the-token"}
        _assert_error(await gw.post("/routers", headers=bad, content=valid), 401, "invalid_token")
        basic = {"Authorization": "Basic dXNlcjpwYXNz"}
        _assert_error(await gw.post("/routers", headers=basic, content=valid), 401, "missing_token")
        control = [
            ("GET", "/routers"),
            ("GET", "/routers/active"),
            ("POST", "/routers/0/activate"),
            ("DELETE", "/routers/1"),
        ]
        for method, path in control:
            _assert_error(await gw.request(method, path), 401, "missing_token")

        for name, (data, status, code) in _bad_patches(tiny_olmoe).items():
            raw = await gw.post("/routers", headers=AUTH, content=data)
            _assert_error(raw, status, code)
            multipart = await gw.post("/routers", headers=AUTH, files={"patch": data})
            _assert_error(multipart, status, code)
            assert name  # the case name shows in the assertion message above on failure
        await unchanged()

        # A body that grows past the limit without announcing its length (chunked upload).
        async def chunks():
            for _ in range(LIMIT // 8192 + 2):
                yield b"\0" * 8192

        _assert_error(await gw.post("/routers", headers=AUTH, content=chunks()), 413, "too_large")
        no_field = await gw.post("/routers", headers=AUTH, files={"other": valid})
        _assert_error(no_field, 400, "missing_patch")

        # Versions: unknown, malformed, the active one, the base.
        _assert_error(await gw.get("/routers/99", headers=AUTH), 404, "unknown_version")
        _assert_error(await gw.post("/routers/99/activate", headers=AUTH), 404, "unknown_version")
        _assert_error(await gw.delete("/routers/99", headers=AUTH), 404, "unknown_version")
        _assert_error(await gw.get("/routers/abc", headers=AUTH), 400, "invalid_value")
        _assert_error(await gw.post("/routers/-1/activate", headers=AUTH), 400, "invalid_value")
        _assert_error(await gw.delete("/routers/1", headers=AUTH), 409, "version_active")
        _assert_error(await gw.delete("/routers/0", headers=AUTH), 409, "version_active")

        # Completions: not JSON, not an object; unknown routes and methods.
        json_type = {"Content-Type": "application/json"}
        nope = await gw.post("/v1/completions", content=b"{nope", headers=json_type)
        _assert_error(nope, 400, "invalid_json")
        untyped = await gw.post("/v1/completions", content=b"{nope")
        _assert_error(untyped, 415, "unsupported_media_type")
        _assert_error(await gw.post("/v1/completions", json=[1, 2]), 400, "invalid_json")
        deep = b"[" * 30_000 + b"]" * 30_000
        deep_nested = await gw.post("/v1/completions", content=deep, headers=json_type)
        _assert_error(deep_nested, 400, "invalid_json")
        streamy = {"model": "m", "prompt": "x", "stream": "yes"}
        _assert_error(await gw.post("/v1/completions", json=streamy), 400, "invalid_value")
        _assert_error(await gw.get("/v1/nothing"), 404, "not_found")
        _assert_error(await gw.put("/routers", headers=AUTH), 405, "method_not_allowed")
        await unchanged()
