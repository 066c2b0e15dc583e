"""The registry against a real Redis server: versions, dedupe, activation, history, events,
deletion rules, the shared deploy lock, and persistence across a Redis crash."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError

from roma_patch import BaseRouters, read_patch
from roma_service.registry import (
    ActiveVersion,
    BaseMismatch,
    LocalRedis,
    Registry,
    RegistryNotReady,
    UnknownVersion,
)
from tests.fixtures.engine import base_routers, patch_bytes


async def _store(registry: Registry, data: bytes):
    return await registry.store(read_patch(data), data)


async def test_version_zero_is_the_recorded_base(registry: Registry, tiny_olmoe: Path) -> None:
    base = base_routers(tiny_olmoe)
    record = await registry.record_base(base)
    assert record.fingerprint == base.fingerprint()
    zero = await registry.get(0)
    assert zero.version == 0 and zero.status == "base" and zero.id is None
    assert zero.model_fingerprint == base.fingerprint() and zero.base_fingerprint is None
    assert await registry.active() == 0
    assert await registry.blob(0) is None
    assert registry.keys.prefix == f"{registry.prefix}:{base.fingerprint()[:16]}"
    # The same base again is fine; a record of other routers in that namespace is refused.
    await registry.record_base(base)
    forged = record.model_copy(update={"model": "other", "fingerprint": "0" * 64})
    await registry.redis.hset(registry.keys.base, "record", forged.model_dump_json())
    with pytest.raises(BaseMismatch, match=r"'other'.*ROMA_REDIS_PREFIX"):
        await registry.record_base(base)


async def test_each_model_has_its_own_versions_in_one_redis(
    redis_server: LocalRedis, redis_prefix: str, tiny_olmoe: Path
) -> None:
    """Restarting on another model against the same Redis (and prefix) starts that model at
    version 0; the first model's versions, active pointer and history are still there."""
    base = base_routers(tiny_olmoe)
    other = BaseRouters(model="other", specs=dict(list(base.specs.items())[:1]))
    a = Registry.from_url(redis_server.url, redis_prefix)
    b = Registry.from_url(redis_server.url, redis_prefix)
    try:
        with pytest.raises(RegistryNotReady):
            await a.active()  # nothing is read before the served model is known
        await a.record_base(base)
        rec, _ = await _store(a, patch_bytes(tiny_olmoe, layers=(4, 5), scale=2.0))
        await a.activate(rec.version, "deploy", "gw-a")
        await b.record_base(other)
        assert a.keys.prefix != b.keys.prefix
        assert await b.active() == 0 and [r.version for r in await b.list()] == [0]
        assert (await b.get(0)).meta["model"] == "other"
        assert await a.active() == rec.version and len(await a.history()) == 1
    finally:
        await a.aclose()
        await b.aclose()


async def test_store_dedupes_and_counts_up(registry: Registry, tiny_olmoe: Path) -> None:
    await registry.record_base(base_routers(tiny_olmoe))
    a, b = (
        patch_bytes(tiny_olmoe, layers=(4, 5), seed=1),
        patch_bytes(tiny_olmoe, layers=(4, 5), seed=2),
    )
    rec_a, created_a = await _store(registry, a)
    rec_b, created_b = await _store(registry, b)
    again, created_again = await _store(registry, a)
    assert (rec_a.version, rec_b.version) == (1, 2)
    assert created_a and created_b and not created_again
    assert again.version == 1
    assert rec_a.id == read_patch(a).id and rec_a.size == len(a)
    assert rec_a.layers == [4, 5] and rec_a.status == "staged"
    # base_fingerprint is the patch's (the layers it replaces); model_fingerprint the model's.
    assert rec_a.base_fingerprint == read_patch(a).meta.base_fingerprint
    assert rec_a.model_fingerprint == base_routers(tiny_olmoe).fingerprint()
    assert rec_a.meta["objective"] == "test"
    assert await registry.blob(1) == a
    assert [r.version for r in await registry.list()] == [0, 1, 2]


async def test_activate_moves_pointer_appends_history_and_publishes(
    registry: Registry, tiny_olmoe: Path
) -> None:
    await registry.record_base(base_routers(tiny_olmoe))
    rec, _ = await _store(registry, patch_bytes(tiny_olmoe))
    events: list[dict] = []

    async def listen() -> None:
        async for event in registry.events():
            events.append(event)
            if event["type"] == "activated" and event["version"] == 0:
                return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.2)  # subscribed
    assert await registry.activate(rec.version, "deploy", "gw-a") == 0
    assert await registry.active() == rec.version
    assert (await registry.get(rec.version)).status == "deployed"
    assert await registry.activate(0, "rollback", "gw-b") == rec.version
    await asyncio.wait_for(listener, 5)
    assert [(e["type"], e["version"]) for e in events] == [
        ("activated", rec.version),
        ("activated", 0),
    ]
    history = await registry.history()
    assert [(h.version, h.previous, h.reason, h.by) for h in history] == [
        (rec.version, 0, "deploy", "gw-a"),
        (0, rec.version, "rollback", "gw-b"),
    ]
    with pytest.raises(UnknownVersion):
        await registry.activate(99, "deploy", "gw-a")
    assert await registry.active() == 0


