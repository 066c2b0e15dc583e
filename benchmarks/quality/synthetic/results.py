"""The routing-gap benchmark's results: the protocol's (``roma_bench.results``) plus the
diagnostics only synthetic tasks allow (per phrasing, in distribution, per domain's experts).
``QualityResults`` dumps to the published ``quality.json``."""

from __future__ import annotations

import json
from typing import Any

from pydantic import field_serializer, model_serializer, model_validator

from roma_bench.protocol import QualityConfig
from roma_bench.results import (
    Accuracy,
    MethodStats,
    Model,
    OracleControl,
    OracleFound,
    Search,
    SeedStats,
    SharedRouting,
    config_json,
)


class FrameRow(Model):
    """Base and domain-routing accuracy of one held-out phrasing of one task."""

    task: str
    frame: str
    n: int
    # Means of booleans (statistics.mean): an int when every sample agrees, kept as such.
    base: float | int
    domain_routing: float | int


class FramedAccuracy(Accuracy):
    frames: list[FrameRow]


class DomainRoutingFound(Model):
    """Routing at the tuned token set to the task's success-set mean, per split."""

    val: FramedAccuracy
    test: FramedAccuracy


class DomainRouting(DomainRoutingFound):
    gap_closed: float | None


class MethodsInline(Model):
    """Keeps ``methods`` as keys beside the other fields, the shape ``quality.json`` has."""

    @model_validator(mode="before")
    @classmethod
    def _gather_methods(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "methods" in data:
            return data
        fields = {k: v for k, v in data.items() if k in cls.model_fields}
        return fields | {"methods": {k: v for k, v in data.items() if k not in fields}}

    @model_serializer(mode="wrap")
    def _inline_methods(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        methods = data.pop("methods")
        return data | methods


class MeanStd(Model):
    mean: float
    std: float


class MeanStdGap(MeanStd):
    gap_closed: float | None


class InDistributionBounds(Model):
    """Oracle and domain-routing accuracy per phrasing group of the pool."""

    oracle: dict[str, float]
    domain_routing: dict[str, float]


class InDistribution(InDistributionBounds, MethodsInline):
    """The final patches on fresh prompts in the pool's own phrasings, by phrasing group."""

    sizes: dict[str, int]
    base: dict[str, float]
    methods: dict[str, dict[str, MeanStdGap]]


class DomainMass(MethodsInline):
    """Routing weight on the sample's own domain experts: base, and per method over seeds."""

    base: float
    methods: dict[str, MeanStd]


class QualityResults(Model):
    config: QualityConfig
    model: str
    sizes: dict[str, int]
    base: dict[str, Accuracy]  # by split
    oracle: OracleFound
    oracle_control: OracleControl
    domain_routing: DomainRouting
    shared_routing: SharedRouting
    in_distribution: InDistribution
    domain_mass: DomainMass
    search: dict[str, Search]
    methods: dict[str, MethodStats]
    ablations: dict[str, dict[str, SeedStats]]
    success_set: int | None
    seconds: float
    routing_plot_task: str | None = None  # the test task of quality_routing.png, when drawn

    @field_serializer("config")
    def _config(self, cfg: QualityConfig) -> dict[str, Any]:
        return config_json(cfg)

    def to_json(self) -> str:
        unset = {"routing_plot_task"} if self.routing_plot_task is None else set()
        return json.dumps(self.model_dump(exclude=unset), indent=2, sort_keys=True) + "\n"
