"""Request and response bodies of the ``/routers`` control routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from roma_service.registry import HistoryEntry, VersionRecord


class VersionInfo(VersionRecord):
    active: bool = Field(description="whether this version is the active one")


class VersionList(BaseModel):
    object: Literal["list"] = "list"
    active: int
    data: list[VersionInfo]


class SwapTimings(BaseModel):
    """Milliseconds per phase (hence ``timings_ms``): upload (reading the body), validate
    (format, names, shapes, dtype, finiteness, base fingerprint), store (Redis), lock (waiting
    for another deploy), drain (in-flight requests finishing), apply (every engine, round
    trip; in slot mode: load into a slot + read-back), verify (fresh read-back from every
    engine), activate (prefix-cache reset + active pointer), total."""

    upload: float = 0.0
    validate_: float = Field(0.0, alias="validate")
    store: float = 0.0
    lock: float = 0.0
    drain: float = 0.0
    apply: float = 0.0
    engine_apply: float = Field(
        0.0, description="part of apply spent inside the engine's workers (stage + commit)"
    )
    verify: float = 0.0
    activate: float = 0.0
    evict: float = Field(
        0.0, description="?evict=true: moving running requests off the previous version"
    )
    total: float = 0.0

    model_config = {"populate_by_name": True, "serialize_by_alias": True}


class DeployResponse(BaseModel):
    version: int
    id: str | None
    created: bool = Field(description="False when the same bytes were already stored")
    changed: bool = Field(
        description="whether the engines' routers changed: False when this version was already "
        "active everywhere, or when it was only stored (activate=false)"
    )
    active: int = Field(description="the active version after this call")
    engines: list[str] = Field(description="engines that verifiably hold the active version")
    timings_ms: SwapTimings


class DeleteResponse(BaseModel):
    version: int
    deleted: Literal[True] = True


class HistoryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[HistoryEntry]
