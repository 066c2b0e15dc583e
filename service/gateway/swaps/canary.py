"""The canary traffic split, end to end: ``PUT /routers/traffic``, promote and abort.

A split sends new requests to several router versions by weight (:mod:`..traffic` picks the
version per request). Every engine must hold each version of the split resident and pinned
before the split is recorded in Redis, so no request is ever sent to a version its engine lacks.
Residency (loading a version into a free slot, verifying it, pinning it) is the engines' side,
behind the :class:`Residency` seam. Every change holds the deploy lock, as swaps do, and on any
error nothing changes: neither Redis nor the engines' pins.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from roma_service.errors import ServiceError
from roma_service.gateway.swaps.context import SwapContext
from roma_service.gateway.timings import Timings
from roma_service.gateway.traffic import BadSplit, TrafficSplit, validate_split
from roma_service.registry import Registry, TrafficRecord, UnknownVersion

log = logging.getLogger(__name__)


class Residency(Protocol):
    """Which router versions the engines hold resident (in slots), as the canary needs them."""

    def capacity(self) -> int:
        """Versions each engine can hold resident at once (``ROMA_ROUTER_SLOTS``), version 0
        (the base routers, always resident in slot 0) included; 1 = slots off."""
        ...

    async def ensure(self, versions: set[int], pin: bool, timings: Timings) -> None:
        """Every healthy engine loads, verifies and (``pin``) pins ``versions``, or this raises
        a :class:`SwapError` subclass and nothing changed."""
        ...

    async def unpin_unused(self, keep: set[int]) -> None:
        """Unpin every version but ``keep`` (unpinned versions are evicted when idle)."""
        ...


class SingleVersion:
    """The residency of engines without slots (``ROMA_ROUTER_SLOTS=1``, or a gateway that does
    not route by version): one version per engine, the active one, so no split is possible;
    ending one (set by another gateway) still works."""

    def capacity(self) -> int:
        return 1

    async def ensure(self, versions: set[int], pin: bool, timings: Timings) -> None:
        raise CanaryRefused("these engines hold one router version each", "slots_disabled")

    async def unpin_unused(self, keep: set[int]) -> None:
        return None


class CanaryRefused(ServiceError):
    """The request conflicts with the engines or the split in force (HTTP 409): slots are off
    (``slots_disabled``), no split is in force (``no_split``), the version is not in the split
    (``not_in_split``)."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.code = code


@dataclass
class CanaryResult:
    split: TrafficRecord | None  # in force after the call; None: all traffic to ``active``
    previous: TrafficRecord | None  # in force before
    active: int
    changed: bool
    timings: dict[str, float]


