"""The deploy lock: one swap or reconcile at a time, across every gateway on the same Redis."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio.lock import Lock
from redis.exceptions import LockError, LockNotOwnedError

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
        # The token of a hold whose end Redis never heard of (it went away during the hold or
        # during the acquire itself): its key may have survived in Redis' append-only file and
        # would block every gateway for the whole lease. Settled at the next hold.
        self.unsettled: bytes | None = None

    async def _settle(self, lock: Lock) -> None:
        """Delete this gateway's own leftover lock key, if Redis still holds it."""
        if self.unsettled is None:
            return
        with contextlib.suppress(LockNotOwnedError):
            await lock.do_release(self.unsettled)
        self.unsettled = None

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
            token = secrets.token_hex(16).encode()
            with timings.phase("lock"):
                await self._settle(lock)
                self.unsettled = token  # set in Redis even if the answer never comes back
                acquired = await lock.acquire(token=token)
            if not acquired:
                self.unsettled = None
                raise _busy()
            try:
                yield
            finally:
                with contextlib.suppress(*REDIS_DOWN):
                    # LockError: the lease ran out, the key is gone or another holder's.
                    with contextlib.suppress(LockError):
                        await lock.release()
                    self.unsettled = None
        finally:
            self.local.release()
