"""Swaps: deploy a patch, activate a version, and reconcile engines with Redis.

One swap, whatever started it, is: take the deploy lock (asyncio lock for this gateway + the
Redis lock for every gateway) -> drain (``drain`` policy: the gateway's swap gate; and when
other gateways are alive, the engines' ``/pause?mode=wait`` for their traffic) -> apply to every
reachable engine (the engine runs it between two steps) -> verify (a fresh read-back from each
engine: every router's sha256 must be the patch's, or the base's for layers the patch leaves
alone) -> reset the prefix cache (KV computed under the old routers is stale; under
``immediate`` running requests are recomputed) -> move the active pointer in Redis (which
publishes the change) -> resume. If any engine fails, the engines that took the new version are
put back on the previous one, Redis is left as it was, and the error names the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError
from redis.exceptions import TimeoutError as RedisTimeoutError

from roma_patch import BaseRouters, Patch, PatchError, read_patch, validate_patch
from roma_service.engine.errors import EngineError, EngineRejected, EngineRPCFailed
from roma_service.gateway.engines import EngineHandle, EnginePool
from roma_service.gateway.errors import APIError
from roma_service.gateway.expert_load import ExpertLoadExporter
from roma_service.gateway.gate import GateTimeout, SwapGate
from roma_service.gateway.timings import Timings
from roma_service.metrics import Metrics
from roma_service.registry import Registry, VersionRecord
from roma_service.settings import Settings

log = logging.getLogger(__name__)

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


def expected_checksums(base: BaseRouters, patch: Patch | None) -> dict[str, str]:
    """What every router must hold under ``patch``: its tensor, or the base's."""
    out = {name: spec.sha256 for name, spec in base.specs.items()}
    if patch is not None:
        out.update({name: t.sha256 for name, t in patch.tensors.items()})
    return out


def check_held(
    url: str,
    version: int,
    held_version: int | None,
    checksums: dict[str, str],
    want: dict[str, str],
) -> str | None:
    """Why an engine's read-back does not match ``version``, or None when it does."""
    if held_version != version:
        return f"{url} reports version {held_version}, expected {version}"
    wrong = sorted(n for n, sha in checksums.items() if want.get(n) != sha)
    if wrong:
        return f"{url} holds other weights for {wrong[:3]} than version {version}"
    return None


@dataclass
class SwapResult:
    record: VersionRecord
    created: bool
    changed: bool
    engines: list[str]
    timings: dict[str, float]


