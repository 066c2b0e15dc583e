"""Slot mode: which router versions each engine keeps resident, and loading them there.

Every engine holds up to ``ROMA_ROUTER_SLOTS`` versions at once (slot 0: the base routers) and
each request runs under the one the gateway bound it to (``engine.binding``). What traffic needs
(the active version and the canary split's versions) is loaded into every engine and *pinned*;
anything else a request asks for is loaded on demand into one engine, unpinned, and is the first
to make room when a slot is needed (least recently used, never one with requests in flight or in
transit from this gateway).

Several gateways may share the engines. Requests in transit are counted only by the gateway that
sent them, so before sending a request for a version it has not pinned on an engine, a gateway
*leases* it there (``ROMA_SLOT_LEASE_S``; taken with the on-demand load itself, else one RPC,
renewed once half of it has run out and while requests are on their way): the engine then
refuses other gateways' frees and evictions of it. Requests for pinned versions pay nothing.
Should a version still be gone when its request arrives, the engine refuses the request
(409 ``version_not_resident``, ``engine.admission``) and the request is routed again.

* :meth:`Residency.ensure_targets`: every engine loads, reads back and pins some versions, or
  none does (what was loaded is freed again, pins put back): deploys, activations, canaries.
* :meth:`Residency.engine_for`: the engine a request for a version goes to, loading the version
  first if no engine holds it (503 ``no_free_slot`` when every slot is busy).
* :meth:`Residency.converge`: the reconciler's view of one engine: base routers in slot 0, the
  needed versions resident with the right checksums and pinned, the rest unpinned.
* :meth:`Residency.move`: a rollback that cannot wait: requests running on a version continue
  under another one (recomputed), and their responses say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterable

from roma_service.engine.errors import EngineError, EngineRejected
from roma_service.engine.results import SlotInfo, SlotLoadResult, SlotTableState
from roma_service.gateway.engines import EngineHandle, NoEngine
from roma_service.gateway.swaps import steps
from roma_service.gateway.swaps.context import SwapContext
from roma_service.gateway.swaps.errors import (
    CannotSwap,
    EngineFailed,
    NoFreeSlot,
    PatchRejected,
    SwapError,
)
from roma_service.gateway.swaps.target import Target, expected_checksums, held_version
from roma_service.gateway.timings import Timings

log = logging.getLogger(__name__)

# How often a request is routed again when the version it was routed to vanished meanwhile
# (evicted by another gateway).
_STALE_RETRIES = 3


def _same(checksums: dict[str, str], target: Target) -> bool:
    return all(checksums.get(n) == sha for n, sha in target.checksums.items())


def _holds(table: SlotTableState, target: Target) -> bool:
    """Whether ``target``'s version is resident with exactly its checksums."""
    slot = table.resident().get(target.version)
    return slot is not None and _same(slot.checksums, target)