class Canary:
    def __init__(self, ctx: SwapContext, residency: Residency) -> None:
        self.ctx = ctx
        self.residency = residency

    async def set(
        self, weights: Mapping[Any, Any] | TrafficSplit, reason: str = "canary"
    ) -> CanaryResult:
        """Put a split in force: validate, make every version resident and pinned on every
        healthy engine, record it in Redis, then unpin what neither it nor the active version
        needs."""
        capacity = self.residency.capacity()
        if capacity < 2:
            raise CanaryRefused(
                "a traffic split needs engines that hold several router versions at once; "
                f"they hold {capacity}. Start the engines with ROMA_ROUTER_SLOTS >= 2.",
                "slots_disabled",
                "weights",
            )
        split = validate_split(weights, max_versions=capacity)
        await require_versions(self.ctx.registry, split)  # 404 before anything is locked
        timings = Timings()
        async with self.ctx.lock.hold(timings):
            active = await self.ctx.registry.active()
            before = await self.ctx.registry.traffic()
            _fits(split, active, capacity)
            try:
                await self.residency.ensure(split.versions, pin=True, timings=timings)
                with timings.phase("store"):
                    previous = await self.ctx.registry.set_traffic(
                        split.weights, reason, self.ctx.settings.gateway_id
                    )
            except BaseException:
                # Pins taken for this split go; the split in force (if any) keeps its own.
                await self._unpin(_needed(before, active))
                raise
            self.ctx.pool.split = dict(split.weights)  # our own event is not echoed to us
            await self._unpin(split.versions | {active})
            record = await self.ctx.registry.traffic()
        log.info("traffic split set", extra={"weights": split.weights, "active": active,
                                             "timings_ms": timings.total()})  # fmt: skip
        return CanaryResult(record, previous, active, True, timings.total())

    async def promote(self, version: int | None = None) -> CanaryResult:
        """Make a version of the split the active one and end the split. ``version`` may be left
        out when the split names exactly one version besides the active one."""
        if version is not None:
            await self.ctx.registry.get(version)  # 404 first
        timings = Timings()
        async with self.ctx.lock.hold(timings):
            split = await self.ctx.registry.traffic()
            previous_active = await self.ctx.registry.active()
            version = _promoted(split, previous_active, version)
            by = self.ctx.settings.gateway_id
            urls = [e.url for e in self.ctx.pool.engines if e.healthy]
            with timings.phase("activate"):
                await self.ctx.registry.activate(version, "promote", by, urls)
                previous = await self.ctx.registry.clear_traffic("promote", by)
            self.ctx.pool.split = None
            self.ctx.pool.set_active(version)
            await self._unpin({version})
        log.info("canary promoted", extra={"version": version, "previous": previous_active})
        return CanaryResult(None, previous, version, True, timings.total())

    async def abort(self) -> CanaryResult:
        """End the split: all new requests go to the active version again."""
        timings = Timings()
        async with self.ctx.lock.hold(timings):
            active = await self.ctx.registry.active()
            with timings.phase("store"):
                previous = await self.ctx.registry.clear_traffic(
                    "abort", self.ctx.settings.gateway_id
                )
            self.ctx.pool.split = None
            if previous is not None:
                await self._unpin({active})
        log.info("traffic split aborted", extra={"active": active, "had_split": bool(previous)})
        return CanaryResult(None, previous, active, previous is not None, timings.total())

    async def _unpin(self, keep: set[int]) -> None:
        """Unpin all but ``keep``. Once the split is recorded (or restored) a failure here only
        leaves a version pinned until the next change, so it is logged, not raised."""
        try:
            await self.residency.unpin_unused(keep)
        except Exception as exc:
            log.warning("could not unpin unused router versions",
                        extra={"keep": sorted(keep), "error": repr(exc)})  # fmt: skip


async def require_versions(registry: Registry, split: TrafficSplit) -> None:
    """:class:`UnknownVersion` (param ``weights``) for the first version of ``split`` that does
    not exist. The registry checks again, atomically, when it records the split."""
    for version in sorted(split.versions):
        try:
            await registry.get(version)
        except UnknownVersion as exc:
            raise UnknownVersion(
                f"router version {version} does not exist; the traffic split is unchanged",
                "weights",
            ) from exc


def _needed(split: TrafficRecord | None, active: int) -> set[int]:
    return (set(split.weights) if split else set()) | {active}


def _fits(split: TrafficSplit, active: int, capacity: int) -> None:
    """The split, the active version (pinned so that an abort is instant) and the base routers
    (slot 0) must all be resident at once."""
    resident = split.versions | {active, 0}
    if len(resident) > capacity:
        raise BadSplit(
            f"the split (versions {_names(split.versions)}) with the active version {active} "
            f"and the base routers (version 0, always resident) needs {len(resident)} resident "
            f"router versions; the engines hold {capacity} (ROMA_ROUTER_SLOTS)",
            code="too_many_versions",
        )


def _promoted(split: TrafficRecord | None, active: int, version: int | None) -> int:
    if split is None:
        raise CanaryRefused(
            "no traffic split is in force, so there is nothing to promote; to make a version "
            "active use POST /routers/{version}/activate",
            "no_split",
            "version",
        )
    if version is None:
        others = set(split.weights) - {active}
        if len(others) != 1:
            raise BadSplit(
                f"name the version to promote: the split holds versions "
                f"{_names(set(split.weights))} and the active version is {active}",
                "version",
                "version_required",
            )
        return others.pop()
    if version not in split.weights:
        raise CanaryRefused(
            f"version {version} is not in the traffic split (versions "
            f"{_names(set(split.weights))}); promote one of them, or use "
            f"POST /routers/{version}/activate",
            "not_in_split",
            "version",
        )
    return version


def _names(versions: set[int]) -> str:
    return ", ".join(str(v) for v in sorted(versions))
