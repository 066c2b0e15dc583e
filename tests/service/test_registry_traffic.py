"""The canary traffic split in the registry, against a real Redis: round trip, refusal of unknown
versions (nothing stored), history, events, and versions in a split kept from deletion."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from roma_patch import read_patch
from roma_service.registry import Registry, UnknownVersion, VersionInUse
from tests.fixtures.engine import base_routers, patch_bytes


async def _versions(registry: Registry, model: Path, n: int) -> list[int]:
    await registry.record_base(base_routers(model))
    out = []
    for seed in range(1, n + 1):
        data = patch_bytes(model, seed=seed)
        record, _ = await registry.store(read_patch(data), data)
        out.append(record.version)
    return out


async def test_split_round_trip_and_history(registry: Registry, tiny_olmoe: Path) -> None:
    v1, v2 = await _versions(registry, tiny_olmoe, 2)
    assert await registry.traffic() is None
    assert await registry.clear_traffic("abort", "gw-a") is None  # nothing to clear
    assert await registry.traffic_history() == []  # ... and nothing recorded

    assert await registry.set_traffic({v1: 0.9, v2: 0.1}, "canary", "gw-a") is None
    split = await registry.traffic()
    assert split is not None and split.weights == {v1: 0.9, v2: 0.1}
    assert (split.reason, split.by) == ("canary", "gw-a") and split.at
    previous = await registry.set_traffic({0: 1 / 3, v2: 2 / 3}, "widen", "gw-b")
    assert previous == split
    cleared = await registry.clear_traffic("abort", "gw-a")
    assert cleared is not None and cleared.weights == {0: 1 / 3, v2: 2 / 3}
    assert await registry.traffic() is None

    history = await registry.traffic_history()
    assert [(h.weights, h.previous, h.reason, h.by) for h in history] == [
        ({v1: 0.9, v2: 0.1}, None, "canary", "gw-a"),
        ({0: 1 / 3, v2: 2 / 3}, {v1: 0.9, v2: 0.1}, "widen", "gw-b"),
        (None, {0: 1 / 3, v2: 2 / 3}, "abort", "gw-a"),  # shares exact, not rounded
    ]
    assert history[0].id < history[1].id < history[2].id
    assert [h.reason for h in await registry.traffic_history(limit=2)] == ["widen", "abort"]


async def test_unknown_version_is_refused_and_nothing_changes(
    registry: Registry, tiny_olmoe: Path
) -> None:
    (v1,) = await _versions(registry, tiny_olmoe, 1)
    await registry.set_traffic({0: 0.8, v1: 0.2}, "canary", "gw-a")
    before = await registry.traffic()
    with pytest.raises(UnknownVersion, match="version 99 does not exist") as info:
        await registry.set_traffic({v1: 0.5, 99: 0.5}, "canary", "gw-a")
    assert info.value.param == "weights"
    assert await registry.traffic() == before
    assert len(await registry.traffic_history()) == 1


async def test_split_changes_are_published(registry: Registry, tiny_olmoe: Path) -> None:
    v1, v2 = await _versions(registry, tiny_olmoe, 2)
    events: list[dict] = []

    async def listen() -> None:
        async for event in registry.events():
            events.append(event)
            if event["type"] == "traffic" and event["weights"] is None:
                return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.2)  # subscribed
    await registry.set_traffic({v1: 0.75, v2: 0.25}, "canary", "gw-a")
    with pytest.raises(UnknownVersion):
        await registry.set_traffic({v1: 0.5, 42: 0.5}, "canary", "gw-a")  # not published
    await registry.clear_traffic("abort", "gw-b")
    await asyncio.wait_for(listener, 5)
    assert events == [
        {"type": "traffic", "weights": {str(v1): 0.75, str(v2): 0.25}, "by": "gw-a"},
        {"type": "traffic", "weights": None, "by": "gw-b"},
    ]


async def test_a_version_in_the_split_cannot_be_deleted(
    registry: Registry, tiny_olmoe: Path
) -> None:
    v1, v2, v3 = await _versions(registry, tiny_olmoe, 3)
    await registry.activate(v1, "deploy", "gw-a")
    await registry.set_traffic({v1: 0.9, v2: 0.1}, "canary", "gw-a")
    with pytest.raises(VersionInUse, match=r"traffic split \{1: 0.9, 2: 0.1\}") as info:
        await registry.delete(v2)
    assert info.value.param == "version" and info.value.code == "version_in_use"
    assert (await registry.get(v2)).version == v2  # still there, blob included
    assert await registry.blob(v2) is not None
    await registry.delete(v3)  # not in the split: deleted as before
    # A split without it frees it; so does clearing.
    await registry.set_traffic({v1: 1.0}, "narrow", "gw-a")
    await registry.delete(v2)
    with pytest.raises(UnknownVersion):
        await registry.get(v2)
    await registry.set_traffic({0: 0.5, v1: 0.5}, "canary", "gw-a")
    await registry.activate(0, "rollback", "gw-a")
    with pytest.raises(VersionInUse):
        await registry.delete(v1)
    await registry.clear_traffic("abort", "gw-a")
    await registry.delete(v1)
    assert [r.version for r in await registry.list()] == [0]
