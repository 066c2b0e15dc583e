"""Request and response bodies of the ``/routers`` control routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from roma_service.registry import HistoryEntry, TrafficHistoryEntry, VersionRecord


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


class TrafficBody(BaseModel):
    """``PUT /routers/traffic``: the new split."""

    # Checked by gateway.traffic.validate_split, whose messages name the faulty entry.
    weights: Any = Field(
        description="router version -> share of new requests; shares in [0, 1] summing to 1 "
        "(zero shares are dropped)",
        examples=[{"3": 0.9, "4": 0.1}],
        json_schema_extra={"type": "object", "additionalProperties": {"type": "number"}},
    )
    reason: str = Field("canary", max_length=200, description="recorded in the split's history")

    model_config = {"extra": "forbid"}


class PromoteBody(BaseModel):
    """``POST /routers/traffic/promote``."""

    version: int | None = Field(
        None,
        ge=0,
        le=2**62,
        description="the version to make active; may be left out when the split names exactly "
        "one version besides the active one",
    )

    model_config = {"extra": "forbid"}


class TrafficInfo(BaseModel):
    weights: dict[int, float] | None = Field(
        description="router version -> share of new requests; null: no split, every request "
        "goes to the active version"
    )
    active: int = Field(description="the active version")
    at: str | None = Field(None, description="when the split was set")
    by: str | None = Field(None, description="the gateway that set it")
    reason: str | None = None


class TrafficChange(TrafficInfo):
    previous: dict[int, float] | None = Field(description="the split in force before this call")
    changed: bool = Field(description="False when abort found no split to end")
    timings_ms: dict[str, float] = Field(
        description="milliseconds per phase: lock, the engines' load/verify/pin, store, total"
    )


class TrafficHistoryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TrafficHistoryEntry]
