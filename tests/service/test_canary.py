"""The Canary's orchestration (set, promote, abort) against a real Redis and the gateway's real
swap context. Which versions the engines hold resident is the lead's ``Residency`` (engine
slots); here a small recorder stands in for it, to check what the Canary asks of the engines
and when: that seam is internal (not vLLM, Redis or the embedder)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from roma_patch import read_patch
from roma_service.gateway.state import Gateway
from roma_service.gateway.swaps.canary import Canary, CanaryRefused
from roma_service.gateway.swaps.errors import EngineFailed
from roma_service.gateway.timings import Timings
from roma_service.gateway.traffic import BadSplit
from roma_service.registry import LocalRedis, UnknownVersion
from tests.fixtures.engine import base_routers, patch_bytes
from tests.service.gateway_support import gateway_settings

DEAD = "http://127.0.0.1:9"  # no engine: the Canary itself never calls one


class Slots:
    """Records the Canary's requests; ``pinned`` is what every engine would hold pinned."""

    def __init__(self, canary_lock: object, slots: int = 4) -> None:
        self.slots = slots
        self.lock = canary_lock
        self.pinned: set[int] = set()
        self.calls: list[tuple[str, set[int]]] = []
        self.fail: Exception | None = None

    def capacity(self) -> int:
        return self.slots

    async def ensure(self, versions: set[int], pin: bool, timings: Timings) -> None:
        assert pin and self.lock.local.locked(), "ensure runs under the deploy lock"  # type: ignore[attr-defined]
        self.calls.append(("ensure", set(versions)))
        if self.fail is not None:
            raise self.fail
        self.pinned |= versions

    async def unpin_unused(self, keep: set[int]) -> None:
        self.calls.append(("unpin", set(keep)))
        self.pinned &= keep


@pytest.fixture
async def gateway(redis_server: LocalRedis, redis_prefix: str) -> AsyncIterator[Gateway]:
    gw = Gateway.build(gateway_settings(redis_prefix), redis_server.url, [DEAD])
    yield gw
    await gw.aclose()


async def _setup(gw: Gateway, model: Path, n: int, slots: int = 4) -> tuple[Canary, Slots, list]:
    await gw.registry.record_base(base_routers(model))
    versions = []
    for seed in range(1, n + 1):
        data = patch_bytes(model, seed=seed)
        versions.append((await gw.registry.store(read_patch(data), data))[0].version)
    residency = Slots(gw.deployer.ctx.lock, slots)
    return Canary(gw.deployer.ctx, residency), residency, versions


async def test_set_pins_first_then_records_then_unpins_the_rest(
    gateway: Gateway, tiny_olmoe: Path
) -> None:
    canary, slots, (v1, v2, v3) = await _setup(gateway, tiny_olmoe, 3)
    await gateway.registry.activate(v1, "deploy", "t")
    result = await canary.set({str(v1): 0.9, str(v2): 0.1})
    assert result.split is not None and result.split.weights == {v1: 0.9, v2: 0.1}
    assert result.previous is None and result.active == v1 and result.changed
    assert "lock" in result.timings and "store" in result.timings
    assert (await gateway.registry.traffic()) == result.split
    assert slots.calls == [("ensure", {v1, v2}), ("unpin", {v1, v2})]

    # A new split: v3 is pinned before it is recorded; v2 is unpinned after.
    slots.calls.clear()
    result = await canary.set({str(v1): 0.5, str(v3): 0.5}, reason="second")
    assert result.previous is not None and result.previous.weights == {v1: 0.9, v2: 0.1}
    assert slots.calls == [("ensure", {v1, v3}), ("unpin", {v1, v3})]
    assert slots.pinned == {v1, v3}
    history = await gateway.registry.traffic_history()
    by = gateway.settings.gateway_id
    assert [(h.reason, h.by) for h in history] == [("canary", by), ("second", by)]


