"""Keeping engines in step with Redis, in the background of each gateway.

* start-up: learn the base routers from the engines, record them as version 0, give every
  engine the active version (and switch on expert counting when it is exported); until then
  ``/ready`` is 503 and completions are refused.
* events: another gateway's activation names the engines it verified; those shared engines are
  marked as holding the new version at once (so a response spanning the change is flagged), then
  a reconcile double-checks.
* reconcile, every ``ROMA_RECONCILE_INTERVAL_S`` and after each event: engines that restarted
  or started late are given the active version before they re-enter rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from roma_service.engine.errors import EngineError
from roma_service.gateway.engines import EnginePool
from roma_service.gateway.swaps import REDIS_DOWN, Reconciler
from roma_service.registry import BaseMismatch, Registry
from roma_service.settings import Settings

log = logging.getLogger(__name__)


class Synchroniser:
    def __init__(
        self, pool: EnginePool, registry: Registry, reconciler: Reconciler, settings: Settings
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.reconciler = reconciler
        self.settings = settings
        self.started = asyncio.Event()
        self.problem: str | None = "starting"
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="roma-reconcile"),
            asyncio.create_task(self._listen(), name="roma-events"),
        ]

    async def stop(self) -> None:
        """Cancel the background tasks. Python 3.11's ``wait_for`` can swallow a cancellation
        that races with its inner future, so keep cancelling (the loops also check
        ``_stopping``) rather than wait forever on one cancel."""
        self._stopping = True
        pending = {t for t in self._tasks if not t.done()}
        for _ in range(20):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        if pending:
            log.warning("background tasks did not stop", extra={"tasks": len(pending)})
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning("background task failed", extra={"error": repr(task.exception())})

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        await self._start_up()
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.reconcile_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._heartbeat()
                await self.reconciler.reconcile(wait_s=1.0)
                await self.reconciler.residency.renew_leases()
            except Exception:
                log.exception("reconcile failed")

    async def _heartbeat(self) -> None:
        """Tell other gateways we are alive until a little after our next round."""
        with contextlib.suppress(*REDIS_DOWN):
            valid = self.settings.reconcile_interval_s * 3 + 2.0
            await self.registry.heartbeat(self.settings.gateway_id, valid)

    async def _start_up(self) -> None:
        """Retry until the base routers are recorded and the engines hold the active version."""
        delay = 0.5
        while not self._stopping:
            try:
                await self._learn_base()  # opens the served model's namespace in Redis
                await self._heartbeat()
                if await self.reconciler.reconcile(wait_s=self.settings.deploy_lock_timeout_s):
                    # Count expert load from the first request on (when it is exported).
                    healthy = [e for e in self.pool.engines if e.healthy]
                    await self.reconciler.ctx.expert_load.collect(healthy)
                    self.problem = None
                    self.started.set()
                    log.info("gateway in step", extra={"engines": self.pool.describe()})
                    return
            except BaseMismatch as exc:
                self.problem = exc.message
                log.error("refusing to serve", extra={"error": exc.message})
            except (EngineError, *REDIS_DOWN) as exc:
                self.problem = f"waiting for engines and Redis: {exc}"
            except Exception as exc:  # keep trying; /ready says why
                self.problem = f"start-up failed: {type(exc).__name__}: {exc}"
                log.exception("start-up step failed")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    async def _learn_base(self) -> None:
        if self.pool.base is not None:
            return
        errors = []
        for engine in self.pool.engines:
            try:
                base = await engine.client.base_routers()
            except EngineError as exc:
                errors.append(f"{engine.url}: {exc}")
                continue
            await self.registry.record_base(base)
            self.pool.base = base
            return
        raise EngineError("no engine answered yet (" + "; ".join(errors) + ")")

    async def _listen(self) -> None:
        """Follow the registry's events; reconnect (with back-off) whenever Redis goes away."""
        await self.started.wait()
        delay = 0.5
        while not self._stopping:
            try:
                async for event in self.registry.events():
                    delay = 0.5
                    self._on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event stream lost; reconnecting", extra={"error": repr(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            self.wake()  # anything may have changed while we were not listening

    def _on_event(self, event: dict) -> None:
        if event.get("by") == self.settings.gateway_id:
            return
        urls = event.get("engines") or []
        urls = urls if isinstance(urls, list) else []  # Lua's cjson turns [] into {}
        shared = [e for e in self.pool.engines if e.url in urls and e.healthy]
        if event.get("type") == "traffic":
            weights = event.get("weights")
            self.pool.split = {int(v): float(w) for v, w in weights.items()} if weights else None
            self.wake()  # the reconcile loads and pins the split's versions here too
            return
        if self.pool.slot_mode:
            # Requests are bound per version: nothing in flight changes. The reconcile that
            # follows makes our engines hold the new active version, then points requests at it.
            self.wake()
            return
        if event.get("type") == "swapping":
            self.pool.swap_starting(shared)
            self.wake()  # the reconcile after that swap (lock) says what the engines hold
            return
        if event.get("type") != "activated":
            return
        version = int(event["version"])
        log.info("activation by another gateway", extra={"version": version, "by": event["by"]})
        self.pool.set_active(version)
        for engine in shared:
            self.pool.set_held(engine, version)
        self.wake()  # the reconcile that follows fetches the blob and checks every engine
