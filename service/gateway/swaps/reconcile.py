"""Reconciliation: bring every reachable engine to the active version (slot mode: to every
version traffic needs, resident and pinned, :meth:`.resident.Residency.converge`).

Under the deploy lock: read the active version from Redis, ask each engine what it holds
(version + checksums); an engine that does not hold it (started late, restarted with the
checkpoint's routers, failed rollback) is given it, verified, and only then put in rotation. An
engine that comes back serving other base routers stays out. While Redis is away, engines are
kept on the last active version this gateway knows (its patch is cached).
"""

from __future__ import annotations

import contextlib
import logging

from roma_service.engine.errors import EngineError, EngineRejected
from roma_service.gateway.engines import EngineHandle
from roma_service.gateway.swaps import steps
from roma_service.gateway.swaps.context import SwapContext
from roma_service.gateway.swaps.errors import REDIS_DOWN, Busy
from roma_service.gateway.swaps.resident import Residency
from roma_service.gateway.swaps.target import Target, base_of, held_version, mismatch, target_of
from roma_service.gateway.timings import Timings

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, ctx: SwapContext, residency: Residency) -> None:
        self.ctx = ctx
        self.residency = residency

    async def reconcile(self, wait_s: float = 1.0) -> bool:
        """Make every reachable engine hold the active version; put engines that hold it in
        rotation and the others out. Returns False when it could not run (lock busy, or Redis
        away before this gateway knew the active version's patch)."""
        try:
            async with self.ctx.lock.hold(Timings(), wait_s=wait_s, local_wait_s=wait_s):
                active = await self.ctx.registry.active()
                target = await self.ctx.fetch(active)
                self.ctx.pool.cache_blob(active, target.data)
                await self._read_split()
                if self.ctx.pool.slot_mode is None:
                    self.ctx.pool.slot_mode = await self._slot_mode()
                if self.ctx.pool.slot_mode:
                    # Slot mode: the engines take the version first, then requests go to it
                    # (never a moment where the active version is resident nowhere).
                    await self.converge(target)
                    if active != self.ctx.pool.active:
                        self.ctx.pool.set_active(active)
                else:
                    if active != self.ctx.pool.active:
                        self.ctx.pool.set_active(active)
                    await self.converge(target)
        except (Busy, TimeoutError):
            return False
        except REDIS_DOWN as exc:
            log.warning("reconcile without Redis", extra={"error": repr(exc)})
            return await self._from_cache()
        return True

    async def _from_cache(self) -> bool:
        """Redis away: keep engines on the last active version we know, if its patch is cached
        (otherwise nothing is safe to apply)."""
        active = self.ctx.pool.active
        if active is None:
            return False
        try:
            data = self.ctx.pool.cached_blob(active)
        except KeyError:
            return False
        target = target_of(active, data, self.ctx.pool, self.ctx.settings.max_patch_bytes)
        async with self.ctx.lock.local:
            await self.converge(target)
        return True

    async def _read_split(self) -> None:
        """The canary split, as Redis holds it (traffic needs its versions resident)."""
        record = await self.ctx.registry.traffic()
        self.ctx.pool.split = None if record is None else dict(record.weights)

    async def converge(self, target: Target) -> None:
        """Refresh what each engine holds; give lagging, reachable engines ``target`` unless it
        is known not to fit the served model (:mod:`roma_service.gateway.fit`)."""
        pool = self.ctx.pool
        pool.fit.read(target.version, target.data, base_of(pool), self.ctx.settings.max_patch_bytes)
        if pool.slot_mode is None:
            pool.slot_mode = await self._slot_mode()
        targets = [target]
        if pool.slot_mode:
            for version in sorted(set(pool.split or ()) - {target.version}):
                try:
                    targets.append(await self.ctx.fetch(version))
                except REDIS_DOWN:  # only the active version's patch is cached here
                    log.warning("split version not restored without Redis",
                                extra={"version": version})  # fmt: skip
        for engine in pool.engines:
            try:
                if pool.slot_mode:
                    await self._converge_slots(engine, targets)
                else:
                    await self.bring_in_step(engine, target)
            except EngineError as exc:
                if engine.healthy or engine.error is None:
                    log.warning("engine unreachable", extra={"engine": engine.url})
                self.ctx.pool.mark_down(engine, steps.describe(exc))

    async def _slot_mode(self) -> bool:
        """``ROMA_SWAP_POLICY``: slots, drain / immediate, or (auto) slots when the first engine
        that answers keeps several versions resident."""
        policy = self.ctx.settings.swap_policy
        if policy != "auto":
            return policy == "slots"
        errors = []
        for engine in self.ctx.pool.engines:
            try:
                capacity = (await engine.client.slots()).capacity
            except EngineRejected:
                return False  # an engine without slots (not started with our worker)
            except EngineError as exc:
                errors.append(exc)
                continue
            log.info("swap mode decided", extra={"slots": capacity, "mode":
                     "slots" if capacity > 1 else "drain"})  # fmt: skip
            return capacity > 1
        raise errors[0] if errors else EngineError("no engine answered")

    async def _converge_slots(self, engine: EngineHandle, targets: list[Target]) -> None:
        if not engine.healthy:
            await self._check_base(engine)
        problem = await self.residency.converge(engine, targets)
        if problem:
            self.ctx.pool.mark_down(engine, problem)

    async def bring_in_step(self, engine: EngineHandle, target: Target) -> None:
        """One engine: in rotation if it holds ``target``, else out until it has been given it
        and verified (out of rotation if that fails)."""
        if not engine.healthy:
            await self._check_base(engine)
        state = await engine.client.state()
        if mismatch(engine.url, target, state) is None:
            self.ctx.pool.set_held(engine, target.version)
            return
        # Lagging (late start, restart, failed rollback): out of rotation, then repair.
        held = held_version(state)
        self.ctx.pool.set_held(engine, held)
        if self.ctx.pool.fit.blocks(target.version):
            return  # reachable, but no engine can take the active version
        log.info("restoring active version", extra={"engine": engine.url, "held": held})
        await self.ctx.expert_load.collect([engine])  # booked to what it held until now
        try:
            problem = await steps.restore(engine, target)
        except EngineRejected as exc:
            self.ctx.pool.fit.refused(target.version, f"{engine.url} refused it: {exc.message}")
            return
        if problem:
            self.ctx.pool.mark_down(engine, problem)
            self.ctx.metrics.deploys.labels("reconcile", "failed").inc()
            return
        with contextlib.suppress(EngineError):
            await engine.client.reset_prefix_cache()
        self.ctx.pool.set_held(engine, target.version)
        self.ctx.metrics.deploys.labels("reconcile", "ok").inc()

    async def _check_base(self, engine: EngineHandle) -> None:
        """An engine (re)joining must serve the same base routers as the others."""
        base, ours = await engine.client.base_routers(), self.ctx.pool.base
        if ours is not None and base.fingerprint() != ours.fingerprint():
            raise EngineRejected(
                f"{engine.url} serves other base routers than the rest ({base.model})",
                code="base_mismatch",
            )