async def test_bad_splits_change_nothing(gateway: Gateway, tiny_olmoe: Path) -> None:
    canary, slots, (v1, v2, v3) = await _setup(gateway, tiny_olmoe, 3, slots=3)
    await gateway.registry.activate(v1, "deploy", "t")
    with pytest.raises(UnknownVersion, match="version 99 does not exist"):
        await canary.set({str(v1): 0.5, "99": 0.5})
    with pytest.raises(BadSplit, match="sum to 1"):
        await canary.set({str(v1): 0.5})
    with pytest.raises(BadSplit, match=r"names 4 versions .* at most 3") as info:
        await canary.set({"0": 0.25, str(v1): 0.25, str(v2): 0.25, str(v3): 0.25})
    assert info.value.code == "too_many_versions"
    # Three versions fit three slots, but not beside the active version and the base routers.
    with pytest.raises(BadSplit, match=r"versions 2, 3\) with the active version 1 .* needs 4 "
                       r"resident router versions; the engines hold 3") as info:  # fmt: skip
        await canary.set({str(v2): 0.5, str(v3): 0.5})
    assert info.value.code == "too_many_versions" and info.value.param == "weights"
    assert slots.calls == [] and await gateway.registry.traffic() is None
    assert await gateway.registry.traffic_history() == []

    # With slots off (one version per engine) no split is possible at all.
    slots.slots = 1
    with pytest.raises(CanaryRefused, match="ROMA_ROUTER_SLOTS >= 2") as refused:
        await canary.set({str(v1): 1.0})
    assert refused.value.code == "slots_disabled"
    assert slots.calls == [] and await gateway.registry.traffic() is None


async def test_an_engine_failure_records_nothing_and_restores_the_pins(
    gateway: Gateway, tiny_olmoe: Path
) -> None:
    canary, slots, (v1, _, v3) = await _setup(gateway, tiny_olmoe, 3)
    await canary.set({"0": 0.8, str(v1): 0.2})
    before = await gateway.registry.traffic()
    slots.calls.clear()
    slots.fail = EngineFailed("v3 failed its read-back on http://e", "engine_apply_failed")
    with pytest.raises(EngineFailed):
        await canary.set({"0": 0.8, str(v3): 0.2})
    assert await gateway.registry.traffic() == before
    assert slots.calls == [("ensure", {0, v3}), ("unpin", {0, v1})]
    assert len(await gateway.registry.traffic_history()) == 1


async def test_promote_activates_and_ends_the_split(gateway: Gateway, tiny_olmoe: Path) -> None:
    canary, slots, (v1, v2, v3) = await _setup(gateway, tiny_olmoe, 3)
    with pytest.raises(CanaryRefused, match="no traffic split") as refused:
        await canary.promote(v1)
    assert refused.value.code == "no_split"
    await gateway.registry.activate(v1, "deploy", "t")
    await canary.set({"0": 0.1, str(v1): 0.6, str(v2): 0.3})
    with pytest.raises(BadSplit, match="name the version to promote") as info:
        await canary.promote()  # 0 and v2 besides the active v1
    assert (info.value.code, info.value.param) == ("version_required", "version")
    with pytest.raises(CanaryRefused, match=f"version {v3} is not in the traffic split") as nope:
        await canary.promote(v3)
    assert nope.value.code == "not_in_split"
    with pytest.raises(UnknownVersion):
        await canary.promote(99)
    assert await gateway.registry.active() == v1 and await gateway.registry.traffic() is not None

    await canary.set({str(v1): 0.9, str(v2): 0.1})
    slots.calls.clear()
    result = await canary.promote()  # the one version besides the active v1
    assert (result.active, result.split, result.changed) == (v2, None, True)
    assert result.previous is not None and result.previous.weights == {v1: 0.9, v2: 0.1}
    assert await gateway.registry.active() == v2 and await gateway.registry.traffic() is None
    assert slots.calls == [("unpin", {v2})]
    last = (await gateway.registry.history())[-1]
    assert (last.version, last.previous, last.reason) == (v2, v1, "promote")
    cleared = (await gateway.registry.traffic_history())[-1]
    assert (cleared.weights, cleared.reason) == (None, "promote")


async def test_abort_returns_everything_to_the_active_version(
    gateway: Gateway, tiny_olmoe: Path
) -> None:
    canary, slots, (v1, v2) = await _setup(gateway, tiny_olmoe, 2)
    await gateway.registry.activate(v1, "deploy", "t")
    await canary.set({str(v1): 0.9, str(v2): 0.1})
    slots.calls.clear()
    result = await canary.abort()
    assert (result.active, result.split, result.changed) == (v1, None, True)
    assert result.previous is not None and result.previous.weights == {v1: 0.9, v2: 0.1}
    assert await gateway.registry.traffic() is None and await gateway.registry.active() == v1
    assert slots.calls == [("unpin", {v1})] and slots.pinned == {v1}
    again = await canary.abort()
    assert not again.changed and again.previous is None
    assert [h.reason for h in await gateway.registry.traffic_history()] == ["canary", "abort"]
