"""Resident router versions ("slots") in one vLLM worker, and the per-step hook that binds every
request to its version's slot.

Slot 0 holds the checkpoint's routers and is always resident; slots 1..N-1 hold patches. A
request names its version in ``SamplingParams.extra_args["roma_version"]`` (the gateway's
``vllm_xargs``, see ``binding.py``). The first step that contains the request binds it to the
slot holding that version, and it keeps that slot to its last token (the binding lives on vLLM's
per-request state in the worker, so it is dropped with it). A request without a version runs on
slot 0. A version freed with ``move_to`` (a rollback that cannot wait) redirects its requests that
had not started to that version. Any other version that is not resident when its request is bound
is a gateway error: the request runs on slot 0 and the miss is counted (``describe()["misses"]``).
The API server refuses such requests before they reach the engine (``admission.py``, which
reads the versions this table publishes to ``ROMA_SLOT_STATE_FILE``); a miss here means the
version left between that check and the request's first step.

A gateway about to send requests for a version it has not pinned *leases* it first (``lease``,
or ``load`` with ``lease_s``): until the lease runs out, no other holder can free it or evict it
to make room (``slot_busy`` / ``no_free_slot``), which covers requests in transit that the
engine does not count yet. The holder's own leases never block its own frees.

The hook wraps the model runner's ``_model_forward`` (vLLM's own seam for hooking the forward):
it runs after vLLM has updated its persistent batch and before the model, reads the batch's
request order and per-request token counts, and writes the per-token slots (``StepSlots``).

Loading, freeing and reading back run as RPCs, between two steps. Loads are all layers or none,
read back under the slot they fill, and rolled back if the read-back fails.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from roma_patch import Patch
from roma_service.engine import admission
from roma_service.engine.binding import VERSION_XARG
from roma_service.engine.routers import ApplyFailed, Held, RouterTable
from roma_service.engine.slot_gate import SlotGate, StepSlots, Strategy
from roma_service.engine.swap import commit_all

log = logging.getLogger(__name__)

# Attribute set on vLLM's per-request state (CachedRequestState) in the worker.
BOUND_ATTR = "roma_slot"
BASE_VERSION = "0"


class SlotSettings(BaseSettings):
    """The engine's slot settings, read in every worker from its environment."""

    model_config = SettingsConfigDict(env_prefix="ROMA_", extra="ignore")

    router_slots: int = Field(
        4, ge=1, le=64, description="Router versions resident per engine (slot 0 = base); 1: off"
    )
    slot_strategy: Literal["auto", "grouped", "stacked"] = Field(
        "auto", description="auto: grouped on the CPU and in eager GPU engines, else stacked"
    )