class Residency:
    def __init__(self, ctx: SwapContext) -> None:
        self.ctx = ctx
        self._loading: dict[int, asyncio.Lock] = {}
        # This gateway's name on the engines' leases: unique even for two gateways in one
        # process (gateway_id defaults to host and pid).
        self.holder = f"{ctx.settings.gateway_id}/{secrets.token_hex(4)}"

    # -- what the engines can hold ---------------------------------------------------------
    def capacity(self) -> int:
        """Versions every engine can hold resident (1: slots are off)."""
        pool = self.ctx.pool
        if not pool.slot_mode:
            return 1
        held = [e.capacity for e in pool.engines if e.resident is not None and e.healthy]
        return min(held) if held else 1

    def slot_engines(self) -> list[EngineHandle]:
        return [e for e in self.ctx.pool.engines if e.healthy and e.resident is not None]

    async def refresh(self, engine: EngineHandle) -> SlotTableState:
        table = await engine.client.slots()
        self.ctx.pool.set_resident(engine, table.capacity, table.slots)
        return table

    # -- loading -------------------------------------------------------------------------------
    async def load(
        self,
        engine: EngineHandle,
        target: Target,
        pin: bool | None,
        timings: Timings | None = None,
        lease: bool = False,
    ) -> bool:
        """Make ``target`` resident on ``engine``, read back in its slot; ``pin``: set or keep
        (None); ``lease``: a load also takes this gateway's lease on it (``hold``). Returns
        whether it was loaded now (False: it was resident already). Raises NoFreeSlot,
        EngineRejected (a bad patch), EngineError.

        One RPC in the common case (every RPC holds up the engine's steps for its duration):
        what the engine holds is taken from the last read, and only a load refused for want of
        a free slot reads the table again to choose what to free."""
        if target.version == 0:
            return False  # slot 0, always resident
        async with engine.slot_lock:
            known = (engine.resident or {}).get(target.version)
            if known is not None and _same(known.checksums, target):
                if pin is not None and known.pinned != pin:
                    await engine.client.pin_slot(target.version, pin)
                    known.pinned = pin
                return False
            if known is not None:
                # Same number, other weights (a registry reset behind our back): replace it.
                await engine.client.free_slot(target.version, holder=self.holder)
            leased_at = time.monotonic()
            try:
                result = await self._load_slot(engine, target, pin, lease)
            except NoFreeSlot:
                table = await self.refresh(engine)
                await self._make_room(engine, table)
                leased_at = time.monotonic()
                result = await self._load_slot(engine, target, pin, lease)
            if not _same(result.checksums, target) or not result.verified:
                with contextlib.suppress(EngineError):
                    await engine.client.free_slot(target.version, holder=self.holder)
                await self.refresh(engine)
                raise EngineError(
                    f"{engine.url}: version {target.version} in slot {result.slot} does not "
                    f"compute with its routers (read-back max error {result.max_abs_err:g})"
                )
            if timings is not None:
                timings.add("engine_apply", result.apply_ms)
                timings.add("verify", result.verify_ms)
            if engine.resident is not None:
                engine.resident[target.version] = SlotInfo(
                    slot=result.slot, version=target.version, pinned=bool(pin), in_flight=0,
                    last_used=0, checksums=result.checksums, verified=result.verified,
                    max_abs_err=result.max_abs_err,
                )  # fmt: skip
                if result.evicted is not None:
                    engine.resident.pop(result.evicted, None)
            if lease:
                engine.leases[target.version] = leased_at + self.ctx.settings.slot_lease_s
            if result.loaded:
                log.info("version loaded into a slot", extra={
                    "engine": engine.url, "version": target.version, "slot": result.slot,
                    "pinned": bool(pin), "apply_ms": round(result.apply_ms, 2)})  # fmt: skip
            return result.loaded

    async def _load_slot(
        self, engine: EngineHandle, target: Target, pin: bool | None, lease: bool = False
    ) -> SlotLoadResult:
        try:
            return await engine.client.load_slot(
                target.data,
                target.version,
                pin=bool(pin),
                evict=False,
                lease_s=self.ctx.settings.slot_lease_s if lease else 0.0,
                holder=self.holder,
            )
        except EngineRejected as exc:
            if exc.code == "no_free_slot":
                raise NoFreeSlot(f"{engine.url}: {exc.message}", "no_free_slot") from exc
            raise

    async def _make_room(self, engine: EngineHandle, table: SlotTableState) -> None:
        """Free the least recently used slot no one needs if every slot is taken."""
        taken = [s for s in table.slots[1:] if s.version is not None]
        if len(taken) < table.capacity - 1:
            return
        needed = self.ctx.pool.needed()
        idle = [
            s for s in taken
            if not s.pinned and s.in_flight == 0 and engine.sending[s.version] == 0  # type: ignore[index]
            and s.version not in needed
        ]  # fmt: skip
        for slot in sorted(idle, key=lambda s: s.last_used):
            try:
                await engine.client.free_slot(slot.version, holder=self.holder)  # type: ignore[arg-type]
            except EngineRejected:
                continue  # a request reached it meanwhile, or another gateway leases it
            engine.leases.pop(slot.version, None)  # type: ignore[arg-type]
            log.info("slot freed for a load", extra={"engine": engine.url, "version": slot.version})
            return
        busy = ", ".join(f"{s.version} ({_why_busy(s)})" for s in taken)
        raise NoFreeSlot(
            f"{engine.url}: all {table.capacity - 1} patch slots are busy: {busy}. Retry when "
            "requests finish, or take versions out of the traffic split",
            "no_free_slot",
        )

    async def ensure(self, versions: set[int], pin: bool, timings: Timings) -> None:
        """Every engine in slot mode holds ``versions`` (verified, pinned when ``pin``)."""
        targets = [await self.ctx.fetch(v) for v in sorted(versions)]
        await self.ensure_targets(targets, pin, timings)

    async def ensure_targets(
        self, targets: list[Target], pin: bool, timings: Timings
    ) -> list[EngineHandle]:
        """All or nothing: every engine loads, reads back and pins ``targets``, or every engine
        is put back (versions it loaded freed, pins restored). Returns the engines."""
        engines = self.slot_engines()
        if not engines:
            raise CannotSwap(self.ctx.pool.why_not_ready(), "no_engine", "engine")
        before = {e.url: dict(e.resident or {}) for e in engines}
        failures: dict[str, BaseException] = {}

        async def one(engine: EngineHandle) -> None:
            try:
                for target in targets:
                    await self.load(engine, target, pin if target.version != 0 else None, timings)
            except (EngineError, SwapError) as exc:
                failures[engine.url] = exc

        # The load reads the version back in its slot (the functional probe through the live
        # gate, compared with its weights): ``verify`` is that read-back's time in the workers.
        with timings.phase("apply"):
            await asyncio.gather(*(one(e) for e in engines))
        if not failures:
            return engines
        for engine in engines:
            await self._put_back(engine, before[engine.url], {t.version for t in targets})
        raise _failed(targets, failures, len(engines))

    async def _put_back(self, engine: EngineHandle, before: dict, versions: set[int]) -> None:
        with contextlib.suppress(EngineError):
            for version in versions - {0}:
                if version not in before:
                    with contextlib.suppress(EngineRejected):
                        await engine.client.free_slot(version, holder=self.holder)
                elif (
                    engine.resident
                    and version in engine.resident
                    and engine.resident[version].pinned != before[version].pinned
                ):
                    await engine.client.pin_slot(version, before[version].pinned)
            await self.refresh(engine)

    async def unpin_unused(self, keep: set[int]) -> None:
        """Unpin resident versions traffic no longer needs: they stay warm (a rollback or a
        request for them finds them resident) until a load needs their slot."""
        for engine in self.slot_engines():
            stale = [v for v, s in (engine.resident or {}).items() if s.pinned and v not in keep]
            if not stale:
                continue
            with contextlib.suppress(EngineError):
                async with engine.slot_lock:
                    for version in stale:
                        await engine.client.pin_slot(version, False)
                        engine.resident[version].pinned = False  # type: ignore[index]

    async def forget(self, version: int) -> None:
        """A deleted version leaves the slots it is idle in (one still serving requests is
        left to finish; the next load that needs room takes it, since nothing pins it)."""
        for engine in self.slot_engines():
            if version not in (engine.resident or {}):
                continue
            with contextlib.suppress(EngineError):
                async with engine.slot_lock:
                    if engine.sending[version] == 0:
                        await engine.client.free_slot(version, holder=self.holder)
                await self.refresh(engine)

    # -- requests ------------------------------------------------------------------------------
    async def engine_for(self, version: int) -> EngineHandle:
        """The least-loaded engine holding ``version``, which this gateway has pinned or leased
        there; if none holds it, the version is loaded (unpinned, leased) into the least-loaded
        engine that has room. Raises UnknownVersion (404), NoEngine, NoFreeSlot (503 +
        Retry-After)."""
        for _ in range(_STALE_RETRIES):
            engine = await self._engine_holding(version)
            if await self.hold(engine, version):
                return engine
        raise NoFreeSlot(
            f"router version {version} was evicted by other gateways {_STALE_RETRIES} times "
            "while this one routed a request to it; retry",
            "no_free_slot",
            "X-Router-Version",
        )

    async def hold(self, engine: EngineHandle, version: int) -> bool:
        """Make sure this gateway leases ``version`` on ``engine`` unless it is pinned there
        (the hot path: no RPC) or our lease has more than half of its time left. False: the
        engine no longer holds it (another gateway freed it) or is down; our view of it is
        refreshed, route again."""
        slot = (engine.resident or {}).get(version)
        if version == 0 or (slot is not None and slot.pinned):
            return True
        ttl = self.ctx.settings.slot_lease_s
        if engine.leases.get(version, 0.0) - time.monotonic() > ttl / 2:
            return True
        async with engine.lease_locks[version]:  # one RPC for a burst of requests
            if engine.leases.get(version, 0.0) - time.monotonic() > ttl / 2:
                return True
            started = time.monotonic()
            try:
                await engine.client.lease_slot(version, ttl, self.holder)
            except EngineRejected as exc:
                if exc.code != "unknown_version":
                    raise
                log.info("version evicted by another gateway", extra={
                    "engine": engine.url, "version": version})  # fmt: skip
                engine.leases.pop(version, None)
                with contextlib.suppress(EngineError):
                    await self.refresh(engine)
                if engine.resident is not None and version in engine.resident:
                    engine.resident.pop(version)  # the refresh failed: forget it anyway
                return False
            except EngineError as exc:
                self.ctx.pool.mark_down(engine, steps.describe(exc))
                return False
            engine.leases[version] = started + ttl
            return True

    async def renew_leases(self) -> None:
        """Every reconcile round: renew this gateway's leases on versions its requests are
        still on their way to or running on (one may wait in an engine's queue longer than a
        lease), and release the others, so that an idle version does not block other gateways'
        loads for a whole lease."""
        ttl = self.ctx.settings.slot_lease_s
        for engine in self.slot_engines():
            for version in list(engine.leases):
                # Forgotten before the RPC: a request from now on leases again, after it.
                if engine.sending[version] == 0:
                    engine.leases.pop(version, None)
                async with engine.lease_locks[version]:
                    started = time.monotonic()
                    busy = engine.sending[version] > 0
                    try:
                        await engine.client.lease_slot(version, ttl if busy else 0, self.holder)
                    except EngineError:
                        engine.leases.pop(version, None)  # gone: the next request finds out
                        continue
                    if busy:
                        engine.leases[version] = started + ttl

    async def release_leases(self) -> None:
        """At shutdown: hand back every lease (best effort; a lease not handed back runs out)."""
        for engine in self.ctx.pool.engines:
            for version in list(engine.leases):
                engine.leases.pop(version, None)
                with contextlib.suppress(EngineError):
                    await engine.client.lease_slot(version, 0, self.holder)

    async def not_resident(self, engine: EngineHandle, version: int) -> None:
        """The engine refused a request for ``version``: it no longer holds it. Forget it."""
        engine.leases.pop(version, None)
        if engine.resident is not None:
            engine.resident.pop(version, None)
        with contextlib.suppress(EngineError):
            await self.refresh(engine)

    async def _engine_holding(self, version: int) -> EngineHandle:
        pool = self.ctx.pool
        if ready := pool.holding(version):
            return pool.least_loaded(ready)
        if not pool.ready():
            raise NoEngine(pool.why_not_ready())
        lock = self._loading.setdefault(version, asyncio.Lock())
        async with lock:
            if ready := pool.holding(version):
                return pool.least_loaded(ready)
            target = await self.ctx.fetch(version)  # UnknownVersion: 404
            refusals = []
            for engine in sorted(self.slot_engines(), key=lambda e: e.inflight):
                try:
                    await self.load(engine, target, pin=None, lease=True)
                except NoFreeSlot as exc:
                    refusals.append(exc.message)
                    continue
                except EngineRejected as exc:  # stored for other base routers
                    raise PatchRejected(exc.message, exc.code, "X-Router-Version") from exc
                except EngineError as exc:
                    self.ctx.pool.mark_down(engine, steps.describe(exc))
                    continue
                self.ctx.metrics.deploys.labels("on_demand", "ok").inc()
                return engine
            if refusals:
                raise NoFreeSlot("; ".join(refusals), "no_free_slot", "X-Router-Version")
            raise NoEngine(pool.why_not_ready())

    async def move(self, version: int, to: int, engines: Iterable[EngineHandle]) -> int:
        """Requests running on ``version`` continue under ``to`` (recomputed); its slot is
        freed. Returns how many requests moved."""
        moved = 0
        for engine in engines:
            if version not in (engine.resident or {}):
                continue
            # Flag before the move: a response ending meanwhile must not claim one version.
            engine.moves[version] += 1
            engine.moved_to[version] = to
            async with engine.slot_lock:
                result = await engine.client.free_slot(version, move_to=to, holder=self.holder)
            moved += result.moved
            await self.refresh(engine)
        return moved

    # -- reconcile -----------------------------------------------------------------------------
    async def converge(self, engine: EngineHandle, targets: list[Target]) -> str | None:
        """One engine onto what traffic needs. Returns why it cannot serve (it is then out of
        rotation), or None."""
        pool = self.ctx.pool
        try:
            table = await engine.client.slots()
        except EngineRejected:  # slots_disabled
            table = None
        if table is None or table.capacity < 2:
            return (
                f"{engine.url} keeps 1 router version (ROMA_ROUTER_SLOTS=1) but this gateway "
                "runs in slot mode: restart the engine with ROMA_ROUTER_SLOTS >= 2, or set "
                "ROMA_SWAP_POLICY=drain on every gateway"
            )
        state = await engine.client.state()
        base = expected_checksums(pool.base, None) if pool.base is not None else {}
        if held_version(state) != 0 or any(state.checksums.get(n) != s for n, s in base.items()):
            # A global swap (another gateway on drain/immediate) left a patch in slot 0.
            await engine.client.apply(None, 0)
            with contextlib.suppress(EngineError):
                await engine.client.reset_prefix_cache()
        pool.set_resident(engine, table.capacity, table.slots)
        for target in targets:
            resident = table.resident().get(target.version)
            if target.version == 0 or (_holds(table, target) and resident and resident.pinned):
                continue
            if pool.fit.blocks(target.version):
                continue
            try:
                await self.load(engine, target, pin=True)
            except EngineRejected as exc:
                pool.fit.refused(target.version, f"{engine.url} refused it: {exc.message}")
            except NoFreeSlot as exc:
                log.warning(
                    "needed version not resident",
                    extra={"engine": engine.url, "version": target.version, "error": exc.message},
                )
        await self.unpin_unused({t.version for t in targets})
        return None


def _why_busy(slot: SlotInfo) -> str:
    if slot.pinned:
        return "pinned"
    if slot.leased_s > 0:
        return f"{slot.in_flight} in flight, leased {slot.leased_s:.0f} s more"
    return f"{slot.in_flight} in flight"


def _failed(targets: list[Target], failures: dict[str, BaseException], engines: int) -> SwapError:
    versions = ", ".join(str(t.version) for t in targets)
    errors = list(failures.values())
    if len(failures) == engines and all(isinstance(e, EngineRejected) for e in errors):
        first = errors[0]
        assert isinstance(first, EngineRejected)
        return PatchRejected(first.message, first.code or "patch_rejected", first.param)
    if all(isinstance(e, NoFreeSlot) for e in errors):
        return NoFreeSlot("; ".join(e.message for e in errors), "no_free_slot")  # type: ignore[attr-defined]
    detail = "; ".join(f"{url}: {steps.describe(exc)}" for url, exc in failures.items())
    return EngineFailed(
        f"version(s) {versions} failed on {len(failures)} engine(s): {detail}. Every engine "
        "is back where it was.",
        "engine_apply_failed",
        ",".join(failures),
    )
