"""Everything one gateway holds, built once at start-up and kept on ``app.state.gateway``."""

from __future__ import annotations

from dataclasses import dataclass

from roma_service.gateway.engines import EnginePool
from roma_service.gateway.expert_load import ExpertLoadExporter
from roma_service.gateway.gate import SwapGate
from roma_service.gateway.swaps import Deployer, DeployLock, Reconciler, SwapContext
from roma_service.gateway.swaps.canary import Canary
from roma_service.gateway.swaps.resident import Residency
from roma_service.gateway.sync import Synchroniser
from roma_service.metrics import Metrics
from roma_service.registry import Registry
from roma_service.settings import Settings


@dataclass
class Gateway:
    settings: Settings
    metrics: Metrics
    registry: Registry
    pool: EnginePool
    gate: SwapGate
    deployer: Deployer
    reconciler: Reconciler
    residency: Residency
    canary: Canary
    sync: Synchroniser
    expert_load: ExpertLoadExporter

    @classmethod
    def build(cls, settings: Settings, redis_url: str, engine_urls: list[str]) -> Gateway:
        metrics = Metrics()
        registry = Registry.from_url(redis_url, settings.redis_prefix)
        pool = EnginePool(engine_urls, metrics, settings.engine_timeout_s)
        gate = SwapGate()
        expert_load = ExpertLoadExporter(pool, metrics, settings.expert_load_interval_s)
        lock = DeployLock(registry, settings)
        swaps = SwapContext(pool, registry, lock, settings, metrics, expert_load)
        residency = Residency(swaps)
        deployer = Deployer(swaps, gate, residency)
        reconciler = Reconciler(swaps, residency)
        canary = Canary(swaps, residency)
        sync = Synchroniser(pool, registry, reconciler, settings)
        return cls(
            settings, metrics, registry, pool, gate, deployer, reconciler, residency, canary,
            sync, expert_load,
        )  # fmt: skip

    def start(self) -> None:
        """The background work: reconciling engines, following events, reading expert load."""
        self.sync.start()
        self.expert_load.start()

    async def aclose(self) -> None:
        await self.expert_load.stop()
        await self.sync.stop()
        await self.residency.release_leases()
        await self.pool.aclose()
        await self.registry.aclose()
