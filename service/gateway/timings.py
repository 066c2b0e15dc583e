"""Per-phase wall-clock timings of one deploy, reported in the 201 body and to /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timings:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ms: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def add(self, name: str, ms: float) -> None:
        """A phase measured elsewhere (inside the engines' workers)."""
        self.ms[name] = max(self.ms.get(name, 0.0), ms)

    def total(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in self.ms.items()}
        out["total"] = round((time.perf_counter() - self.start) * 1e3, 3)
        return out
