"""The vLLM worker extension: router patches applied inside a running engine.

Start the engine with ``--worker-extension-cls roma_service.engine.extension.RouterExtension``;
vLLM mixes this class into every worker, and ``POST /collective_rpc`` (dev mode) calls its
methods on all workers. Arguments arrive as strings and results leave as JSON (tensors cannot
cross that boundary), so patches travel base64-encoded.

Every method returns ``{"ok": true, ...}`` or ``{"ok": false, "error": {"code", "message",
"param"}}`` rather than raising: an exception inside a worker would surface as an opaque 500
from vLLM, and the client must tell a rejected patch from a broken engine.

Attribute names all start with ``roma_``/``_roma_``: vLLM refuses extensions whose names clash
with the worker's own.
"""

from __future__ import annotations

import base64
import binascii
import functools
import time
from collections.abc import Callable
from typing import Any

from roma_patch import Patch, PatchError, read_patch
from roma_service.engine.expert_load import ExpertLoad
from roma_service.engine.routers import ApplyFailed, RouterTable
from roma_service.engine.slots import SlotRefused, SlotTable

# Patches cross the RPC as base64 JSON strings; cap what a worker will decode.
MAX_PATCH_BYTES = 256 * 1024 * 1024


def _rpc(method: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Turn exceptions into the ``{"ok": false, "error": ...}`` shape, with a stable code."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return {"ok": True, "worker": _worker_id(self), **method(self, *args, **kwargs)}
        except PatchError as exc:
            error = {"code": exc.code, "message": exc.message, "param": exc.param}
        except ApplyFailed as exc:
            error = {"code": exc.code, "message": exc.message, "param": None, **exc.detail}
        except SlotRefused as exc:
            error = {"code": exc.code, "message": exc.message, "param": exc.param}
        except Exception as exc:
            error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}", "param": None}
        return {"ok": False, "worker": _worker_id(self), "error": error}

    return wrapper


def _worker_id(worker: Any) -> str:
    return str(getattr(worker, "rank", 0))


