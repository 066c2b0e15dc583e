"""The engines behind one gateway: who is in rotation, what each holds, and who gets a request.

An engine takes traffic only while it is reachable *and* holds the active router version, so a
late or restarted engine (which comes back with the checkpoint's routers) stays out of rotation
until the reconciler has given it the active version. Requests go to the least-loaded engine in
rotation (fewest in flight; round-robin among ties).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import httpx

from roma_patch import BaseRouters
from roma_service.engine.client import EngineClient
from roma_service.logging import set_active_version
from roma_service.metrics import Metrics


@dataclass
class EngineHandle:
    url: str
    client: EngineClient
    healthy: bool = False
    version: int | None = None  # the version it verifiably holds; None = unknown
    generation: int = 0  # bumps on every change of the held version
    inflight: int = 0
    error: str | None = None
    _order: int = field(default=0, repr=False)

    def describe(self, active: int | None) -> dict[str, object]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "version": self.version,
            "in_rotation": self.healthy and self.version is not None and self.version == active,
            "inflight": self.inflight,
            "error": self.error,
        }


class NoEngine(Exception):
    """No engine is in rotation."""


class EnginePool:
    def __init__(self, urls: list[str], metrics: Metrics, timeout_s: float) -> None:
        if not urls:
            raise ValueError("at least one engine URL is needed")
        self.metrics = metrics
        self.engines = [
            EngineHandle(url, EngineClient(url, timeout=timeout_s), _order=i)
            for i, url in enumerate(urls)
        ]
        # Proxied traffic: one pooled client, no read timeout of its own (streams may be long;
        # the request timeout bounds them).
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )
        self.base: BaseRouters | None = None
        self.active: int | None = None  # the active version, as last read from Redis
        # (version, patch bytes) of the active version, to restore engines while Redis is away.
        self._blob: tuple[int, bytes | None] | None = None
        self._rr = itertools.count()

    def in_rotation(self) -> list[EngineHandle]:
        return [e for e in self.engines if self._serves_active(e)]

    def _serves_active(self, e: EngineHandle) -> bool:
        return e.healthy and e.version is not None and e.version == self.active

    def pick(self) -> EngineHandle:
        ready = self.in_rotation()
        if not ready:
            raise NoEngine(self.why_not_ready())
        turn = next(self._rr)
        return min(ready, key=lambda e: (e.inflight, (e._order - turn) % len(self.engines)))

    def set_active(self, version: int) -> None:
        self.active = version
        self.metrics.active_version.set(version)
        set_active_version(version)
        self._publish_metrics()

    def cache_blob(self, version: int, blob: bytes | None) -> None:
        self._blob = (version, blob)

    def cached_blob(self, version: int) -> bytes | None:
        """The patch of ``version`` if cached (None is version 0's "no patch"); KeyError if
        this gateway does not hold it."""
        if version == 0:
            return None
        if self._blob is None or self._blob[0] != version:
            raise KeyError(version)
        return self._blob[1]

    def set_held(self, engine: EngineHandle, version: int | None, healthy: bool = True) -> None:
        """Record what ``engine`` holds. A change bumps its generation, which is how a response
        learns that it spanned a swap."""
        if version != engine.version:
            engine.generation += 1
        engine.version, engine.healthy = version, healthy
        if healthy:
            engine.error = None
        self._publish_metrics()

    def mark_down(self, engine: EngineHandle, error: str) -> None:
        """Out of rotation until the reconciler sees it back and holding the active version.
        Its version is forgotten: a restarted engine comes back with the checkpoint's routers."""
        engine.healthy, engine.error = False, error
        if engine.version is not None:
            engine.generation += 1
        engine.version = None
        self._publish_metrics()

    def ready(self) -> bool:
        return bool(self.in_rotation())

    def why_not_ready(self) -> str:
        if self.active is None:
            return "the gateway is starting: the active router version is not known yet"
        states = "; ".join(
            f"{e.url}: " + (e.error or f"holds version {e.version}, active is {self.active}")
            for e in self.engines
        )
        return f"no engine holds the active router version {self.active} ({states})"

    def describe(self) -> list[dict[str, object]]:
        return [e.describe(self.active) for e in self.engines]

    def _publish_metrics(self) -> None:
        for e in self.engines:
            self.metrics.engine_version.labels(e.url).set(-1 if e.version is None else e.version)
            self.metrics.engine_ready.labels(e.url).set(1 if self._serves_active(e) else 0)

    async def aclose(self) -> None:
        await self.http.aclose()
        for e in self.engines:
            await e.client.aclose()
