"""Expert load per MoE layer and router version, exported to ``/metrics`` (opt-in).

The engines count which experts their routers pick (``roma_expert_load``: a forward hook per
router, off until enabled; ``docs/engine.md``). When ``ROMA_EXPERT_LOAD_INTERVAL_S`` > 0 this
exporter enables the counters before the gateway reports ready, and every interval reads and
zeroes them in one worker call (so no token falls between the read and the reset), adding the
counts to the router version the engine held.

Attribution is exact across this gateway's own swaps: the deployer collects right before it
applies a new version (after the drain), and the reconciler before it restores a lagging
engine. A swap made by another gateway that shares the engines is only seen at the next read,
so up to one interval of tokens can be booked to the version after it. Gateways that share
engines each read-and-zero the same counters: each exports the part it read, and the sum over
gateways is the engines' total.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from roma_patch import router_of_tensor
from roma_service.gateway.engines import EngineHandle, EnginePool
from roma_service.metrics import Metrics

log = logging.getLogger(__name__)


def layer_label(router_name: str) -> str:
    """``model.layers.12.mlp.gate.weight`` -> ``12`` (the name itself if it is no router's)."""
    ref = router_of_tensor(router_name)
    return str(ref.layer) if ref else router_name


class ExpertLoadExporter:
    def __init__(self, pool: EnginePool, metrics: Metrics, interval_s: float) -> None:
        self.pool = pool
        self.metrics = metrics
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._run(), name="roma-expert-load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.collect([e for e in self.pool.engines if e.healthy])

    async def collect(self, engines: list[EngineHandle]) -> None:
        """Book what ``engines`` counted since the last read to the version each holds; enable
        counting where it is off (a new or restarted engine). Never raises: a metrics failure
        must not fail a deploy or a reconcile."""
        if not self.enabled:
            return
        results = await asyncio.gather(*(self._collect(e) for e in engines), return_exceptions=True)
        for engine, result in zip(engines, results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "expert load not read", extra={"engine": engine.url, "error": repr(result)}
                )

    async def _collect(self, engine: EngineHandle) -> None:
        load = await engine.client.expert_load("reset")
        if not load["enabled"]:
            await engine.client.expert_load("enable")
            return
        # The engine's own word on what it holds (None: the checkpoint's routers, version 0).
        version = str(load["version"] or 0)
        for name, counts in load["counts"].items():
            layer = layer_label(name)
            if tokens := load["tokens"].get(name, 0):
                self.metrics.router_tokens.labels(version, layer).inc(tokens)
            for expert, count in enumerate(counts):
                if count:
                    self.metrics.expert_tokens.labels(version, layer, str(expert)).inc(count)