class SlotRefused(Exception):
    """A slot operation that cannot be done as asked; nothing changed."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass
class Slot:
    index: int
    held: Held | None = None  # None: free
    pinned: bool = False
    last_used: int = 0  # step number of the last step that ran one of its requests
    loaded_at: float = 0.0


class SlotTable:
    """The slots of one worker: its router modules' :class:`SlotGate`, which version each slot
    holds, and the binding of requests to slots."""

    def __init__(
        self,
        routers: RouterTable,
        runner: Any,
        slots: int,
        strategy: Strategy,
        max_tokens: int,
        device: torch.device,
        publish_to: Path | None = None,
    ) -> None:
        self.routers = routers
        self.runner = runner
        self.strategy = strategy
        self.step = StepSlots(slots, max_tokens, device, strategy)
        self.gates = {
            name: SlotGate(name, module, self.step, strategy, routers.held.weights[name])
            for name, module in routers.routers.items()
        }
        self.slots = [Slot(i) for i in range(slots)]
        self.steps = 0
        self.mixed_steps = 0  # steps whose tokens used more than one slot
        self.misses: collections.Counter[str] = collections.Counter()
        # Versions whose cache salt may hold KV computed under other routers (requests moved
        # off them by an eviction): the client resets the prefix cache when one is loaded.
        self.tainted: set[str] = set()
        # Versions freed with ``move_to``: requests for them that had not reached a step yet
        # (queued, in transit) are bound to the version they were moved to, not to slot 0.
        self.redirects: dict[str, str] = {}
        # version -> holder -> time.monotonic() deadline: requests for it are on their way from
        # that holder (a gateway), so no other holder may free or evict it before then.
        self.leases: dict[str, dict[str, float]] = {}
        self.clock = time.monotonic
        self.publish_to = publish_to
        routers.probe_slot = self.step.forced
        self.publish()

    # -- binding requests (every step) --------------------------------------------------

    def begin_step(self, tokens: int) -> None:
        """Bind new requests, then say which slot each of the forward's ``tokens`` uses."""
        self.steps += 1
        batch = self.runner.input_batch
        count = batch.num_reqs
        if count == 0:
            self.step.uniform(0, tokens)
            return
        requests = self.runner.requests
        per_request = [self._bound(requests[req_id]) for req_id in batch.req_ids[:count]]
        first = per_request[0]
        if all(slot == first for slot in per_request):
            self.slots[first].last_used = self.steps
            self.step.uniform(first, tokens)
            return
        self.mixed_steps += 1
        for slot in set(per_request):
            self.slots[slot].last_used = self.steps
        if tokens == count:  # one token per request (decode)
            if not self.step.repeats(per_request, tokens):
                self.step.mixed(np.asarray(per_request, dtype=np.int64), tokens, per_request)
            return
        # Tokens are laid out request after request, in batch order (query_start_loc).
        counts = np.diff(self.runner.query_start_loc.np[: count + 1])
        self.step.mixed(np.repeat(np.asarray(per_request, dtype=np.int64), counts), tokens)

    def _bound(self, state: Any) -> int:
        slot = getattr(state, BOUND_ATTR, None)
        if slot is None:
            slot = self._resolve(state)
            setattr(state, BOUND_ATTR, slot)
        return slot

    def _resolve(self, state: Any) -> int:
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        version = extra.get(VERSION_XARG)
        if version is None:
            return 0
        slot = self.slot_of(str(version))
        if slot is None and str(version) in self.redirects:
            slot = self.slot_of(self.redirects[str(version)])
        if slot is None:
            self.misses[str(version)] += 1
            log.warning("request %s asks for router version %s, which is not resident: slot 0",
                        state.req_id, version)  # fmt: skip
            return 0
        return slot

    def in_flight(self) -> list[int]:
        """Requests bound to each slot that have not finished (running, or preempted)."""
        counts = [0] * len(self.slots)
        for state in self.runner.requests.values():
            slot = getattr(state, BOUND_ATTR, None)
            if slot is not None:
                counts[slot] += 1
        return counts

    # -- versions -------------------------------------------------------------------------

    def version_of(self, slot: Slot) -> str | None:
        if slot.index == 0:
            return self.routers.held.version or BASE_VERSION
        return slot.held.version if slot.held else None

    def slot_of(self, version: str) -> int | None:
        for slot in self.slots:
            if self.version_of(slot) == version:
                return slot.index
        return None

    def loaded(self) -> list[str]:
        """Versions in slots 1..N-1."""
        return [s.held.version for s in self.slots[1:] if s.held and s.held.version]

    def _base_in_slot0(self) -> bool:
        base = self.routers.base_specs.specs
        return all(base[n].sha256 == sha for n, sha in self.routers.held.checksums.items())

    # -- load / free / pin ----------------------------------------------------------------

    def load(
        self,
        patch: Patch | None,
        version: str,
        pin: bool | None = None,
        evict: bool = True,
        lease_s: float = 0.0,
        holder: str = "",
    ) -> dict[str, Any]:
        """Make ``version`` resident (a no-op if it is). Takes a free slot, else (``evict``)
        the least recently used slot that is unpinned, has no request in flight and no live
        lease of another holder. ``lease_s`` > 0: ``holder`` leases the version (``lease``)."""
        start = time.perf_counter()
        existing = self.slot_of(version)
        if existing is not None:
            if pin is not None and existing != 0:
                self.slots[existing].pinned = pin
            if lease_s > 0:
                self.lease(version, lease_s, holder)
            held = self.routers.held if existing == 0 else self.slots[existing].held
            return {"slot": existing, "version": version, "loaded": False, "evicted": None,
                    "reset_cache": False, "checksums": dict(held.checksums),  # type: ignore[union-attr]
                    **self.readback(existing)}  # fmt: skip
        if not self._base_in_slot0():
            raise SlotRefused(
                "slot0_not_base",
                "slot 0 holds a patch applied by the single-version swap; restore the base "
                "routers (apply version 0) before loading slots",
            )
        target = self.routers.target_for(patch, version)
        slot = self._take_slot(evict, holder)
        base = self.routers.base_specs.specs
        staged = [
            gate.stage(
                slot.index,
                None if target.checksums[name] == base[name].sha256 else target.weights[name],
            )
            for name, gate in self.gates.items()
        ]
        staged_at = time.perf_counter()
        evicted = self.version_of(slot)
        previous = (slot.held, slot.pinned, slot.last_used)
        self.routers.before_change(slot.index)
        try:
            commit_all(staged)  # type: ignore[arg-type]
        except Exception as exc:
            raise ApplyFailed("swap_failed", f"loading slot {slot.index} failed: {exc!r}") from exc
        slot.held, slot.pinned, slot.last_used = target, bool(pin), self.steps
        slot.loaded_at = time.time()
        applied_at = time.perf_counter()
        readback = self.readback(slot.index)
        if not readback["verified"]:
            for stage in reversed(staged):
                stage.rollback()
            slot.held, slot.pinned, slot.last_used = previous
            raise ApplyFailed(
                "readback_failed",
                f"slot {slot.index} did not compute with the new routers; slot restored",
                readback,
            )
        reset_cache = version in self.tainted
        self.tainted.discard(version)
        self.redirects.pop(version, None)
        if evicted is not None:
            self.leases.pop(evicted, None)
        if lease_s > 0:
            self.lease(version, lease_s, holder)
        self.publish()
        return {
            "slot": slot.index,
            "version": version,
            "loaded": True,
            "evicted": evicted,
            "reset_cache": reset_cache,
            "checksums": dict(target.checksums),
            "stage_ms": (staged_at - start) * 1e3,
            "apply_ms": (applied_at - start) * 1e3,
            **readback,
        }

    def _take_slot(self, evict: bool, holder: str = "") -> Slot:
        for slot in self.slots[1:]:
            if slot.held is None:
                return slot
        busy = self.in_flight()
        idle = [
            s
            for s in self.slots[1:]
            if not s.pinned and busy[s.index] == 0 and not self.leased(self.version_of(s), holder)  # type: ignore[arg-type]
        ]
        if not evict or not idle:
            raise SlotRefused(
                "no_free_slot",
                f"all {len(self.slots) - 1} patch slots are taken"
                + ("" if not evict else " and pinned, serving requests or leased")
                + "; free one first",
            )
        return min(idle, key=lambda s: s.last_used)

    # -- leases -----------------------------------------------------------------------------

    def lease(self, version: str, seconds: float, holder: str) -> dict[str, Any]:
        """``holder`` keeps ``version`` resident for ``seconds`` against every other holder
        (renewing its lease; 0 releases it). Refused when the version is not resident: the
        holder's view is stale, and it must load the version again."""
        if not holder:
            raise SlotRefused("bad_holder", "a lease needs a holder name", "holder")
        index = self.slot_of(version)
        if index is None:
            raise SlotRefused("unknown_version", f"version {version} is not resident", "version")
        held = self.leases.setdefault(version, {})
        if seconds > 0:
            held[holder] = self.clock() + seconds
        else:
            held.pop(holder, None)
        return {"slot": index, "version": version, "expires_in": max(seconds, 0.0)}

    def leased(self, version: str, holder: str = "") -> float:
        """Seconds left of the longest live lease on ``version`` of anyone but ``holder``
        (expired leases are dropped here: a crashed holder's lease simply runs out)."""
        held = self.leases.get(version)
        if not held:
            return 0.0
        now = self.clock()
        for name, until in list(held.items()):
            if until <= now:
                del held[name]
        if not held:
            del self.leases[version]
        return max((until - now for name, until in held.items() if name != holder), default=0.0)

    def free(self, version: str, move_to: str | None = None, holder: str = "") -> dict[str, Any]:
        """Free ``version``'s slot. Refused while requests run on it or another holder leases
        it, unless ``move_to`` names a resident version: requests running on it are re-bound to
        it (the caller must have their KV recomputed: ``reset_prefix_cache(
        reset_running_requests=True)``, engine paused) and requests still on their way are
        redirected to it."""
        index = self.slot_of(version)
        if index is None:
            raise SlotRefused("unknown_version", f"version {version} is not resident", "version")
        if index == 0:
            raise SlotRefused("slot_pinned", "slot 0 holds the base routers and is never freed")
        leased = self.leased(version, holder)
        if leased and (move_to is None or self.slot_of(move_to) in (None, index)):
            raise SlotRefused(
                "slot_busy",
                f"version {version} is leased by another gateway for {leased:.1f} s more (its "
                "requests are on their way); retry later, or pass move_to=<a resident version>",
                "version",
            )
        busy = self.in_flight()[index]
        moved = 0
        if busy:
            target = None if move_to is None else self.slot_of(move_to)
            if target is None or target == index:
                raise SlotRefused(
                    "slot_busy",
                    f"{busy} requests run on version {version}; wait for them, or pass "
                    "move_to=<a resident version> to move them (they are recomputed)",
                    "move_to",
                )
            for state in self.runner.requests.values():
                if getattr(state, BOUND_ATTR, None) == index:
                    setattr(state, BOUND_ATTR, target)
                    moved += 1
            self.tainted.add(version)
        to = None if move_to is None else self.slot_of(move_to)
        if to is not None and to != index:
            self.redirects[version] = move_to  # type: ignore[assignment]
            for old, via in list(self.redirects.items()):  # chains stay one step long
                if via == version:
                    self.redirects[old] = move_to  # type: ignore[assignment]
        self.routers.before_change(index)
        for gate in self.gates.values():
            gate.stage(index, None).commit()
        slot = self.slots[index]
        slot.held, slot.pinned = None, False
        self.leases.pop(version, None)
        self.publish()
        return {"slot": index, "version": version, "moved": moved, "recompute": moved > 0}

    def pin(self, version: str, pinned: bool) -> dict[str, Any]:
        index = self.slot_of(version)
        if index is None:
            raise SlotRefused("unknown_version", f"version {version} is not resident", "version")
        if index != 0:
            self.slots[index].pinned = pinned
        return {"slot": index, "version": version, "pinned": index == 0 or pinned}

    # -- reporting ------------------------------------------------------------------------

    def readback(self, index: int) -> dict[str, Any]:
        """Functional read-back of slot ``index``: the probe batch runs under that slot."""
        slot = self.slots[index]
        held = self.routers.held if index == 0 else slot.held
        if held is None:
            raise SlotRefused("unknown_version", f"slot {index} is free", "slot")
        return self.routers.readback(held, slot=index)

    def describe(self, readback: bool = False) -> dict[str, Any]:
        busy = self.in_flight()
        rows = []
        for slot in self.slots:
            version = self.version_of(slot)
            row: dict[str, Any] = {
                "slot": slot.index,
                "version": version,
                "pinned": slot.index == 0 or slot.pinned,
                "in_flight": busy[slot.index],
                "last_used": slot.last_used,
                "loaded_at": slot.loaded_at,
                "checksums": {}
                if version is None
                else dict((self.routers.held if slot.index == 0 else slot.held).checksums),  # type: ignore[union-attr]
                "leased_s": self.leased(version) if version is not None else 0.0,
            }
            if readback and version is not None:
                result = self.readback(slot.index)
                row.update(verified=result["verified"], max_abs_err=result["max_abs_err"])
            rows.append(row)
        return {
            "capacity": len(self.slots),
            "strategy": self.strategy,
            "steps": self.steps,
            "mixed_steps": self.mixed_steps,
            "slots": rows,
            "misses": dict(self.misses),
            "tainted": sorted(self.tainted),
            "redirects": dict(self.redirects),
        }

    def servable(self) -> list[str]:
        """Versions a request may name now: resident ones, and those redirected to one."""
        out = {self.version_of(s) for s in self.slots}
        out |= {old for old, to in self.redirects.items() if self.slot_of(to) is not None}
        return sorted(v for v in out if v is not None)

    def publish(self) -> None:
        """Write :meth:`servable` for the API server's admission check (atomically: it reads
        the file while we write it). Called after every change of what is resident."""
        if self.publish_to is not None:
            admission.publish(self.publish_to, self.servable())


