"""The gateway's parts that need no engine: settings, the swap gate, JSON logs, error bodies
and readiness before any engine answers (real Redis, real app on real uvicorn)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from roma_service.gateway.gate import GateTimeout, SwapGate
from roma_service.logging import JsonFormatter, request_version, set_active_version
from roma_service.registry import LocalRedis
from roma_service.settings import Settings
from tests.service.gateway_support import ADMIN_TOKEN, AUTH, gateway_settings, running_gateway

DEAD = "http://127.0.0.1:9"  # discard port: connection refused


def test_settings_read_engine_urls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROMA_ENGINE_URLS", "http://a:1/, http://b:2")
    monkeypatch.setenv("ROMA_SWAP_POLICY", "immediate")
    monkeypatch.setenv("ROMA_ADMIN_TOKEN", "s3cret")
    settings = Settings()
    assert settings.engine_urls == ["http://a:1", "http://b:2"]
    assert settings.swap_policy == "immediate"
    assert settings.admin_token_value() == "s3cret" and "s3cret" not in repr(settings)
    monkeypatch.setenv("ROMA_ENGINE_URLS", '["http://c:3"]')
    assert Settings().engine_urls == ["http://c:3"]
    monkeypatch.setenv("ROMA_SWAP_POLICY", "sometimes")
    with pytest.raises(ValueError, match="swap_policy"):
        Settings()


async def test_gate_drains_readers_and_holds_new_ones() -> None:
    gate = SwapGate()
    await gate.acquire_read(1.0)
    order: list[str] = []

    async def swap() -> None:
        async with gate.writing(5.0):
            order.append("swap")

    async def late_reader() -> None:
        await gate.acquire_read(5.0)
        order.append("late reader")
        await gate.release_read()

    swapping = asyncio.create_task(swap())
    await asyncio.sleep(0.05)
    assert gate.swapping and not swapping.done()  # waits for the in-flight reader
    late = asyncio.create_task(late_reader())
    await asyncio.sleep(0.05)
    assert order == []  # the new reader queues behind the swap
    order.append("in-flight done")
    await gate.release_read()
    await asyncio.gather(swapping, late)
    assert order == ["in-flight done", "swap", "late reader"]


async def test_gate_drain_timeout_swaps_nothing_and_lets_readers_on() -> None:
    gate = SwapGate()
    await gate.acquire_read(1.0)
    with pytest.raises(GateTimeout, match="did not finish"):
        async with gate.writing(0.1):
            pytest.fail("swapped while a request was in flight")
    assert not gate.swapping
    await gate.acquire_read(0.1)  # not blocked by the abandoned swap
    assert gate.readers == 2


def test_json_logs_carry_the_router_version() -> None:
    formatter = JsonFormatter()
    record = logging.makeLogRecord({"msg": "deployed %s", "args": ("x",), "levelname": "INFO",
                                    "name": "t", "engine": "http://e"})  # fmt: skip
    set_active_version(7)
    line = json.loads(formatter.format(record))
    assert line["router_version"] == 7 and line["msg"] == "deployed x"
    assert line["engine"] == "http://e" and line["level"] == "info"
    token = request_version.set(3)  # inside a request: the version serving it
    try:
        assert json.loads(formatter.format(record))["router_version"] == 3
    finally:
        request_version.reset(token)


async def test_before_any_engine_answers(redis_server: LocalRedis, redis_prefix: str) -> None:
    """Nothing listens on the engine URL: alive, not ready (with the reason), completions 503,
    control routes still authenticated; every error in the OpenAI shape."""
    settings = gateway_settings(redis_prefix)
    dead = DEAD
    async with running_gateway(settings, redis_server.url, [dead], wait_ready=False) as gw:
        assert (await gw.get("/health")).json() == {"status": "ok"}
        ready = await gw.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "not_ready"
        assert dead in ready.json()["error"]["message"]
        completion = await gw.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert completion.status_code == 503
        assert completion.json()["error"]["code"] == "no_engine"
        assert (await gw.get("/routers")).status_code == 401
        deploy = await gw.post("/routers", headers=AUTH, content=b"x" * 100)
        assert deploy.status_code == 503 and deploy.json()["error"]["code"] == "not_ready"
        schema = (await gw.get("/openapi.json")).json()
        assert {"/routers", "/routers/{version}/activate", "/v1/completions"} <= set(
            schema["paths"]
        )
        assert "roma_active_router_version" in (await gw.get("/metrics")).text


async def test_a_client_gone_mid_body_is_one_info_line(
    redis_server: LocalRedis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes its socket half-way through its request (an evaluation harness
    giving up) is logged once at info level: no ERROR, no traceback."""
    settings = gateway_settings(redis_prefix)
    caplog.set_level(logging.INFO)
    async with running_gateway(settings, redis_server.url, [DEAD], wait_ready=False) as gw:
        port = int(str(gw.base_url).rsplit(":", 1)[1].rstrip("/"))
        for path in ("/v1/completions", "/routers"):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode()
                + b'{"model": "m", "prompt": "'
            )
            await writer.drain()
            await asyncio.sleep(0.3)  # the gateway is reading the body
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.5)
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert [(r.levelno, r.path) for r in gone] == [(logging.INFO, "/v1/completions"),  # type: ignore[attr-defined]
                                                   (logging.INFO, "/routers")]  # fmt: skip
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors and not any(r.exc_info for r in caplog.records), errors
