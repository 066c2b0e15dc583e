"""What vLLM users expect from an OpenAI server, through the gateway (the session's real engine,
a real Redis): the routes vLLM serves, one error shape whoever refused, the router version on
every answer, client API keys, and staged (not yet active) versions for canaries."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from roma_service.registry import LocalRedis
from tests.fixtures.engine import RunningEngine, patch_bytes
from tests.service.gateway_support import (
    ALL_LAYERS,
    AUTH,
    PROMPT_IDS,
    gateway_settings,
    greedy,
    model_id,
    running_gateway,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("base_routers_after")]


def _openai_error(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and isinstance(error["code"], str) and error["message"]
    assert "X-Router-Version" in response.headers
    return error


async def test_vllm_routes_errors_and_the_version_header(
    engine: RunningEngine, redis_server: LocalRedis, redis_prefix: str
) -> None:
    async with running_gateway(
        gateway_settings(redis_prefix), redis_server.url, [engine.url]
    ) as gw:
        model = await model_id(gw)
        one = await gw.get(f"/v1/models/{model}")
        assert one.status_code == 200 and one.json()["id"] == model
        assert one.headers["X-Router-Version"] == "0"
        _openai_error(await gw.get("/v1/models/no-such-model"), 404, "not_found_error")

        tokenized = await gw.post("/tokenize", json={"model": model, "prompt": "Hello world"})
        assert tokenized.status_code == 200 and tokenized.headers["X-Router-Version"] == "0"
        direct = httpx.post(
            f"{engine.url}/tokenize", json={"model": model, "prompt": "Hello world"}
        )
        assert tokenized.json()["tokens"] == direct.json()["tokens"]
        text = await gw.post(
            "/detokenize", json={"model": model, "tokens": direct.json()["tokens"]}
        )
        assert text.status_code == 200 and "Hello" in text.json()["prompt"]
        assert (await gw.get("/version")).json()["version"]

        # The engine's refusals, in the gateway's shape (vLLM's own has an integer code).
        unknown = {"model": "no/such-model", "prompt": "x", "max_tokens": 2}
        error = _openai_error(
            await gw.post("/v1/completions", json=unknown), 404, "not_found_error"
        )
        assert "no/such-model" in error["message"] and error["code"] == "not_found"
        bad = {"model": model, "prompt": "x", "max_tokens": -1}
        error = _openai_error(
            await gw.post("/v1/completions", json=bad), 400, "invalid_request_error"
        )
        assert error["code"] == "bad_request"
        # Not JSON: 415, before the body is read.
        form = await gw.post("/v1/completions", data={"model": model, "prompt": "x"})
        assert _openai_error(form, 415, "invalid_request_error")["code"] == "unsupported_media_type"
        # The version on the gateway's own answers too, errors included.
        for response in (
            await gw.get("/health"),
            await gw.get("/ready"),
            await gw.get("/routers"),  # 401
            await gw.get("/no/such/route"),  # 404
            await gw.get("/routers/99", headers=AUTH),  # 404 from the registry
        ):
            assert response.headers["X-Router-Version"] == "0", response.url


async def test_api_keys_protect_the_openai_routes_only(
    engine: RunningEngine, redis_server: LocalRedis, redis_prefix: str
) -> None:
    settings = gateway_settings(redis_prefix, api_keys="key-one,key-two")
    async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
        missing = await gw.get("/v1/models")
        assert _openai_error(missing, 401, "authentication_error")["code"] == "missing_api_key"
        wrong = await gw.get("/v1/models", headers={"Authorization": "Bearer key-three"})
        assert _openai_error(wrong, 401, "authentication_error")["code"] == "invalid_api_key"
        admin = await gw.post("/tokenize", json={"prompt": "x"}, headers=AUTH)  # not a key
        assert admin.status_code == 401
        key = {"Authorization": "Bearer key-two"}
        assert (await gw.get("/v1/models", headers=key)).status_code == 200
        model = (await gw.get("/v1/models", headers=key)).json()["data"][0]["id"]
        tokenized = await gw.post("/tokenize", json={"model": model, "prompt": "x"}, headers=key)
        assert tokenized.status_code == 200
        assert (await gw.get("/health")).status_code == 200  # probes need no key
        assert (await gw.get("/routers", headers=AUTH)).status_code == 200  # the admin token


async def test_a_version_stored_without_activating_waits_for_its_activation(
    engine: RunningEngine, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    async with running_gateway(
        gateway_settings(redis_prefix), redis_server.url, [engine.url]
    ) as gw:
        base_tokens, _ = await greedy(gw)
        patch = patch_bytes(tiny_olmoe, layers=ALL_LAYERS, scale=2.0, seed=5)
        staged = await gw.post(
            "/routers", params={"activate": "false"}, headers=AUTH, content=patch
        )
        assert staged.status_code == 201, staged.text
        body = staged.json()
        assert (body["version"], body["active"], body["changed"], body["engines"]) == (
            1,
            0,
            False,
            [],
        )
        assert body["timings_ms"]["validate"] > 0 and body["timings_ms"]["apply"] == 0
        tokens, response = await greedy(gw)
        assert response.headers["X-Router-Version"] == "0" and tokens == base_tokens
        record = (await gw.get("/routers/1", headers=AUTH)).json()
        assert record["status"] == "staged" and not record["active"]
        # The same bytes again, still without activating: the same version, nothing changes.
        again = await gw.post("/routers?activate=false", headers=AUTH, content=patch)
        assert again.status_code == 200 and again.json()["active"] == 0
        # Posting them plainly activates that version (documented: re-posting re-activates).
        deployed = await gw.post("/routers", headers=AUTH, content=patch)
        assert deployed.status_code == 200 and deployed.json()["created"] is False
        assert deployed.json()["active"] == 1 and deployed.json()["changed"]
        tokens, response = await greedy(gw)
        assert response.headers["X-Router-Version"] == "1" and tokens != base_tokens


async def test_the_completion_routes_are_served_in_front_of_fastapi(
    engine: RunningEngine, redis_server: LocalRedis, redis_prefix: str
) -> None:
    """``CompletionsFastPath`` answers the two completion routes itself (the app behind it is
    never called), with the proxy's answers and the app's own error handlers, and passes
    everything else on."""
    from roma_service.gateway.completions.fast_path import CompletionsFastPath

    settings = gateway_settings(redis_prefix, api_keys="key-one")
    key = {"Authorization": "Bearer key-one"}
    async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
        passed_on: list[str] = []

        async def behind(scope: Scope, receive: Receive, send: Send) -> None:
            passed_on.append(f"{scope['method']} {scope['path']}")
            await send({"type": "http.response.start", "status": 299, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        fast = CompletionsFastPath(behind)

        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            scope["app"] = gw.app  # type: ignore[attr-defined]  (what Starlette sets)
            await fast(scope, receive, send)

        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            model = (await gw.get("/v1/models", headers=key)).json()["data"][0]["id"]
            body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": 6, "min_tokens": 6,
                    "temperature": 0.0, "return_token_ids": True}  # fmt: skip
            through_gateway = await gw.post("/v1/completions", json=body, headers=key)
            fast_answer = await client.post("/v1/completions", json=body, headers=key)
            assert fast_answer.status_code == 200, fast_answer.text
            assert fast_answer.headers["X-Router-Version"] == "0"
            assert (
                fast_answer.json()["choices"][0]["token_ids"]
                == through_gateway.json()["choices"][0]["token_ids"]
            )
            stream = body | {"stream": True}
            streamed = await client.post("/v1/completions", json=stream, headers=key)
            assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
            assert ": x-router-version 0" in streamed.text

            # The chat route is served here too: the engine's refusal (the tiny model has no
            # chat template) comes back in the gateway's shape, through the proxy.
            chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
            refused = await client.post("/v1/chat/completions", json=chat, headers=key)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "bad_request"
            assert refused.headers["X-Router-Version"] == "0"

            # Refusals, in the shape every route gives (the app's exception handlers).
            refusals = {
                "missing_api_key": await client.post("/v1/completions", json=body),
                "invalid_api_key": await client.post(
                    "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}
                ),
                "invalid_header": await client.post(
                    "/v1/completions", json=body, headers=key | {"X-Router-Version": "v1"}
                ),
                "invalid_json": await client.post(
                    "/v1/chat/completions",
                    content=b"{",
                    headers=key | {"Content-Type": "application/json"},
                ),
                "unsupported_media_type": await client.post(
                    "/v1/completions", data={"prompt": "x"}, headers=key
                ),
            }
            for code, response in refusals.items():
                error = response.json()["error"]
                assert error["code"] == code, response.text
                assert response.status_code in (400, 401, 415) and error["message"]
                assert passed_on == []
            assert refusals["missing_api_key"].headers["WWW-Authenticate"] == "Bearer"

            # Anything else goes on to FastAPI.
            assert (await client.get("/v1/completions")).status_code == 299
            assert (await client.post("/v1/completions/", json=body)).status_code == 299
            assert (await client.post("/tokenize", json={"prompt": "x"})).status_code == 299
            assert passed_on == ["GET /v1/completions", "POST /v1/completions/", "POST /tokenize"]
