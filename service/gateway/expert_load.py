"""Expert load per MoE layer and router version, exported to ``/metrics`` (opt-in).

The engines count which experts their routers pick (``roma_expert_load``: a forward hook per
router, off until enabled; ``docs/engine.md``), per router version: each token is counted under
the version its request was bound to (its slot), and a slot's counts are set aside for its
version before anything else is loaded there. When ``ROMA_EXPERT_LOAD_INTERVAL_S`` > 0 this
exporter enables the counters before the gateway reports ready, and every interval reads and
zeroes them in one worker call (so no token falls between the read and the reset), adding each
version's counts to that version's series.

Attribution is therefore exact whenever the read happens, also while several versions serve at
once and across swaps made by other gateways. The deployer (single-version mode) and the
reconciler still read right before they change an engine's routers, so the counters never hold
more than one interval. Gateways that share engines each read-and-zero the same counters: each
exports the part it read, and the sum over gateways is the engines' total.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from roma_patch import router_of_tensor
from roma_service.engine.results import VersionLoad
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
        """Book what ``engines`` counted since the last read to the versions that routed it;
        enable counting where it is off (a new or restarted engine). Never raises: a metrics
        failure must not fail a deploy or a reconcile."""
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
        if not load.enabled:
            await engine.client.expert_load("enable")
            return
        # The engine counts per version (each token in the slot its request was bound to).
        for version, part in load.versions.items():
            self._book(str(version), part)

    def _book(self, version: str, part: VersionLoad) -> None:
        for name, counts in part.counts.items():
            layer = layer_label(name)
            if tokens := part.tokens.get(name, 0):
                self.metrics.router_tokens.labels(version, layer).inc(tokens)
            for expert, count in enumerate(counts):
                if count:
                    self.metrics.expert_tokens.labels(version, layer, str(expert)).inc(count)
