"""The logic behind ``/routers``: thin over the registry (reads), the deployer (swaps) and the
canary (``/routers/traffic``)."""

from __future__ import annotations

from starlette.requests import Request

from roma_service.gateway.routers.protocol import (
    DeployResponse,
    HistoryList,
    SwapTimings,
    TrafficChange,
    TrafficHistoryList,
    TrafficInfo,
    VersionInfo,
    VersionList,
)
from roma_service.gateway.state import Gateway
from roma_service.gateway.swaps import SwapResult
from roma_service.gateway.swaps.canary import (
    Canary,
    CanaryResult,
    require_versions,
)
from roma_service.gateway.timings import Timings
from roma_service.gateway.traffic import validate_split
from roma_service.gateway.upload import read_patch_upload


class RoutersService:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def deploy(self, request: Request, activate: bool) -> DeployResponse:
        timings = Timings()
        with timings.phase("upload"):
            data = await read_patch_upload(request, self.gw.settings.max_patch_bytes)
        if activate:
            return self._response(await self.gw.deployer.deploy(data, timings))
        record, created = await self.gw.deployer.stage(data, timings)
        return DeployResponse(
            version=record.version,
            id=record.id,
            created=created,
            changed=False,
            active=await self.gw.registry.active(),
            engines=[],
            timings_ms=SwapTimings.model_validate(timings.total()),
        )

    async def activate(self, version: int, evict: bool = False) -> DeployResponse:
        return self._response(await self.gw.deployer.activate(version, Timings(), evict))

    async def list(self) -> VersionList:
        active = await self.gw.registry.active()
        records = await self.gw.registry.list()
        data = [VersionInfo(**r.model_dump(), active=r.version == active) for r in records]
        return VersionList(active=active, data=data)

    async def get(self, version: int) -> VersionInfo:
        record = await self.gw.registry.get(version)
        active = await self.gw.registry.active()
        return VersionInfo(**record.model_dump(), active=version == active)

    async def active(self) -> VersionInfo:
        return await self.get(await self.gw.registry.active())

    async def delete(self, version: int) -> None:
        await self.gw.registry.delete(version)
        if self.gw.pool.slot_mode:
            await self.gw.residency.forget(version)

    async def history(self, limit: int) -> HistoryList:
        return HistoryList(data=await self.gw.registry.history(limit))

    def _response(self, result: SwapResult) -> DeployResponse:
        return DeployResponse(
            version=result.record.version,
            id=result.record.id,
            created=result.created,
            changed=result.changed,
            active=result.record.version,
            engines=result.engines,
            timings_ms=SwapTimings.model_validate(result.timings),
        )


class TrafficService:
    """``/routers/traffic``: reads from the registry; changes through the gateway's Canary."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def get(self) -> TrafficInfo:
        split = await self.gw.registry.traffic()
        active = await self.gw.registry.active()
        if split is None:
            return TrafficInfo(weights=None, active=active)
        return TrafficInfo(**split.model_dump(), active=active)

    async def put(self, weights: object, reason: str) -> TrafficChange:
        # Bad input is answered before anything is locked or loaded: shape (400), then versions
        # (404); the count against the engines' slots is the Canary's (it knows the slots).
        split = validate_split(weights)
        await require_versions(self.gw.registry, split)
        return _change(await self._canary().set(split, reason))

    async def promote(self, version: int | None) -> TrafficChange:
        if version is not None:
            await self.gw.registry.get(version)
        return _change(await self._canary().promote(version))

    async def abort(self) -> TrafficChange:
        return _change(await self._canary().abort())

    async def history(self, limit: int) -> TrafficHistoryList:
        return TrafficHistoryList(data=await self.gw.registry.traffic_history(limit))

    def _canary(self) -> Canary:
        return self.gw.canary


def _change(result: CanaryResult) -> TrafficChange:
    split = result.split
    return TrafficChange(
        weights=split.weights if split else None,
        active=result.active,
        at=split.at if split else None,
        by=split.by if split else None,
        reason=split.reason if split else None,
        previous=result.previous.weights if result.previous else None,
        changed=result.changed,
        timings_ms=result.timings,
    )
