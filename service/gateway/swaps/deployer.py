"""Deploy a patch or activate a stored version: the swap, end to end.

Slot mode (engines keep several versions resident, :mod:`.resident`): take the deploy lock ->
load the version into a free slot of every engine, read it back there and pin it -> move the
active pointer in Redis (new requests are bound to it from then on) -> unpin the previous one.
Requests in flight finish on their own slot; nothing is drained, recomputed or reset. With
``evict`` (a rollback that cannot wait), requests still running on the previous version are
moved to the new one and recomputed, and their responses say so.

Global mode (``drain`` / ``immediate``, engines with one slot), one swap: take the deploy lock ->
drain (``drain`` policy: the gateway's swap gate; and when other gateways are alive, the engines'
``/pause?mode=wait`` for their traffic) -> mark the engines as swapping -> apply to every reachable
engine -> verify (a fresh read-back) -> reset the prefix cache (KV computed under the old routers
is stale; under ``immediate`` running requests are recomputed) -> move the active pointer in Redis
(which publishes the change) -> resume. If any engine fails, the engines that took the new version
are put back on the previous one, Redis is left as it was, and the error names the engine. The
steps are in :mod:`.steps`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from roma_patch import read_patch, validate_patch
from roma_service.engine.errors import EngineRejected
from roma_service.gateway.engines import EngineHandle
from roma_service.gateway.gate import SwapGate
from roma_service.gateway.swaps import steps
from roma_service.gateway.swaps.context import SwapContext
from roma_service.gateway.swaps.errors import CannotSwap, EngineFailed, PatchRejected, SwapError
from roma_service.gateway.swaps.resident import Residency
from roma_service.gateway.swaps.target import Target, base_of, expected_checksums
from roma_service.gateway.timings import Timings
from roma_service.registry import VersionRecord

log = logging.getLogger(__name__)


@dataclass
class SwapResult:
    record: VersionRecord
    created: bool
    changed: bool
    engines: list[str]
    timings: dict[str, float]


class Deployer:
    def __init__(self, ctx: SwapContext, gate: SwapGate, residency: Residency) -> None:
        self.ctx = ctx
        self.gate = gate
        self.residency = residency

    async def deploy(self, data: bytes, timings: Timings) -> SwapResult:
        """Validate, store, swap to and activate a patch. Same bytes -> the version that has them
        (activated again if it is not active)."""
        base = base_of(self.ctx.pool)
        with timings.phase("validate"):
            patch = read_patch(data, max_bytes=self.ctx.settings.max_patch_bytes)
            validate_patch(patch, base)
        async with self.ctx.lock.hold(timings):
            with timings.phase("store"):
                record, created = await self.ctx.registry.store(patch, data)
                active = await self.ctx.registry.active()
            if not created and record.version == active and self._all_hold(active):
                return SwapResult(record, False, False, self._urls(), timings.total())
            target = Target(record.version, data, expected_checksums(base, patch))
            try:
                engines = await self.swap(target, timings, "deploy")
            except BaseException:
                if created:
                    await self._discard(record.version)
                raise
            record = await self.ctx.registry.get(record.version)
        self.ctx.metrics.deploys.labels("deploy", "ok").inc()
        result = SwapResult(record, created, True, engines, timings.total())
        for phase, ms in result.timings.items():
            self.ctx.metrics.deploy_latency.labels(phase).observe(ms / 1e3)
        return result

    async def stage(self, data: bytes, timings: Timings) -> tuple[VersionRecord, bool]:
        """Validate and store a patch without touching the engines or the active version (a
        canary is activated later). Returns (record, created), as the registry's store."""
        with timings.phase("validate"):
            patch = read_patch(data, max_bytes=self.ctx.settings.max_patch_bytes)
            validate_patch(patch, base_of(self.ctx.pool))
        with timings.phase("store"):
            return await self.ctx.registry.store(patch, data)

    async def activate(
        self, version: int, timings: Timings, evict: bool = False, reason: str = "activate"
    ) -> SwapResult:
        """Roll back or forward to a stored version (0 = the base routers). ``evict`` (slot
        mode): requests running on the previous version move to this one at once."""
        async with self.ctx.lock.hold(timings):
            record = await self.ctx.registry.get(version)
            if version == await self.ctx.registry.active() and self._all_hold(version):
                return SwapResult(record, False, False, self._urls(), timings.total())
            target = await self.ctx.fetch(version)
            if target.data is not None:  # stored for other base routers: 400, nothing changes
                patch = read_patch(target.data, max_bytes=self.ctx.settings.max_patch_bytes)
                validate_patch(patch, base_of(self.ctx.pool))
            engines = await self.swap(target, timings, reason, evict=evict)
            record = await self.ctx.registry.get(version)
        self.ctx.metrics.deploys.labels(reason, "ok").inc()
        return SwapResult(record, False, True, engines, timings.total())

    async def swap(
        self, target: Target, timings: Timings, reason: str, evict: bool = False
    ) -> list[str]:
        """Every reachable engine onto ``target``, then the active pointer; the caller holds the
        deploy lock. Returns the engines that verifiably hold it."""
        if self.ctx.pool.slot_mode:
            return await self._swap_slots(target, timings, reason, evict)
        previous = await self.ctx.registry.active()
        engines = [e for e in self.ctx.pool.engines if e.healthy]
        if not engines:
            if target.version == 0:
                return await self._activate_base_without_engines(previous, reason)
            raise CannotSwap(self.ctx.pool.why_not_ready(), "no_engine", "engine")
        drain = self.ctx.settings.swap_policy != "immediate"
        async with contextlib.AsyncExitStack() as stack:
            if drain:
                await self._drain(stack, engines, timings)
            # Tokens counted so far were routed by the version the engines hold now.
            if self.ctx.expert_load.enabled:
                with timings.phase("expert_load"):
                    await self.ctx.expert_load.collect(engines)
            self.ctx.pool.swap_starting(engines)
            await steps.announce(
                self.ctx.registry, self.ctx.settings.gateway_id, target.version, engines
            )
            try:
                failures, rejected = await steps.apply(engines, target, timings)
                if not failures:
                    failures = await steps.verify(engines, target, timings)
                if not failures:
                    with timings.phase("activate"):
                        await steps.reset_caches(engines, running=not drain)
                        urls = [e.url for e in engines]
                        by = self.ctx.settings.gateway_id
                        await self.ctx.registry.activate(target.version, reason, by, urls)
            except BaseException:
                # Anything unexpected after the engines may have changed: put them back first.
                await self._rollback(engines, previous, target.version)
                raise
            if failures:
                self.ctx.metrics.deploys.labels(reason, "failed").inc()
                rolled = await self._rollback(engines, previous, target.version)
                raise _failed(target.version, previous, failures, rejected, len(engines), rolled)
            steps.record_held(self.ctx.pool, target, engines)
        log.info(
            "router version active",
            extra={"version": target.version, "previous": previous, "reason": reason,
                   "engines": [e.url for e in engines], "timings_ms": timings.total()},
        )  # fmt: skip
        return [e.url for e in engines]

    async def _swap_slots(
        self, target: Target, timings: Timings, reason: str, evict: bool
    ) -> list[str]:
        """Load ``target`` beside what the engines hold, then point new requests at it."""
        previous = await self.ctx.registry.active()
        if not self.residency.slot_engines():
            if target.version == 0:
                return await self._activate_base_without_engines(previous, reason)
            raise CannotSwap(self.ctx.pool.why_not_ready(), "no_engine", "engine")
        try:
            engines = await self.residency.ensure_targets([target], True, timings)
        except SwapError:
            self.ctx.metrics.deploys.labels(reason, "failed").inc()
            raise
        urls = [e.url for e in engines]
        try:
            with timings.phase("activate"):
                await self.ctx.registry.activate(
                    target.version, reason, self.ctx.settings.gateway_id, urls
                )
        except BaseException:
            # Redis did not take it: the version stays resident, unpinned (nothing serves it).
            await self.residency.unpin_unused(self.ctx.pool.needed())
            raise
        self.ctx.pool.cache_blob(target.version, target.data)
        self.ctx.pool.set_active(target.version)
        await self.residency.unpin_unused(self.ctx.pool.needed())
        moved = 0
        if evict and previous != target.version:
            with timings.phase("evict"):
                moved = await self.residency.move(previous, target.version, engines)
        log.info(
            "router version active",
            extra={"version": target.version, "previous": previous, "reason": reason,
                   "engines": urls, "moved": moved, "timings_ms": timings.total()},
        )  # fmt: skip
        return urls

    async def _activate_base_without_engines(self, previous: int, reason: str) -> list[str]:
        """Version 0 with no engine reachable: the base routers need no verification, and an
        engine that comes back is given them by the reconciler before it takes traffic."""
        await self.ctx.registry.activate(0, reason, self.ctx.settings.gateway_id, [])
        self.ctx.pool.cache_blob(0, None)
        self.ctx.pool.set_active(0)
        log.info("router version active", extra={
            "version": 0, "previous": previous, "reason": reason, "engines": []})  # fmt: skip
        return []

    async def _drain(
        self, stack: contextlib.AsyncExitStack, engines: list[EngineHandle], timings: Timings
    ) -> None:
        """Close the gate until ``stack`` closes; pause the engines too if other gateways may be
        sending them traffic (a lone gateway skips that: vLLM's pause alone costs >= 20 ms)."""
        timeout = self.ctx.settings.drain_timeout_s
        with timings.phase("drain"):
            await steps.close_gate(stack, self.gate, timeout)
        if await steps.others_alive(self.ctx.registry, self.ctx.settings.gateway_id):
            stack.push_async_callback(steps.resume, engines)
            with timings.phase("drain"):
                await steps.pause(engines, timeout)

    async def _rollback(self, engines: list[EngineHandle], previous: int, failed: int) -> str:
        target = await self.ctx.fetch(previous)
        return await steps.rollback(self.ctx.pool, engines, target, failed)

    def _all_hold(self, version: int) -> bool:
        healthy = [e for e in self.ctx.pool.engines if e.healthy]
        if self.ctx.pool.slot_mode:
            return all(
                e.resident is not None and version in e.resident
                and (version == 0 or e.resident[version].pinned)
                for e in healthy
            )  # fmt: skip
        return all(e.version == version for e in healthy)

    def _urls(self) -> list[str]:
        return [e.url for e in self.ctx.pool.engines if e.healthy]

    async def _discard(self, version: int) -> None:
        with contextlib.suppress(Exception):
            await self.ctx.registry.delete(version, event="discarded")


def _failed(
    version: int,
    previous: int,
    failures: steps.Failures,
    rejected: EngineRejected | None,
    engines: int,
    rolled: str,
) -> SwapError:
    """The error for a swap that failed on some engines (and was rolled back)."""
    if rejected is not None and len(failures) == engines:
        return PatchRejected(rejected.message, rejected.code, rejected.param)
    detail = "; ".join(f"{url}: {why}" for url, why in failures.items())
    return EngineFailed(
        f"version {version} failed on {len(failures)} engine(s): {detail}. "
        f"{rolled} Redis is unchanged; the active version is still {previous}.",
        "engine_apply_failed",
        ",".join(failures),
    )
