"""The real benchmark's results: the protocol's (``roma_bench.results``) plus the reference
models, the out-of-set tasks and the issue's goals. ``RealResults`` dumps to ``real.json``."""

from __future__ import annotations

import json
from typing import Any

from pydantic import field_serializer

from roma_bench.results import (
    Accuracy,
    MethodStats,
    Model,
    NeighbourRouting,
    OracleControl,
    OracleFound,
    PairedDifference,
    Search,
    SeedStats,
    SharedRouting,
    config_json,
)


class References(Model):
    """Test accuracy of the MoE with every expert on, and of the dense model when given."""

    all_experts: Accuracy
    dense: Accuracy | None


class OutOfSet(Model):
    """Tasks no method trained on: the base and the final CE and RoMA patches (every seed)."""

    sizes: dict[str, int]
    base: Accuracy
    methods: dict[str, SeedStats]  # test_* = accuracy on the out-of-set tasks
    vs_ce: dict[str, PairedDifference | None]


class Goal(Model):
    name: str
    met: bool
    value: str


class RealResults(Model):
    config: Any  # RealConfig, a dataclass
    model: str
    sizes: dict[str, int]
    base: dict[str, Accuracy]  # by split
    oracle: OracleFound
    oracle_control: OracleControl
    neighbour_routing: NeighbourRouting
    shared_routing: SharedRouting
    references: References
    search: dict[str, Search]
    methods: dict[str, MethodStats]
    ablations: dict[str, dict[str, SeedStats]]
    out_of_set: OutOfSet
    goals: list[Goal]
    success_set: int | None
    seconds: float

    @field_serializer("config")
    def _config(self, cfg: Any) -> dict[str, Any]:
        return config_json(cfg)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2, sort_keys=True) + "\n"
