"""What the engine reports, as the gateway reads it (pydantic models, merged over workers)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LayerReadback(BaseModel):
    sha256: str
    max_abs_err: float
    verified: bool


class Applied(BaseModel):
    """What every worker reported after putting routers in place (merged; timings are the
    slowest worker's)."""

    version: int
    checksums: dict[str, str]
    verified: bool
    max_abs_err: float
    apply_ms: float = Field(description="stage + commit inside the worker")
    workers: int
    verify_ms: float = 0.0
    decode_ms: float = 0.0
    worker_total_ms: float = Field(0.0, description="decode + validate + apply + verify")
    rpc_ms: float = Field(0.0, description="round trip seen by the client")
    layers: dict[str, LayerReadback] = Field(default_factory=dict)


class ApplyResult(Applied):
    """The single-version swap (slot 0)."""

    changed: list[str] = Field(default_factory=list)


class EngineState(BaseModel):
    """The version the engine holds (None: the checkpoint's routers, never changed since start),
    per-layer checksums, and a fresh functional read-back."""

    version: int | None
    checksums: dict[str, str]
    verified: bool
    max_abs_err: float = 0.0
    workers: int = 1


class SlotInfo(BaseModel):
    """One slot. ``version`` None: free. ``in_flight``: requests bound to it that have not
    finished, as the engine's workers see them (requests still queued in vLLM's scheduler or in
    transit are not counted yet: the gateway keeps its own count for those)."""

    slot: int
    version: int | None
    pinned: bool
    in_flight: int
    last_used: int = Field(description="engine step that last ran one of its requests")
    loaded_at: float = 0.0
    checksums: dict[str, str] = Field(default_factory=dict)
    verified: bool | None = Field(None, description="fresh read-back (slots(readback=True))")
    max_abs_err: float | None = None
    leased_s: float = Field(0.0, description="seconds left of its longest lease (any holder)")


class SlotTableState(BaseModel):
    capacity: int
    strategy: str
    steps: int = Field(0, description="model forwards since the engine started")
    mixed_steps: int = Field(0, description="forwards whose tokens used more than one slot")
    slots: list[SlotInfo]
    misses: dict[int, int] = Field(
        default_factory=dict,
        description="version -> requests that asked for it while it was not resident (they ran "
        "on slot 0): a gateway bug if ever non-zero",
    )
    tainted: list[int] = Field(default_factory=list)
    workers: int = 1

    def resident(self) -> dict[int, SlotInfo]:
        """Resident versions -> their slot."""
        return {s.version: s for s in self.slots if s.version is not None}


class SlotLoadResult(Applied):
    slot: int
    loaded: bool = Field(description="False: the version was already resident")
    evicted: int | None = Field(None, description="version evicted to make room")
    cache_reset: bool = Field(
        False, description="the prefix cache was reset: this version's salt held stale KV"
    )


class SlotFreeResult(BaseModel):
    slot: int
    version: int
    moved: int = Field(0, description="in-flight requests moved to another version")
    workers: int = 1


class VersionLoad(BaseModel):
    """What one router version routed: per router (checkpoint tensor name), the tokens it saw
    and how many of them picked each expert (a token picks ``top_k``)."""

    tokens: dict[str, int] = Field(default_factory=dict)
    counts: dict[str, list[int]] = Field(default_factory=dict)


class ExpertLoadReport(VersionLoad):
    """The engine's expert-load counters (``tokens``/``counts``: totals over versions)."""

    version: int | None = Field(description="what slot 0 holds (None: the checkpoint's routers)")
    enabled: bool
    top_k: int
    versions: dict[int, VersionLoad] = Field(
        default_factory=dict,
        description="per router version, exactly (tokens are counted in the slot that ran "
        "them); versions that routed no token are left out",
    )
