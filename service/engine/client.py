"""Async client for one vLLM engine running our worker extension: the gateway's only way in.

Router calls go through vLLM's dev-mode ``POST /collective_rpc``, which runs the extension's
method on every worker and returns one result per worker. Every result is checked: a patch
counts as applied only if all workers applied it, verified it and report the same checksums. If
some workers applied it and others failed, the client asks them all to undo it, so an engine
never serves with its workers on different routers.
"""

from __future__ import annotations

import base64
import contextlib
import time
from typing import Any, Literal

import httpx

from roma_patch import BaseRouters
from roma_service.engine.errors import (
    EngineError,
    EngineRejected,
    EngineRPCFailed,
    EngineUnreachable,
)
from roma_service.engine.results import (
    ApplyResult,
    EngineState,
    ExpertLoadReport,
    LayerReadback,
    VersionLoad,
)
from roma_service.engine.slot_client import SlotsAPI

# Worker error codes that mean "the engine is broken", not "the patch is bad".
_ENGINE_FAULTS = {"internal", "swap_failed", "readback_failed", "no_routers", "slots_disabled"}
# Refusals that are not about the patch itself: the slot table's state forbids the call now.
_REFUSAL_STATUS = {
    "no_free_slot": 409,
    "slot_busy": 409,
    "slot_pinned": 409,
    "slots_in_use": 409,
    "slot0_not_base": 409,
    "unknown_version": 404,
}


