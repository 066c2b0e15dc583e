"""``/routers/traffic`` through the real app (real uvicorn, real Redis, no engine): reads, bad
input answered 4xx before anything is locked or loaded, versions in a split kept from deletion,
promote and abort (Redis only here: no engine to unpin). Putting a split in force needs the
engines' slots (their ``Residency``) and is the integration tests' (with a real engine)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from roma_patch import read_patch
from roma_service.registry import LocalRedis, Registry
from tests.fixtures.engine import base_routers, patch_bytes
from tests.service.gateway_support import AUTH, gateway_settings, running_gateway

DEAD = "http://127.0.0.1:9"  # nothing listens: the routes below must not need an engine


def _error(response: httpx.Response, status: int, code: str, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == param, error
    return error["message"]


async def _open(gw: httpx.AsyncClient, model: Path, n: int) -> tuple[Registry, list[int]]:
    """Open the served model's namespace (an engine would report its base routers) and store
    ``n`` versions, as POST /routers?activate=false would with an engine up."""
    registry: Registry = gw.app.state.gateway.registry  # type: ignore[attr-defined]
    await registry.record_base(base_routers(model))
    versions = []
    for seed in range(1, n + 1):
        data = patch_bytes(model, seed=seed)
        versions.append((await registry.store(read_patch(data), data))[0].version)
    return registry, versions


async def test_traffic_routes_read_refuse_bad_input_and_change_nothing(
    redis_server: LocalRedis, redis_prefix: str, tiny_olmoe: Path
) -> None:
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [DEAD], wait_ready=False) as gw:
        routes = [
            ("GET", "/routers/traffic"),
            ("PUT", "/routers/traffic"),
            ("POST", "/routers/traffic/promote"),
            ("POST", "/routers/traffic/abort"),
            ("GET", "/routers/traffic/history"),
        ]
        for method, path in routes:
            _error(await gw.request(method, path), 401, "missing_token")
        _error(await gw.get("/routers/traffic", headers=AUTH), 503, "not_ready")

        registry, (v1, v2) = await _open(gw, tiny_olmoe, 2)
        await registry.activate(v1, "deploy", "t")
        # "traffic" is a route of its own, never read as a version number.
        none = await gw.get("/routers/traffic", headers=AUTH)
        assert none.status_code == 200
        assert none.json() == {"weights": None, "active": v1, "at": None, "by": None,
                               "reason": None}  # fmt: skip
        history = await gw.get("/routers/traffic/history", headers=AUTH)
        assert history.json() == {"object": "list", "data": []}

        put = "/routers/traffic"
        bad = [
            ({"weights": [0.9, 0.1]}, "invalid_split", "weights", "must be an object"),
            ({"weights": {}}, "invalid_split", "weights", "at least one router version"),
            ({"weights": {"v1": 1.0}}, "invalid_split", "weights", "'v1' is not a router"),
            ({"weights": {"-1": 1.0}}, "invalid_split", "weights", "'-1' is not a router"),
            ({"weights": {"1": "1"}}, "invalid_split", "weights", "'1' is not a number"),
            ({"weights": {"1": 1.5, "2": -0.5}}, "invalid_split", "weights", "1.5 is not a share"),
            ('{"weights": {"1": NaN}}', "invalid_split", "weights", "nan is not a share"),
            ('{"weights": {"1": Infinity}}', "invalid_split", "weights", "inf is not a share"),
            ({"weights": {"1": 0.9, "2": 0.2}}, "invalid_split", "weights", "they sum to 1.1"),
            ({"weights": {"1": 0.9, "2": 0.1}, "wieghts": 1}, "invalid_value", "wieghts", "Extra"),
            ({"weights": {"1": 1.0}, "reason": "x" * 201}, "invalid_value", "reason", "at most"),
            ({}, "invalid_value", "weights", "Field required"),
        ]
        json_type = AUTH | {"Content-Type": "application/json"}
        for body, code, param, fragment in bad:
            # Python's JSON reader takes NaN and Infinity (httpx will not send them: raw text).
            raw = body if isinstance(body, str) else json.dumps(body)
            message = _error(await gw.put(put, headers=json_type, content=raw), 400, code, param)
            assert fragment in message, (body, message)
        unknown = await gw.put(put, headers=AUTH, json={"weights": {str(v1): 0.5, "99": 0.5}})
        assert "version 99 does not exist" in _error(unknown, 404, "unknown_version", "weights")

        promote = "/routers/traffic/promote"
        _error(await gw.post(promote, headers=AUTH, json={"version": -1}), 400, "invalid_value",
               "version")  # fmt: skip
        _error(await gw.post(promote, headers=AUTH, json={"version": "x"}), 400, "invalid_value",
               "version")  # fmt: skip
        _error(await gw.post(promote, headers=AUTH, json={"versoin": 2}), 400, "invalid_value",
               "versoin")  # fmt: skip
        _error(await gw.post(promote, headers=AUTH, json={"version": 99}), 404, "unknown_version",
               "version")  # fmt: skip
        limit = await gw.get("/routers/traffic/history?limit=0", headers=AUTH)
        _error(limit, 400, "invalid_value", "limit")
        assert await registry.traffic() is None and await registry.traffic_history() == []

        # A split in force (as the Canary records it): read back; its versions cannot go.
        await registry.set_traffic({v1: 0.9, v2: 0.1}, "canary", "gw-x")
        split = (await gw.get("/routers/traffic", headers=AUTH)).json()
        assert split["weights"] == {str(v1): 0.9, str(v2): 0.1} and split["active"] == v1
        assert (split["reason"], split["by"]) == ("canary", "gw-x")
        in_use = await gw.delete(f"/routers/{v2}", headers=AUTH)
        message = _error(in_use, 409, "version_in_use", "version")
        assert "traffic split {1: 0.9, 2: 0.1}" in message and "/routers/traffic/abort" in message
        # Promote and abort go by Redis alone until the engines are asked to unpin.
        outside = await gw.post(promote, headers=AUTH, json={"version": 0})
        assert "version 0 is not in the traffic split" in _error(outside, 409, "not_in_split",
                                                                   "version")  # fmt: skip
        abort = await gw.post("/routers/traffic/abort", headers=AUTH)
        assert abort.status_code == 200, abort.text
        body = abort.json()
        assert (body["weights"], body["active"], body["changed"]) == (None, v1, True)
        assert body["previous"] == {str(v1): 0.9, str(v2): 0.1}
        again = (await gw.post("/routers/traffic/abort", headers=AUTH)).json()
        assert (again["changed"], again["previous"]) == (False, None)
        _error(await gw.post(promote, headers=AUTH), 409, "no_split", "version")
        assert (await gw.delete(f"/routers/{v2}", headers=AUTH)).status_code == 200

        data = patch_bytes(tiny_olmoe, seed=3)
        v3 = (await registry.store(read_patch(data), data))[0].version
        await registry.set_traffic({v1: 0.8, v3: 0.2}, "canary", "gw-x")
        promoted = await gw.post(promote, headers=AUTH)  # the one version besides the active
        assert promoted.status_code == 200, promoted.text
        assert (promoted.json()["active"], promoted.json()["weights"]) == (v3, None)
        assert await registry.active() == v3 and await registry.traffic() is None
        assert (await registry.history())[-1].reason == "promote"
        entries = (await gw.get("/routers/traffic/history", headers=AUTH)).json()["data"]
        assert [(e["weights"], e["reason"]) for e in entries] == [
            ({str(v1): 0.9, str(v2): 0.1}, "canary"),
            (None, "abort"),
            ({str(v1): 0.8, str(v3): 0.2}, "canary"),
            (None, "promote"),
        ]

        schema = (await gw.get("/openapi.json")).json()["paths"]
        assert set(schema["/routers/traffic"]) == {"get", "put"}
        assert {"400", "404", "409"} <= set(schema["/routers/traffic"]["put"]["responses"])
        assert {"/routers/traffic/promote", "/routers/traffic/abort",
                "/routers/traffic/history"} <= set(schema)  # fmt: skip


@pytest.mark.parametrize("body", [b"{", b"[1]", b'"weights"'])
async def test_a_body_that_is_not_an_object_is_400(
    redis_server: LocalRedis, redis_prefix: str, body: bytes
) -> None:
    settings = gateway_settings(redis_prefix)
    async with running_gateway(settings, redis_server.url, [DEAD], wait_ready=False) as gw:
        headers = AUTH | {"Content-Type": "application/json"}
        response = await gw.put("/routers/traffic", headers=headers, content=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
