"""A router version as the engines must hold it, and the check that an engine does.

A :class:`Target` is what every swap step works on: the version number, its patch file (None for
version 0, the checkpoint's routers) and the sha256 every router must have under it (the
patch's tensor, or the base's for layers the patch leaves alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from roma_patch import BaseRouters, Patch, read_patch
from roma_service.engine.client import EngineState
from roma_service.gateway.engines import EnginePool
from roma_service.gateway.swaps.errors import CannotSwap
from roma_service.registry import Registry


@dataclass(frozen=True)
class Target:
    version: int
    data: bytes | None  # the patch file; None = the base routers
    checksums: dict[str, str]  # router name -> sha256 it must hold


def expected_checksums(base: BaseRouters, patch: Patch | None) -> dict[str, str]:
    """What every router must hold under ``patch``: its tensor, or the base's."""
    out = {name: spec.sha256 for name, spec in base.specs.items()}
    if patch is not None:
        out.update({name: t.sha256 for name, t in patch.tensors.items()})
    return out


def base_of(pool: EnginePool) -> BaseRouters:
    """The base routers the engines reported at start-up."""
    if pool.base is None:
        raise CannotSwap(pool.why_not_ready(), "not_ready")
    return pool.base


def target_of(version: int, data: bytes | None, pool: EnginePool, max_bytes: int) -> Target:
    """Read a stored patch file (never unpickles) and derive what the engines must hold."""
    patch = read_patch(data, max_bytes=max_bytes) if data else None
    return Target(version, data, expected_checksums(base_of(pool), patch))


async def fetch_target(
    version: int, pool: EnginePool, registry: Registry, max_bytes: int
) -> Target:
    """``version``'s target, its patch from this gateway's cache or else from Redis."""
    try:
        data = pool.cached_blob(version)
    except KeyError:
        data = await registry.blob(version)
    return target_of(version, data, pool, max_bytes)


def held_version(state: EngineState) -> int:
    """The engine reports None until it is first given a version: the checkpoint's routers."""
    return 0 if state.version is None else state.version


def mismatch(url: str, target: Target, state: EngineState) -> str | None:
    """Why an engine's read-back does not match ``target``, or None when it does."""
    held = held_version(state)
    if held != target.version:
        return f"{url} reports version {held}, expected {target.version}"
    wrong = sorted(n for n, sha in state.checksums.items() if target.checksums.get(n) != sha)
    if wrong:
        return f"{url} holds other weights for {wrong[:3]} than version {target.version}"
    return None
