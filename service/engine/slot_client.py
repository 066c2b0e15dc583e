"""The slot half of :class:`~roma_service.engine.client.EngineClient`: resident router versions.

Every call fans out to all workers (``/collective_rpc``: every tensor-parallel rank and pipeline
stage holds its own copy of the slot table) and every worker's answer is checked: they must all
succeed and agree on the slot, the version and the checksums. A load that some workers did and
others did not is undone on all of them before the error is raised.

How the gateway uses it: ``load_slot`` a version before routing requests to it, forward each
request with ``binding.bind_request(body, version)``, ``slots()`` to see what is resident and
which slots have requests in flight, ``free_slot`` (or let ``load_slot`` evict the least recently
used idle, unpinned slot), ``pin_slot`` versions that must stay (the active one, canaries), and
``lease_slot`` (or ``load_slot(lease_s=...)``) a version it has not pinned before sending requests
for it: other holders cannot free or evict it until the lease runs out.
"""

from __future__ import annotations

import base64
import contextlib
import time
from typing import TYPE_CHECKING, Any

from roma_service.engine.errors import EngineError, EngineRPCFailed
from roma_service.engine.results import (
    SlotFreeResult,
    SlotInfo,
    SlotLoadResult,
    SlotTableState,
)

if TYPE_CHECKING:
    from roma_service.engine.client import EngineClient


def _version(value: str | None) -> int | None:
    return None if value is None else int(value)


def _agree(method: str, results: list[dict[str, Any]], *keys: str) -> None:
    for key in keys:
        values = {str(r.get(key)) for r in results}
        if len(values) != 1:
            raise EngineRPCFailed(
                f"{method}: workers disagree on {key} ({sorted(values)})", code="workers_disagree"
            )


