"""The deploy lock: one swap or reconcile at a time, across every gateway on the same Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import LockError

from roma_service.gateway.swaps.errors import REDIS_DOWN, Busy
from roma_service.gateway.timings import Timings
from roma_service.registry import Registry
from roma_service.settings import Settings


def _busy() -> Busy:
    return Busy("another deploy holds the deploy lock; retry shortly", "deploy_in_progress")


class DeployLock:
    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        # This gateway's own swaps and reconciles; held alone while Redis is away.
        self.local = asyncio.Lock()

    @asynccontextmanager
    async def hold(
        self, timings: Timings, wait_s: float | None = None, local_wait_s: float | None = None
    ) -> AsyncIterator[None]:
        """This gateway's lock, then the Redis lock shared by every gateway (a lease, so a dead
        gateway cannot block deploys forever). :class:`Busy` if either stays taken."""
        wait = self.settings.deploy_lock_timeout_s if wait_s is None else wait_s
        with timings.phase("lock"):
            try:
                async with asyncio.timeout(local_wait_s or wait):
                    await self.local.acquire()
            except TimeoutError as exc:
                raise _busy() from exc
        try:
            lease = self.settings.drain_timeout_s * 2 + self.settings.engine_timeout_s * 4
            lock = self.registry.deploy_lock(lease_s=lease, wait_s=wait)
            with timings.phase("lock"):
                acquired = await lock.acquire()
            if not acquired:
                raise _busy()
            try:
                yield
            finally:
                with contextlib.suppress(LockError, *REDIS_DOWN):
                    await lock.release()
        finally:
            self.local.release()
