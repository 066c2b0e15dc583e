"""The steps of a swap, each callable on its own so that deploys, activations, rollbacks and the
reconciler can put them together in the order they need (see :mod:`.deployer` for the full swap).

Each step works on the engines it is given (and the :class:`~.target.Target` they must hold);
none takes the deploy lock or moves the active pointer in Redis: the caller does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from roma_service.engine.errors import EngineError, EngineRejected
from roma_service.gateway.engines import EngineHandle, EnginePool
from roma_service.gateway.gate import GateTimeout, SwapGate
from roma_service.gateway.swaps.errors import REDIS_DOWN, Busy, EngineFailed
from roma_service.gateway.swaps.target import Target, mismatch
from roma_service.gateway.timings import Timings
from roma_service.registry import Registry

log = logging.getLogger(__name__)

Failures = dict[str, str]  # engine URL -> why it does not hold the target


def describe(exc: BaseException) -> str:
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"


async def on_each(
    engines: list[EngineHandle], call: Callable[[EngineHandle], Awaitable[object]]
) -> list[tuple[EngineHandle, BaseException]]:
    """``call`` on every engine at once; the engines where it raised, in ``engines`` order."""
    results = await asyncio.gather(*(call(e) for e in engines), return_exceptions=True)
    return [(e, r) for e, r in zip(engines, results, strict=True) if isinstance(r, BaseException)]


def require_all(failed: list[tuple[EngineHandle, BaseException]]) -> None:
    """A swap needs every engine: name the first that failed."""
    for engine, exc in failed:
        message = f"{engine.url}: {describe(exc)}; nothing was swapped"
        raise EngineFailed(message, "engine_unavailable", "engine") from exc


# --- drain -----------------------------------------------------------------------------------
async def close_gate(stack: contextlib.AsyncExitStack, gate: SwapGate, timeout_s: float) -> None:
    """Hold new requests at this gateway's gate until ``stack`` closes, once in-flight ones
    are out (:class:`Busy` if they are not within ``timeout_s``)."""
    try:
        await stack.enter_async_context(gate.writing(timeout_s))
    except GateTimeout as exc:
        raise Busy(str(exc), "drain_timeout") from exc


async def others_alive(registry: Registry, gateway_id: str) -> bool:
    """Whether other gateways share this Redis (heartbeats): their traffic to the same engines
    is not behind our gate. Assumed when Redis cannot say."""
    try:
        return bool(await registry.peers(gateway_id))
    except REDIS_DOWN:
        return True


async def pause(engines: list[EngineHandle], timeout_s: float) -> None:
    """The engines finish what they run and queue new requests (vLLM's ``mode=wait``)."""
    require_all(await on_each(engines, lambda e: e.client.pause("wait", timeout_s)))


async def resume(engines: list[EngineHandle]) -> None:
    """Resume every engine, even one whose pause failed (resuming a running engine is fine)."""
    for engine, exc in await on_each(engines, lambda e: e.client.resume()):
        log.warning("engine call failed", extra={"engine": engine.url, "error": repr(exc)})


# --- mark, apply, verify ---------------------------------------------------------------------
async def announce(
    registry: Registry, gateway_id: str, version: int, engines: list[EngineHandle]
) -> None:
    """Tell other gateways that these engines' routers are about to change, so that their own
    responses in flight learn it too (best effort: the activation event follows)."""
    event = {"type": "swapping", "version": version, "by": gateway_id,
             "engines": [e.url for e in engines]}  # fmt: skip
    with contextlib.suppress(*REDIS_DOWN):
        await registry.publish(event)


async def apply(
    engines: list[EngineHandle], target: Target, timings: Timings
) -> tuple[Failures, EngineRejected | None]:
    """Apply on every engine in parallel (each all layers or none). Returns the failures, and
    an engine's refusal of the patch itself if there was one."""
    with timings.phase("apply"):
        applied = await asyncio.gather(
            *(e.client.apply(target.data, target.version) for e in engines),
            return_exceptions=True,
        )
    failures: Failures = {}
    rejected: EngineRejected | None = None
    inside_ms: list[float] = []
    for engine, result in zip(engines, applied, strict=True):
        if isinstance(result, EngineRejected):
            rejected = result
            failures[engine.url] = result.message
        elif isinstance(result, BaseException):
            failures[engine.url] = describe(result)
        elif not result.verified:
            failures[engine.url] = f"read-back failed (max abs err {result.max_abs_err})"
        else:
            inside_ms.append(result.apply_ms)
    if not failures:
        # What the workers themselves took (stage + commit), for the slowest engine.
        timings.ms["engine_apply"] = max(inside_ms)
    return failures, rejected


async def verify(engines: list[EngineHandle], target: Target, timings: Timings) -> Failures:
    """A fresh read-back from every engine: version, every router's sha256, functional probe."""
    with timings.phase("verify"):
        states = await asyncio.gather(*(e.client.state() for e in engines), return_exceptions=True)
    failures: Failures = {}
    for engine, state in zip(engines, states, strict=True):
        if isinstance(state, BaseException):
            failures[engine.url] = describe(state)
        elif problem := mismatch(engine.url, target, state):
            failures[engine.url] = problem
        elif not state.verified:
            failures[engine.url] = "read-back not verified"
    return failures


async def reset_caches(engines: list[EngineHandle], running: bool) -> None:
    """Drop KV computed under the old routers. ``running``: requests still holding blocks (the
    ``immediate`` policy) are preempted and recomputed under the new routers."""

    async def reset(engine: EngineHandle) -> None:
        if not await engine.client.reset_prefix_cache(reset_running_requests=running):
            log.warning("prefix cache not fully reset", extra={"engine": engine.url})

    require_all(await on_each(engines, reset))


def record_held(pool: EnginePool, target: Target, engines: list[EngineHandle]) -> None:
    """``target`` is active and verified on ``engines``: they enter rotation with it."""
    pool.cache_blob(target.version, target.data)
    pool.set_active(target.version)
    for engine in engines:
        pool.set_held(engine, target.version)


# --- one engine ------------------------------------------------------------------------------
async def restore(engine: EngineHandle, target: Target) -> str | None:
    """Give one engine ``target`` and read it back; why it does not hold it, or None."""
    result = await engine.client.apply(target.data, target.version)
    state = await engine.client.state()
    problem = mismatch(engine.url, target, state)
    if problem or not (result.verified and state.verified):
        return problem or "read-back not verified"
    return None


async def rollback(
    pool: EnginePool, engines: list[EngineHandle], previous: Target, failed: int
) -> str:
    """Put every engine back on ``previous``; an engine that cannot be put back goes out of
    rotation (the reconciler repairs it). Returns a sentence for the error message."""
    back, lost = [], []
    for engine in engines:
        try:
            state = await engine.client.state()
            if mismatch(engine.url, previous, state) is None:
                pool.set_held(engine, previous.version)
                continue
            problem = await restore(engine, previous)
        except EngineError as exc:
            problem = describe(exc)
        if problem is None:
            back.append(engine.url)
            pool.set_held(engine, previous.version)
        else:
            lost.append(engine.url)
            pool.mark_down(engine, f"rollback from {failed} failed: {problem}")
    text = f"Rolled back {', '.join(back)} to version {previous.version}." if back else ""
    if lost:
        text += f" Out of rotation until repaired: {', '.join(lost)}."
    return text.strip()
