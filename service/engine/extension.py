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
from pathlib import Path
from typing import Any

from roma_patch import PatchError, read_checkpoint_routers, read_patch
from roma_service.engine.expert_load import ExpertLoad
from roma_service.engine.routers import ApplyFailed, RouterTable, find_routers

# Patches cross the RPC as base64 JSON strings; cap what a worker will decode.
MAX_PATCH_BYTES = 256 * 1024 * 1024


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local directory holding the served checkpoint: ``model`` itself, or the hub snapshot
    vLLM already downloaded (``local_files_only``: the engine loaded it, so it is cached)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model,
            revision=revision,
            local_files_only=True,
            allow_patterns=["*.safetensors", "*.json"],
        )
    )


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
            config = self.model_config  # type: ignore[attr-defined]
            model_dir = resolve_model_dir(config.model, getattr(config, "revision", None))
            model = self.model_runner.get_model()  # type: ignore[attr-defined]
            base = read_checkpoint_routers(model_dir)
            table = RouterTable(config.model, find_routers(model), base)
            self._roma_table = table
        return table

    @_rpc
    def roma_base_routers(self) -> dict[str, Any]:
        """The checkpoint's routers (names, shapes, dtypes, sha256) and the ones this worker
        runs."""
        table = self._roma()
        return {"base": table.base_specs.to_json(), "held_layers": sorted(table.routers)}

    @_rpc
    def roma_apply(self, patch_b64: str, version: str) -> dict[str, Any]:
        """Apply a base64 safetensors patch ('' restores the base routers) as ``version``."""
        start = time.perf_counter()
        table = self._roma()
        patch = None
        if patch_b64:
            if len(patch_b64) > MAX_PATCH_BYTES * 4 // 3 + 4:
                raise PatchError("too_large", f"patch is over {MAX_PATCH_BYTES} bytes")
            try:
                data = base64.b64decode(patch_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise PatchError("bad_encoding", f"patch is not valid base64: {exc}") from exc
            patch = read_patch(data, max_bytes=MAX_PATCH_BYTES)
        target = table.target_for(patch, str(version))
        decoded = time.perf_counter()
        result = table.switch(target)
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
        """Per-layer expert selection counts. ``action``: ``enable``, ``disable``, ``read``,
        ``reset`` (read, then zero). Off until enabled: it adds work to every forward."""
        table = self._roma()
        load: ExpertLoad | None = getattr(self, "_roma_load", None)
        if load is None:
            load = ExpertLoad(table, self.model_config.hf_config)  # type: ignore[attr-defined]
            self._roma_load = load
        if action == "enable":
            load.enable()
        elif action == "disable":
            load.disable()
        elif action not in ("read", "reset"):
            raise PatchError("bad_action", f"unknown action {action!r}", "action")
        return {"version": table.held.version, **load.snapshot(reset=action == "reset")}