class SlotsAPI:
    """Mixed into EngineClient (uses its ``_rpc``, ``_raise_failures``, ``pause``...)."""

    async def slots(self: EngineClient, readback: bool = False) -> SlotTableState:
        """What every slot holds, its pin and its in-flight requests (``readback``: plus a fresh
        functional read-back of every resident slot)."""
        results = await self._rpc("roma_slots", "1" if readback else "")
        self._raise_failures("slots", results)
        first = results[0]
        for result in results[1:]:
            if [(s["version"], s["checksums"]) for s in result["slots"]] != [
                (s["version"], s["checksums"]) for s in first["slots"]
            ]:
                raise EngineRPCFailed(
                    "slots: workers hold different slots", code="workers_disagree"
                )
        rows = []
        for index, row in enumerate(first["slots"]):
            merged = {**row, "version": _version(row["version"])}
            # Every rank binds the same requests; take the highest count (one lagging answer).
            merged["in_flight"] = max(r["slots"][index]["in_flight"] for r in results)
            if readback and row["version"] is not None:
                merged["verified"] = all(r["slots"][index]["verified"] for r in results)
                merged["max_abs_err"] = max(r["slots"][index]["max_abs_err"] for r in results)
            rows.append(SlotInfo(**merged))
        misses: dict[int, int] = {}
        for result in results:
            for version, count in result["misses"].items():
                misses[int(version)] = max(misses.get(int(version), 0), count)
        return SlotTableState(
            capacity=first["capacity"],
            strategy=first["strategy"],
            steps=first["steps"],
            mixed_steps=first["mixed_steps"],
            slots=rows,
            misses=misses,
            tainted=[int(v) for v in first["tainted"]],
            workers=len(results),
        )

    async def load_slot(
        self: EngineClient,
        patch_bytes: bytes | None,
        version: int,
        pin: bool | None = None,
        evict: bool = True,
        lease_s: float = 0.0,
        holder: str = "",
    ) -> SlotLoadResult:
        """Make ``version`` resident (``patch_bytes`` None: the base routers). A no-op if it is
        already. Takes a free slot, else (``evict``) the least recently used slot that is not
        pinned, has no request in flight and no live lease of another holder. ``pin``: set
        (True/False) or keep (None). ``lease_s`` > 0: ``holder`` also leases the version (see
        ``lease_slot``), in the same round trip. Raises EngineRejected: a bad patch (400),
        ``no_free_slot`` / ``slot0_not_base`` (409)."""
        payload = base64.b64encode(patch_bytes).decode() if patch_bytes else ""
        pin_arg = "" if pin is None else ("1" if pin else "0")
        started = time.perf_counter()
        results = await self._rpc(
            "roma_slot_load",
            payload,
            str(version),
            pin_arg,
            "1" if evict else "0",
            str(lease_s) if lease_s > 0 else "",
            holder,
        )
        rpc_ms = (time.perf_counter() - started) * 1e3
        loaded_somewhere = any(r["ok"] and r["loaded"] for r in results)
        try:
            self._raise_failures("load_slot", results)
            _agree("load_slot", results, "slot", "version", "evicted", "reset_cache")
            applied = self._merge_applied("load_slot", results, rpc_ms)
        except EngineError:
            if loaded_somewhere:
                with contextlib.suppress(EngineError):
                    await self._rpc("roma_slot_free", str(version), "", holder)
            raise
        first = results[0]
        cache_reset = False
        if first["reset_cache"]:
            # KV under this version's salt was computed by requests moved off it (free_slot
            # with move_to): drop it. Preempt running requests if they hold blocks.
            if not await self.reset_prefix_cache():
                await self.reset_prefix_cache(reset_running_requests=True)
            cache_reset = True
        return SlotLoadResult(
            **applied,
            slot=first["slot"],
            loaded=first["loaded"],
            evicted=_version(first["evicted"]),
            cache_reset=cache_reset,
        )

    async def free_slot(
        self: EngineClient, version: int, move_to: int | None = None, holder: str = ""
    ) -> SlotFreeResult:
        """Free ``version``'s slot. Refused (409 ``slot_busy``) while requests run on it or a
        holder other than ``holder`` leases it, unless ``move_to`` names a resident version:
        then (a rollback that cannot wait) the engine is paused (``keep``), requests running on
        it are re-bound to ``move_to`` (and requests on their way redirected), every running
        request is preempted and recomputed (prefix cache reset), and the engine resumes; the
        moved requests continue under ``move_to``'s routers from the token they had reached,
        and requests for ``version`` that had not started yet run under ``move_to`` too."""
        if move_to is None:
            results = await self._rpc("roma_slot_free", str(version), "", holder)
            self._raise_failures("free_slot", results)
        else:
            await self.pause("keep")
            try:
                results = await self._rpc("roma_slot_free", str(version), str(move_to), holder)
                self._raise_failures("free_slot", results)
                # Moved requests are recomputed; requests still queued for ``version`` will run
                # under ``move_to`` (the engine redirects them) and must not meet KV cached
                # under ``version``'s salt: drop the prefix cache either way.
                await self.reset_prefix_cache(reset_running_requests=True)
            finally:
                await self.resume()
        _agree("free_slot", results, "slot", "moved")
        return SlotFreeResult(
            slot=results[0]["slot"],
            version=int(results[0]["version"]),
            moved=results[0]["moved"],
            workers=len(results),
        )

    async def lease_slot(self: EngineClient, version: int, seconds: float, holder: str) -> None:
        """``holder`` keeps ``version`` resident for ``seconds`` against every other holder:
        their ``free_slot`` is refused (409 ``slot_busy``) and their loads do not evict it, which
        covers requests on their way to the engine (it counts a request only once it has run a
        step). Renewing replaces the deadline; 0 releases. A crashed holder's lease runs out.
        Raises EngineRejected 404 ``unknown_version`` when the version is not resident."""
        results = await self._rpc("roma_slot_lease", str(version), str(seconds), holder)
        self._raise_failures("lease_slot", results)

    async def pin_slot(self: EngineClient, version: int, pinned: bool = True) -> None:
        """Pin (never evicted by ``load_slot``) or unpin a resident version."""
        results = await self._rpc("roma_slot_pin", str(version), "1" if pinned else "0")
        self._raise_failures("pin_slot", results)