class Deployer:
    def __init__(
        self,
        pool: EnginePool,
        registry: Registry,
        gate: SwapGate,
        settings: Settings,
        metrics: Metrics,
        expert_load: ExpertLoadExporter | None = None,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.gate = gate
        self.settings = settings
        self.metrics = metrics
        self.expert_load = expert_load or ExpertLoadExporter(pool, metrics, 0.0)
        self._lock = asyncio.Lock()

    # --- the public operations -----------------------------------------------------------------
    async def deploy(self, data: bytes, timings: Timings) -> SwapResult:
        """Validate, store, swap to and activate a patch. Same bytes -> the version that has them
        (activated again if it is not active)."""
        base = self._base()
        with timings.phase("validate"):
            patch = read_patch(data, max_bytes=self.settings.max_patch_bytes)
            validate_patch(patch, base)
        async with self.exclusive(timings):
            with timings.phase("store"):
                record, created = await self.registry.store(patch, data)
                active = await self.registry.active()
            if not created and record.version == active and self._all_hold(active):
                return SwapResult(record, False, False, self._urls(), timings.total())
            try:
                engines = await self._swap(record.version, data, patch, timings, "deploy")
            except BaseException:
                if created:
                    await self._discard(record.version)
                raise
            record = await self.registry.get(record.version)
        self.metrics.deploys.labels("deploy", "ok").inc()
        result = SwapResult(record, created, True, engines, timings.total())
        self._observe(result.timings)
        return result

    async def stage(self, data: bytes, timings: Timings) -> tuple[VersionRecord, bool]:
        """Validate and store a patch without touching the engines or the active version (a
        canary is activated later). Returns (record, created), as the registry's store."""
        with timings.phase("validate"):
            patch = read_patch(data, max_bytes=self.settings.max_patch_bytes)
            validate_patch(patch, self._base())
        with timings.phase("store"):
            return await self.registry.store(patch, data)

    async def activate(self, version: int, timings: Timings) -> SwapResult:
        """Roll back or forward to a stored version (0 = the base routers)."""
        async with self.exclusive(timings):
            record = await self.registry.get(version)
            if version == await self.registry.active() and self._all_hold(version):
                return SwapResult(record, False, False, self._urls(), timings.total())
            data = await self.registry.blob(version)
            patch = read_patch(data, max_bytes=self.settings.max_patch_bytes) if data else None
            if patch is not None:
                validate_patch(patch, self._base())  # stored for other base routers: 400
            engines = await self._swap(version, data, patch, timings, "activate")
            record = await self.registry.get(version)
        self.metrics.deploys.labels("activate", "ok").inc()
        return SwapResult(record, False, True, engines, timings.total())

    async def reconcile(self, wait_s: float = 1.0) -> bool:
        """Make every reachable engine hold the active version; put engines that hold it in
        rotation and the others out. Returns False when it could not run (lock busy)."""
        try:
            async with self.exclusive(Timings(), wait_s=wait_s, local_wait_s=wait_s):
                active = await self.registry.active()
                try:
                    self.pool.cached_blob(active)
                except KeyError:
                    self.pool.cache_blob(active, await self.registry.blob(active))
                if active != self.pool.active:
                    self.pool.set_active(active)
                await self._converge()
        except (LockError, TimeoutError):
            return False
        except REDIS_DOWN as exc:
            # Redis away: keep engines on the last active version we know (the blob is cached).
            log.warning("reconcile without Redis", extra={"error": repr(exc)})
            if self.pool.active is None:
                return False
            async with self._lock:
                await self._converge()
        except KeyError:
            return False  # Redis away and the active patch not cached: nothing safe to apply
        return True

    # --- locking -------------------------------------------------------------------------------
    @asynccontextmanager
    async def exclusive(
        self, timings: Timings, wait_s: float | None = None, local_wait_s: float | None = None
    ) -> AsyncIterator[None]:
        """This gateway's lock, then the lock shared by every gateway on the same Redis."""
        wait = self.settings.deploy_lock_timeout_s if wait_s is None else wait_s
        with timings.phase("lock"):
            try:
                async with asyncio.timeout(local_wait_s or wait):
                    await self._lock.acquire()
            except TimeoutError as exc:
                raise LockError("another deploy is in progress in this gateway") from exc
        try:
            lease = self.settings.drain_timeout_s * 2 + self.settings.engine_timeout_s * 4
            lock = self.registry.deploy_lock(lease_s=lease, wait_s=wait)
            with timings.phase("lock"):
                acquired = await lock.acquire()
            if not acquired:
                raise LockError("another gateway holds the deploy lock")
            try:
                yield
            finally:
                with contextlib.suppress(LockError, *REDIS_DOWN):
                    await lock.release()
        finally:
            self._lock.release()

    # --- the swap ------------------------------------------------------------------------------
    async def _swap(
        self, version: int, data: bytes | None, patch: Patch | None, timings: Timings, reason: str
    ) -> list[str]:
        previous = await self.registry.active()
        want = expected_checksums(self._base(), patch)
        targets = [e for e in self.pool.engines if e.healthy]
        if not targets:
            if version == 0:
                return await self._activate_base_without_engines(previous, reason)
            raise APIError(503, self.pool.why_not_ready(), "no_engine", "engine")
        drain = self.settings.swap_policy == "drain"
        async with contextlib.AsyncExitStack() as stack:
            if drain:
                with timings.phase("drain"):
                    try:
                        timeout = self.settings.drain_timeout_s
                        await stack.enter_async_context(self.gate.writing(timeout))
                    except GateTimeout as exc:
                        headers = {"Retry-After": "5"}
                        raise APIError(503, str(exc), "drain_timeout", headers=headers) from exc
            if drain and await self._other_gateways():
                # Their requests are not behind our gate: the engines drain them (mode=wait).
                # Resume even if pausing failed half-way; resuming an unpaused engine is fine.
                stack.push_async_callback(self._all, targets, lambda e: e.client.resume(), False)
                with timings.phase("drain"):
                    await self._all(
                        targets, lambda e: e.client.pause("wait", self.settings.drain_timeout_s)
                    )
            # Tokens counted so far were routed by the version the engines hold now.
            if self.expert_load.enabled:
                with timings.phase("expert_load"):
                    await self.expert_load.collect(targets)
            self.pool.swap_starting(targets)
            await self._announce(version, targets)
            try:
                failures, rejected = await self._apply_all(targets, version, data, want, timings)
                if not failures:
                    with timings.phase("activate"):
                        await self._all(targets, lambda e: self._reset_cache(e, drain))
                        urls = [e.url for e in targets]
                        by = self.settings.gateway_id
                        await self.registry.activate(version, reason, by, urls)
            except BaseException:
                # Anything unexpected after the engines may have changed: put them back first.
                await self._rollback(targets, previous, version)
                raise
            if failures:
                self.metrics.deploys.labels(reason, "failed").inc()
                rolled = await self._rollback(targets, previous, version)
                if rejected is not None and len(failures) == len(targets):
                    raise APIError(400, rejected.message, rejected.code, rejected.param)
                detail = "; ".join(f"{url}: {why}" for url, why in failures.items())
                raise APIError(
                    502,
                    f"version {version} failed on {len(failures)} engine(s): {detail}. "
                    f"{rolled} Redis is unchanged; the active version is still {previous}.",
                    "engine_apply_failed",
                    ",".join(failures),
                )
            self.pool.cache_blob(version, data)
            self.pool.set_active(version)
            for engine in targets:
                self.pool.set_held(engine, version)
        log.info(
            "router version active",
            extra={"version": version, "previous": previous, "reason": reason,
                   "engines": [e.url for e in targets], "timings_ms": timings.total()},
        )  # fmt: skip
        return [e.url for e in targets]

    async def _activate_base_without_engines(self, previous: int, reason: str) -> list[str]:
        """Version 0 with no engine reachable: the base routers need no verification, and an
        engine that comes back is given them by the reconciler before it takes traffic."""
        await self.registry.activate(0, reason, self.settings.gateway_id, [])
        self.pool.cache_blob(0, None)
        self.pool.set_active(0)
        log.info("router version active", extra={
            "version": 0, "previous": previous, "reason": reason, "engines": []})  # fmt: skip
        return []

    async def _announce(self, version: int, targets: list[EngineHandle]) -> None:
        """Tell other gateways that these engines' routers are about to change, so that their
        own responses in flight learn it too (best effort: the activation event follows)."""
        event = {"type": "swapping", "version": version, "by": self.settings.gateway_id,
                 "engines": [e.url for e in targets]}  # fmt: skip
        with contextlib.suppress(*REDIS_DOWN):
            await self.registry.publish(event)

    async def _other_gateways(self) -> list[str]:
        """Gateways sharing this Redis (their heartbeats); any of them may be sending traffic
        to the same engines."""
        try:
            return await self.registry.peers(self.settings.gateway_id)
        except REDIS_DOWN:
            return ["unknown (Redis unavailable)"]

    async def _reset_cache(self, engine: EngineHandle, drain: bool) -> None:
        """Drop KV computed under the old routers. Under ``immediate`` frozen requests still
        hold blocks: vLLM preempts and recomputes them (under the new routers)."""
        if not await engine.client.reset_prefix_cache(reset_running_requests=not drain):
            log.warning("prefix cache not fully reset", extra={"engine": engine.url})

    async def _apply_all(
        self,
        targets: list[EngineHandle],
        version: int,
        data: bytes | None,
        want: dict[str, str],
        timings: Timings,
    ) -> tuple[dict[str, str], EngineRejected | None]:
        """Apply on every engine, then read back from each. Returns {engine: why} failures."""
        with timings.phase("apply"):
            applied = await asyncio.gather(
                *(e.client.apply(data, version) for e in targets), return_exceptions=True
            )
        failures: dict[str, str] = {}
        rejected: EngineRejected | None = None
        for engine, result in zip(targets, applied, strict=True):
            if isinstance(result, EngineRejected):
                rejected = result
                failures[engine.url] = result.message
            elif isinstance(result, BaseException):
                failures[engine.url] = _describe(result)
            elif not result.verified:
                failures[engine.url] = f"read-back failed (max abs err {result.max_abs_err})"
        if failures:
            return failures, rejected
        # What the workers themselves took (stage + commit), for the slowest engine.
        timings.ms["engine_apply"] = max(r.apply_ms for r in applied)  # type: ignore[union-attr]
        with timings.phase("verify"):
            states = await asyncio.gather(
                *(e.client.state() for e in targets), return_exceptions=True
            )
        for engine, state in zip(targets, states, strict=True):
            if isinstance(state, BaseException):
                failures[engine.url] = _describe(state)
                continue
            held = _as_version(state.version)
            problem = check_held(engine.url, version, held, state.checksums, want)
            if problem or not state.verified:
                failures[engine.url] = problem or "read-back not verified"
        return failures, rejected

    async def _rollback(self, targets: list[EngineHandle], previous: int, failed: int) -> str:
        """Put every engine back on ``previous``; an engine that cannot be put back goes out of
        rotation (the reconciler retries). Returns a sentence for the error message."""
        data = await self._blob_for_rollback(previous)
        patch = read_patch(data, max_bytes=self.settings.max_patch_bytes) if data else None
        want = expected_checksums(self._base(), patch)
        back, lost = [], []
        for engine in targets:
            try:
                state = await engine.client.state()
                held = _as_version(state.version)
                if check_held(engine.url, previous, held, state.checksums, want):
                    await engine.client.apply(data, previous)
                    state = await engine.client.state()
                    held = _as_version(state.version)
                    problem = check_held(engine.url, previous, held, state.checksums, want)
                    if problem:
                        raise EngineRPCFailed(problem, code="rollback_failed")
                    back.append(engine.url)
                self.pool.set_held(engine, previous)
            except EngineError as exc:
                lost.append(engine.url)
                self.pool.mark_down(engine, f"rollback from {failed} failed: {_describe(exc)}")
        text = f"Rolled back {', '.join(back)} to version {previous}." if back else ""
        if lost:
            text += f" Out of rotation until repaired: {', '.join(lost)}."
        return text.strip()

    async def _blob_for_rollback(self, version: int) -> bytes | None:
        try:
            return self.pool.cached_blob(version)
        except KeyError:
            return await self.registry.blob(version)

    async def _converge(self) -> None:
        """Refresh what each engine holds; give lagging, reachable engines the active version."""
        active = self.pool.active
        assert active is not None
        data = self.pool.cached_blob(active)
        patch = self.pool.fit.read(active, data, self._base(), self.settings.max_patch_bytes)
        want = expected_checksums(self._base(), patch)
        for engine in self.pool.engines:
            try:
                if not engine.healthy:
                    await self._check_base(engine)
                state = await engine.client.state()
                held = _as_version(state.version)
                if held == active and not check_held(
                    engine.url, active, held, state.checksums, want
                ):
                    self.pool.set_held(engine, active)
                    continue
                # Lagging (late start, restart, failed rollback): out of rotation, then repair.
                self.pool.set_held(engine, held)
                if self.pool.fit.blocks(active):
                    continue  # reachable, but no engine can take the active version
                log.info("restoring active version", extra={"engine": engine.url, "held": held})
                await self.expert_load.collect([engine])  # booked to what it held until now
                try:
                    result = await engine.client.apply(data, active)
                except EngineRejected as exc:
                    self.pool.fit.refused(active, f"{engine.url} refused it: {exc.message}")
                    continue
                state = await engine.client.state()
                problem = check_held(
                    engine.url, active, _as_version(state.version), state.checksums, want
                )
                if problem or not (result.verified and state.verified):
                    self.pool.mark_down(engine, problem or "read-back not verified")
                    self.metrics.deploys.labels("reconcile", "failed").inc()
                    continue
                with contextlib.suppress(EngineError):
                    await engine.client.reset_prefix_cache()
                self.pool.set_held(engine, active)
                self.metrics.deploys.labels("reconcile", "ok").inc()
            except EngineError as exc:
                if engine.healthy or engine.error is None:
                    log.warning("engine unreachable", extra={"engine": engine.url})
                self.pool.mark_down(engine, _describe(exc))

    async def _check_base(self, engine: EngineHandle) -> None:
        """An engine (re)joining must serve the same base routers as the others."""
        base = await engine.client.base_routers()
        if self.pool.base is not None and base.fingerprint() != self.pool.base.fingerprint():
            raise EngineRejected(
                f"{engine.url} serves other base routers than the rest ({base.model})",
                code="base_mismatch",
            )

    # --- helpers -------------------------------------------------------------------------------
    def _base(self) -> BaseRouters:
        if self.pool.base is None:
            raise APIError(503, self.pool.why_not_ready(), "not_ready")
        return self.pool.base

    def _all_hold(self, version: int) -> bool:
        return all(e.version == version for e in self.pool.engines if e.healthy)

    def _urls(self) -> list[str]:
        return [e.url for e in self.pool.engines if e.healthy]

    async def _discard(self, version: int) -> None:
        with contextlib.suppress(Exception):
            await self.registry.delete(version, event="discarded")

    async def _all(self, targets: list[EngineHandle], call, strict: bool = True) -> None:
        results = await asyncio.gather(*(call(e) for e in targets), return_exceptions=True)
        for engine, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                if strict:
                    raise APIError(
                        502,
                        f"{engine.url}: {_describe(result)}; nothing was swapped",
                        "engine_unavailable",
                        "engine",
                    ) from result
                log.warning(
                    "engine call failed", extra={"engine": engine.url, "error": repr(result)}
                )

    def _observe(self, timings: dict[str, float]) -> None:
        for phase, ms in timings.items():
            self.metrics.deploy_latency.labels(phase).observe(ms / 1e3)


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


def _as_version(value: object) -> int:
    """The engine reports None until it is first given a version: the checkpoint's routers."""
    return 0 if value is None else int(value)  # type: ignore[arg-type]


def _describe(exc: BaseException) -> str:
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"


__all__ = ["Deployer", "PatchError", "SwapResult", "expected_checksums"]