def choose_strategy(setting: str, device: torch.device, eager: bool) -> Strategy:
    """``auto``: grouped where no CUDA graph is captured (CPU, eager GPU), stacked otherwise.
    Grouped under CUDA graphs would freeze one step's grouping into the graph: refused."""
    if setting == "auto":
        return "grouped" if device.type == "cpu" or eager else "stacked"
    if setting == "grouped" and device.type != "cpu" and not eager:
        raise ValueError(
            "ROMA_SLOT_STRATEGY=grouped needs --enforce-eager on GPUs (CUDA graphs would freeze "
            "one step's grouping); use stacked or auto"
        )
    return setting  # type: ignore[return-value]


def install(worker: Any) -> SlotTable | None:
    """Give a freshly loaded worker its slots (before vLLM profiles, compiles and captures
    graphs). Returns None when ``ROMA_ROUTER_SLOTS`` is 1 (no slots: the plain gate)."""
    settings = SlotSettings()
    if settings.router_slots <= 1:
        return None
    runner = worker.model_runner
    config = worker.vllm_config
    for blocker, why in (
        (config.parallel_config.use_ubatching, "micro-batching (DBO) splits a step's tokens"),
        (config.speculative_config is not None, "speculative decoding runs other forwards"),
    ):
        if blocker:
            raise ValueError(f"router slots do not support {why}; set ROMA_ROUTER_SLOTS=1")
    model = runner.get_model()
    table = RouterTable.of_model(worker.model_config, model)
    paths = {id(module): path for path, module in model.named_modules()}
    for name, module in table.routers.items():
        parent = model.get_submodule(paths[id(module)].rsplit(".", 1)[0])
        if getattr(parent, "is_sequence_parallel", False):
            raise ValueError(f"router slots do not support sequence-parallel MoE ({name})")
    device = next(iter(table.held.weights.values())).device
    strategy = choose_strategy(settings.slot_strategy, device, worker.model_config.enforce_eager)
    max_tokens = max(
        runner.max_num_tokens, config.compilation_config.max_cudagraph_capture_size or 0
    )
    # Every rank holds the same table; one of them tells the API server what it holds.
    state_file = admission.AdmissionSettings().slot_state_file
    publish_to = state_file if getattr(worker, "rank", 0) == 0 else None
    slots = SlotTable(
        table, runner, settings.router_slots, strategy, max_tokens, device, publish_to
    )
    forward = runner._model_forward

    def model_forward(*args: Any, **kwargs: Any) -> Any:
        slots.begin_step(_forward_tokens(kwargs))
        return forward(*args, **kwargs)

    runner._model_forward = model_forward
    worker._roma_table = table
    worker._roma_slot_table = slots
    log.info("router slots: %d (%s strategy), %d routers", settings.router_slots, strategy,
             len(table.routers))  # fmt: skip
    return slots


def _forward_tokens(kwargs: dict[str, Any]) -> int:
    """Tokens in a model forward (CUDA-graph padding included), from vLLM's keyword inputs."""
    if kwargs.get("positions") is not None:
        return int(kwargs["positions"].shape[-1])  # [tokens], or [3, tokens] with M-RoPE
    if kwargs.get("input_ids") is not None:
        return int(kwargs["input_ids"].shape[0])
    return int(kwargs["inputs_embeds"].shape[0])
