"""What the deployer and the reconciler share: one per gateway, built at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from roma_service.gateway.engines import EnginePool
from roma_service.gateway.expert_load import ExpertLoadExporter
from roma_service.gateway.swaps.lock import DeployLock
from roma_service.gateway.swaps.target import Target, fetch_target
from roma_service.metrics import Metrics
from roma_service.registry import Registry
from roma_service.settings import Settings


@dataclass(frozen=True)
class SwapContext:
    pool: EnginePool
    registry: Registry
    lock: DeployLock  # held around every swap and reconcile
    settings: Settings
    metrics: Metrics
    expert_load: ExpertLoadExporter  # read before routers change, so tokens go to their version

    async def fetch(self, version: int) -> Target:
        """``version``'s target (patch from this gateway's cache, else from Redis)."""
        return await fetch_target(version, self.pool, self.registry, self.settings.max_patch_bytes)