class RouterExtension:
    """Mixin for vLLM workers (``self.model_runner`` and ``self.model_config`` come from the
    worker). State lives in ``self._roma_table``, built on first use."""

    def _roma(self) -> RouterTable:
        table = getattr(self, "_roma_table", None)
        if table is None:
            model = self.model_runner.get_model()  # type: ignore[attr-defined]
            table = RouterTable.of_model(self.model_config, model)  # type: ignore[attr-defined]
            self._roma_table = table
        return table

    @_rpc
    def roma_base_routers(self) -> dict[str, Any]:
        """The checkpoint's routers (names, shapes, dtypes, sha256) and the ones this worker
        runs."""
        table = self._roma()
        return {"base": table.base_specs.to_json(), "held_layers": sorted(table.routers)}

    def _roma_slots(self) -> SlotTable:
        slots: SlotTable | None = getattr(self, "_roma_slot_table", None)
        if slots is None:
            raise SlotRefused(
                "slots_disabled",
                "this engine has no router slots: start it with --worker-cls "
                "roma_service.engine.worker.SlotWorker and ROMA_ROUTER_SLOTS >= 2",
            )
        return slots

    @_rpc
    def roma_apply(self, patch_b64: str, version: str) -> dict[str, Any]:
        """Apply a base64 safetensors patch ('' restores the base routers) as ``version``:
        the single-version swap, which changes slot 0 (what requests without a version use)."""
        start = time.perf_counter()
        table = self._roma()
        patch = _decode_patch(patch_b64)
        slots: SlotTable | None = getattr(self, "_roma_slot_table", None)
        if patch is not None and slots is not None and slots.loaded():
            raise SlotRefused(
                "slots_in_use",
                f"versions {slots.loaded()} are resident in slots; free them before patching "
                "slot 0 (patched layers of every slot fall back to slot 0's routers)",
            )
        target = table.target_for(patch, str(version))
        decoded = time.perf_counter()
        result = table.switch(target)
        if slots is not None:
            slots.publish()  # slot 0 now serves another version
        return {
            "version": table.held.version,
            "checksums": dict(table.held.checksums),
            "decode_ms": (decoded - start) * 1e3,
            "total_ms": (time.perf_counter() - start) * 1e3,
            **result,
        }

    @_rpc
    def roma_undo(self, version: str) -> dict[str, Any]:
        """Return to the previous routers if ``version`` is the one held (partial-apply repair)."""
        table = self._roma()
        undone = table.undo(str(version))
        return {"undone": undone, "version": table.held.version}

    @_rpc
    def roma_state(self) -> dict[str, Any]:
        """The version held (None: the checkpoint's routers, never changed), per-layer sha256,
        and a fresh functional read-back."""
        table = self._roma()
        return {
            "version": table.held.version,
            "checksums": dict(table.held.checksums),
            **table.readback(),
        }

    @_rpc
    def roma_expert_load(self, action: str = "read") -> dict[str, Any]:
        """Per-layer expert selection counts, per router version (``versions``) and in total.
        ``action``: ``enable``, ``disable``, ``read``, ``reset`` (read, then zero). Off until
        enabled: it adds work to every forward."""
        table = self._roma()
        load: ExpertLoad | None = getattr(self, "_roma_load", None)
        if load is None:
            hf_config = self.model_config.hf_config  # type: ignore[attr-defined]
            load = ExpertLoad(table, hf_config, getattr(self, "_roma_slot_table", None))
            self._roma_load = load
        if action == "enable":
            load.enable()
        elif action == "disable":
            load.disable()
        elif action not in ("read", "reset"):
            raise PatchError("bad_action", f"unknown action {action!r}", "action")
        return {"version": table.held.version, **load.snapshot(reset=action == "reset")}

    # -- resident versions (slots.py) ---------------------------------------------------------

    @_rpc
    def roma_slots(self, readback: str = "") -> dict[str, Any]:
        """Every slot: version, pinned, requests in flight, last use, checksums (and, with
        ``readback="1"``, a fresh functional read-back of each); misses; tainted versions."""
        return self._roma_slots().describe(readback=readback == "1")

    @_rpc
    def roma_slot_load(
        self,
        patch_b64: str,
        version: str,
        pin: str = "",
        evict: str = "1",
        lease_s: str = "",
        holder: str = "",
    ) -> dict[str, Any]:
        """Make ``version`` resident: a base64 patch ('' = the base routers) into a free slot,
        else into the least recently used idle unpinned unleased one (``evict="0"``: never).
        ``pin``: "1"/"0" sets the pin, "" leaves it. ``lease_s``: ``holder`` leases it too."""
        start = time.perf_counter()
        slots = self._roma_slots()
        patch = _decode_patch(patch_b64)
        decoded = time.perf_counter()
        result = slots.load(
            patch,
            str(version),
            pin=_flag(pin),
            evict=evict != "0",
            lease_s=float(lease_s or 0),
            holder=holder,
        )
        return {
            "decode_ms": (decoded - start) * 1e3,
            "total_ms": (time.perf_counter() - start) * 1e3,
            **result,
        }

    @_rpc
    def roma_slot_free(self, version: str, move_to: str = "", holder: str = "") -> dict[str, Any]:
        """Free ``version``'s slot; with ``move_to``, requests still on it are re-bound there.
        ``holder``'s own lease on it does not count."""
        return self._roma_slots().free(str(version), move_to=move_to or None, holder=holder)

    @_rpc
    def roma_slot_lease(self, version: str, seconds: str, holder: str) -> dict[str, Any]:
        """``holder`` keeps ``version`` resident for ``seconds`` against other holders."""
        return self._roma_slots().lease(str(version), float(seconds), holder)

    @_rpc
    def roma_slot_pin(self, version: str, pinned: str = "1") -> dict[str, Any]:
        """Pin (never evicted to make room) or unpin ``version``'s slot."""
        return self._roma_slots().pin(str(version), pinned == "1")


def _decode_patch(patch_b64: str) -> Patch | None:
    """A base64 safetensors patch, parsed ('' = no patch: the base routers)."""
    if not patch_b64:
        return None
    if len(patch_b64) > MAX_PATCH_BYTES * 4 // 3 + 4:
        raise PatchError("too_large", f"patch is over {MAX_PATCH_BYTES} bytes")
    try:
        data = base64.b64decode(patch_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PatchError("bad_encoding", f"patch is not valid base64: {exc}") from exc
    return read_patch(data, max_bytes=MAX_PATCH_BYTES)


def _flag(value: str) -> bool | None:
    return None if value == "" else value == "1"