async def test_delete_rules(registry: Registry, tiny_olmoe: Path) -> None:
    await registry.record_base(base_routers(tiny_olmoe))
    data = patch_bytes(tiny_olmoe)
    rec, _ = await _store(registry, data)
    await registry.activate(rec.version, "deploy", "t")
    with pytest.raises(ActiveVersion):
        await registry.delete(rec.version)
    with pytest.raises(UnknownVersion):
        await registry.delete(42)
    with pytest.raises(ActiveVersion):
        await registry.delete(0)
    await registry.activate(0, "rollback", "t")
    await registry.delete(rec.version)
    with pytest.raises(UnknownVersion):
        await registry.get(rec.version)
    assert await registry.redis.exists(registry.keys.blob(rec.id)) == 0
    # The bytes are gone, so uploading them again makes a new, higher version.
    again, created = await _store(registry, data)
    assert created and again.version == rec.version + 1


async def test_concurrent_stores_get_distinct_increasing_versions(
    registry: Registry, tiny_olmoe: Path
) -> None:
    await registry.record_base(base_routers(tiny_olmoe))
    patches = [patch_bytes(tiny_olmoe, seed=s) for s in range(20)]
    results = await asyncio.gather(*(_store(registry, p) for p in patches))
    versions = sorted(r.version for r, _ in results)
    assert versions == list(range(1, 21))


async def test_deploy_lock_excludes_other_gateways(
    redis_server: LocalRedis, redis_prefix: str, tiny_olmoe: Path
) -> None:
    a = Registry.from_url(redis_server.url, redis_prefix)
    b = Registry.from_url(redis_server.url, redis_prefix)
    try:
        await a.record_base(base_routers(tiny_olmoe))
        await b.record_base(base_routers(tiny_olmoe))
        async with a.deploy_lock(lease_s=10, wait_s=1):
            with pytest.raises(LockError):
                async with b.deploy_lock(lease_s=10, wait_s=0.3):
                    pass
        async with b.deploy_lock(lease_s=10, wait_s=1):
            pass
    finally:
        await a.aclose()
        await b.aclose()


async def test_nothing_lost_when_redis_crashes(own_redis: LocalRedis, tiny_olmoe: Path) -> None:
    registry = Registry.from_url(own_redis.url, "persist", timeout_s=1.0)
    try:
        await registry.record_base(base_routers(tiny_olmoe))
        data = patch_bytes(tiny_olmoe)
        rec, _ = await _store(registry, data)
        await registry.activate(rec.version, "deploy", "t")
        own_redis.kill()  # SIGKILL: no shutdown save, only the append-only file remains
        with pytest.raises(RedisConnectionError):
            await registry.active()
        own_redis.start()
        assert await registry.active() == rec.version
        assert await registry.blob(rec.version) == data
        assert [h.version for h in await registry.history()] == [rec.version]
    finally:
        await registry.aclose()


async def test_heartbeats_tell_which_other_gateways_are_alive(
    registry: Registry, tiny_olmoe: Path
) -> None:
    await registry.record_base(base_routers(tiny_olmoe))
    await registry.heartbeat("gw-a", valid_s=30)
    await registry.heartbeat("gw-b", valid_s=30)
    await registry.heartbeat("gw-gone", valid_s=-1)  # its validity already ran out
    assert await registry.peers("gw-a") == ["gw-b"]
    assert await registry.peers("gw-c") == ["gw-a", "gw-b"]


async def test_a_gateway_settles_its_own_lock_key_that_outlived_a_redis_crash(
    registry: Registry, tiny_olmoe: Path
) -> None:
    """Redis killed while a gateway held the deploy lock keeps the key (append-only file) for
    the whole lease. The holder, which never got to release it, deletes its own key at its next
    hold; another gateway's key is left alone (Busy until its lease runs out)."""
    from roma_service.gateway.swaps.errors import Busy
    from roma_service.gateway.swaps.lock import DeployLock
    from roma_service.gateway.timings import Timings
    from roma_service.settings import Settings

    await registry.record_base(base_routers(tiny_olmoe))
    settings = Settings(admin_token="t", redis_prefix="unused")
    ours, theirs = DeployLock(registry, settings), DeployLock(registry, settings)
    leftover = registry.deploy_lock(lease_s=600, wait_s=0)
    assert await leftover.acquire(token=b"lost-hold")  # what the crash left behind
    ours.unsettled = b"lost-hold"  # the hold whose release never reached Redis

    with pytest.raises(Busy):  # not theirs: they wait, then give up
        async with theirs.hold(Timings(), wait_s=0.3):
            pass
    assert await registry.redis.get(registry.keys.deploy_lock) == b"lost-hold"
    async with ours.hold(Timings(), wait_s=0.3):
        held = await registry.redis.get(registry.keys.deploy_lock)
        assert held not in (None, b"lost-hold")  # its own new hold
    assert ours.unsettled is None
    assert await registry.redis.get(registry.keys.deploy_lock) is None
    async with theirs.hold(Timings(), wait_s=0.3):  # free for everyone again
        pass