class EngineClient(SlotsAPI):
    """``EngineClient("http://127.0.0.1:8001")``; ``url`` is also the OpenAI base the gateway
    proxies ``/v1/*`` to."""

    def __init__(
        self, base_url: str, timeout: float = 30.0, rpc_timeout: float | None = 60.0
    ) -> None:
        self.url = base_url.rstrip("/")
        self.timeout = timeout
        self.rpc_timeout = rpc_timeout
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- plumbing ---------------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, timeout: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        try:
            response = await self._http.request(
                method, path, timeout=timeout or self.timeout, **kwargs
            )
        except httpx.TimeoutException as exc:
            raise EngineUnreachable(
                f"engine at {self.url} did not answer {method} {path} in time", code="timeout"
            ) from exc
        except httpx.HTTPError as exc:
            raise EngineUnreachable(
                f"engine at {self.url} is unreachable ({type(exc).__name__}: {exc})",
                code="unreachable",
            ) from exc
        if response.status_code >= 400:
            hint = ""
            if response.status_code == 404:
                hint = " (is the engine running with VLLM_SERVER_DEV_MODE=1?)"
            raise EngineRPCFailed(
                f"engine {method} {path} -> {response.status_code}{hint}: {response.text[:500]}",
                status=response.status_code,
                code="engine_http_error",
            )
        return response

    async def _rpc(self, method: str, *args: str) -> list[dict[str, Any]]:
        """Call an extension method on every worker; return the per-worker results."""
        body: dict[str, Any] = {"method": method, "args": list(args)}
        if self.rpc_timeout is not None:
            body["timeout"] = self.rpc_timeout
        timeout = (self.rpc_timeout or self.timeout) + 10.0
        try:
            response = await self._request("POST", "/collective_rpc", timeout=timeout, json=body)
        except EngineRPCFailed as exc:
            exc.message += (
                "; is the engine started with --worker-extension-cls "
                "roma_service.engine.extension.RouterExtension?"
            )
            exc.args = (exc.message,)
            raise
        results = response.json().get("results")
        if not isinstance(results, list) or not results:
            raise EngineRPCFailed(f"{method}: engine returned no worker results", code="no_workers")
        for result in results:
            if not isinstance(result, dict) or "ok" not in result:
                raise EngineRPCFailed(
                    f"{method}: unexpected worker result {str(result)[:200]!r}; is the engine "
                    "running roma_service.engine.extension.RouterExtension?",
                    code="bad_worker_result",
                )
        return results

    @staticmethod
    def _raise_failures(method: str, results: list[dict[str, Any]]) -> None:
        failed = [r for r in results if not r["ok"]]
        if not failed:
            return
        error = failed[0]["error"]
        if len(failed) == len(results) and error["code"] not in _ENGINE_FAULTS:
            raise EngineRejected(
                error["message"],
                status=_REFUSAL_STATUS.get(error["code"], 400),
                code=error["code"],
                param=error.get("param"),
            )
        workers = ", ".join(f"worker {r['worker']}: {r['error']['message']}" for r in failed)
        raise EngineRPCFailed(
            f"{method} failed on {len(failed)}/{len(results)} workers ({workers})",
            code=error["code"],
            detail={"errors": [r["error"] for r in failed]},
        )

    @staticmethod
    def _merge_checksums(method: str, results: list[dict[str, Any]]) -> dict[str, str]:
        """Union of the workers' per-layer checksums; a layer two workers disagree on is an
        error (tensor parallel: all hold all layers; pipeline parallel: disjoint sets)."""
        merged: dict[str, str] = {}
        for result in results:
            for name, sha in result["checksums"].items():
                if merged.setdefault(name, sha) != sha:
                    raise EngineRPCFailed(
                        f"{method}: workers disagree on {name}", code="workers_disagree"
                    )
        versions = {r["version"] for r in results}
        if len(versions) != 1:
            raise EngineRPCFailed(
                f"{method}: workers hold different versions {sorted(map(str, versions))}",
                code="workers_disagree",
            )
        return merged

    # -- the contract -----------------------------------------------------------------------

    async def healthy(self) -> bool:
        try:
            response = await self._http.get("/health", timeout=min(self.timeout, 5.0))
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def base_routers(self) -> BaseRouters:
        """The served checkpoint's routers, as the patch validator needs them."""
        results = await self._rpc("roma_base_routers")
        self._raise_failures("base_routers", results)
        first = BaseRouters.from_json(results[0]["base"])
        for result in results[1:]:
            if BaseRouters.from_json(result["base"]) != first:
                raise EngineRPCFailed(
                    "base_routers: workers read different checkpoints", code="workers_disagree"
                )
        return first

    async def apply(self, patch_bytes: bytes | None, version: int) -> ApplyResult:
        """Make every worker hold ``patch_bytes`` (None: the base routers) as ``version``.
        Raises EngineRejected for a bad patch (nothing changed), EngineRPCFailed when workers
        failed (the ones that had applied it are rolled back), EngineUnreachable."""
        payload = base64.b64encode(patch_bytes).decode() if patch_bytes else ""
        started = time.perf_counter()
        results = await self._rpc("roma_apply", payload, str(version))
        rpc_ms = (time.perf_counter() - started) * 1e3
        if any(r["ok"] for r in results) and not all(r["ok"] for r in results):
            await self._undo(version)
        self._raise_failures("apply", results)
        return ApplyResult(
            **self._merge_applied("apply", results, rpc_ms),
            changed=sorted({n for r in results for n in r["changed"]}),
        )

    def _merge_applied(
        self, method: str, results: list[dict[str, Any]], rpc_ms: float
    ) -> dict[str, Any]:
        """The fields of :class:`Applied` from every worker's result (checksums must agree)."""
        layers: dict[str, LayerReadback] = {}
        for result in results:
            layers.update({n: LayerReadback(**v) for n, v in result["layers"].items()})
        return {
            "version": int(results[0]["version"]),
            "checksums": self._merge_checksums(method, results),
            "verified": all(r["verified"] for r in results),
            "max_abs_err": max(r["max_abs_err"] for r in results),
            "apply_ms": max(r.get("apply_ms", 0.0) for r in results),
            "verify_ms": max(r["verify_ms"] for r in results),
            "decode_ms": max(r["decode_ms"] for r in results),
            "worker_total_ms": max(r["total_ms"] for r in results),
            "rpc_ms": rpc_ms,
            "workers": len(results),
            "layers": layers,
        }

    async def _undo(self, version: int) -> None:
        # Best effort: the original failure is what the caller must see.
        with contextlib.suppress(EngineError):
            await self._rpc("roma_undo", str(version))

    async def state(self) -> EngineState:
        results = await self._rpc("roma_state")
        self._raise_failures("state", results)
        checksums = self._merge_checksums("state", results)
        version = results[0]["version"]
        return EngineState(
            version=None if version is None else int(version),
            checksums=checksums,
            verified=all(r["verified"] for r in results),
            max_abs_err=max(r["max_abs_err"] for r in results),
            workers=len(results),
        )

    async def expert_load(
        self, action: Literal["enable", "disable", "read", "reset"] = "read"
    ) -> ExpertLoadReport:
        """Per-layer expert selection counts of the engine, per router version (opt-in:
        ``enable`` first).

        Each router is counted once: pipeline stages hold different layers, while tensor-
        parallel ranks each run the same (replicated) router on the same tokens, so a layer
        that several workers report is taken from the first, not summed."""
        results = await self._rpc("roma_expert_load", action)
        self._raise_failures("expert_load", results)
        totals = _first_per_router(results)
        names = {v for r in results for v in r["versions"]}
        versions = {
            int(v): _first_per_router([r["versions"][v] for r in results if v in r["versions"]])
            for v in names
        }
        version = results[0]["version"]
        return ExpertLoadReport(
            version=None if version is None else int(version),
            enabled=all(r["enabled"] for r in results),
            top_k=results[0]["top_k"],
            versions=versions,
            **totals.model_dump(),
        )

    async def pause(
        self, mode: Literal["wait", "keep", "abort"] = "wait", timeout_s: float | None = None
    ) -> None:
        """Stop scheduling. ``wait`` returns once in-flight requests finished (new ones queue),
        ``keep`` freezes them mid-generation, ``abort`` ends them. On a timeout the engine may
        still be pausing: call ``resume()`` to back out."""
        await self._request(
            "POST",
            "/pause",
            timeout=timeout_s,
            params={"mode": mode, "clear_cache": "false"},
        )

    async def resume(self) -> None:
        await self._request("POST", "/resume")

    async def is_paused(self) -> bool:
        return bool((await self._request("GET", "/is_paused")).json()["is_paused"])

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Drop cached KV (computed under the old routers). False if blocks were still held by
        running requests; ``reset_running_requests`` makes vLLM preempt and recompute those."""
        response = await self._request(
            "POST",
            "/reset_prefix_cache",
            params={"reset_running_requests": str(reset_running_requests).lower()},
        )
        return bool(response.json().get("success", True))


def _first_per_router(parts: list[dict[str, Any]]) -> VersionLoad:
    """Workers' ``tokens``/``counts``, each router taken from the first worker that has it."""
    merged = VersionLoad()
    for part in parts:
        for name, row in part["counts"].items():
            merged.counts.setdefault(name, row)
        for name, n in part["tokens"].items():
            merged.tokens.setdefault(name, n)
    return merged
