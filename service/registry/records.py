"""What the registry stores about each version, as returned by ``GET /routers``."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["base", "staged", "deployed"]


class VersionRecord(BaseModel):
    """One router version. Version 0 is the base routers (no patch, no blob)."""

    version: int
    id: str | None = Field(None, description="sha256 of the patch file; None for version 0")
    size: int = 0
    layers: list[int] = Field(default_factory=list)
    model_fingerprint: str = Field(
        description="fingerprint of all of the served model's base routers (the registry's "
        "namespace): the same for every version"
    )
    base_fingerprint: str | None = Field(
        None,
        description="the patch's base_fingerprint, as in its metadata: fingerprint of the base "
        "routers of the layers it replaces; None for version 0 (no patch)",
    )
    objective: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict, description="the patch's metadata")
    created_at: str
    activated_at: str | None = None
    status: Status = Field(
        description="base (version 0), staged (stored, never verified on the engines), "
        "deployed (verified and activated at least once)"
    )

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes], model_fingerprint: str) -> VersionRecord:
        data = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            version=int(data["version"]),
            id=data["id"],
            size=int(data["size"]),
            layers=json.loads(data["layers"]),
            model_fingerprint=model_fingerprint,
            base_fingerprint=data["base_fingerprint"],
            objective=data.get("objective") or None,
            meta=json.loads(data.get("meta") or "{}"),
            created_at=data["created_at"],
            activated_at=data.get("activated_at") or None,
            status=data.get("status", "staged"),  # type: ignore[arg-type]
        )


class BaseRecord(BaseModel):
    """Version 0: what the served model's base routers are, recorded at the first start-up."""

    model: str
    fingerprint: str = Field(description="of all the base routers: the namespace's name")
    specs: dict[str, Any]
    recorded_at: str


class HistoryEntry(BaseModel):
    """One activation, oldest first in ``GET /routers/history``."""

    id: str = Field(description="Redis stream id (millisecond time + sequence)")
    version: int
    previous: int
    reason: str
    by: str
    at: str


class TrafficRecord(BaseModel):
    """The canary traffic split in force: new requests go to versions by these shares."""

    weights: dict[int, float] = Field(description="router version -> share of new requests")
    at: str
    by: str = Field(description="the gateway that set it")
    reason: str


class TrafficHistoryEntry(BaseModel):
    """One change of the split, oldest first in ``GET /routers/traffic/history``."""

    id: str = Field(description="Redis stream id (millisecond time + sequence)")
    weights: dict[int, float] | None = Field(description="the new split; null when cleared")
    previous: dict[int, float] | None = Field(description="the split before; null when none")
    reason: str
    by: str
    at: str
