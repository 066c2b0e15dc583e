"""Prometheus metrics of one gateway, served on ``/metrics``.

Each app owns its own ``CollectorRegistry`` (not the process-global one), so several gateways
in one process (the tests) never collide, and ``/metrics`` shows only this gateway.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_DEPLOY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "roma_requests",
            "Proxied OpenAI requests, by route, router version and HTTP status.",
            ["route", "router_version", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "roma_request_latency_seconds",
            "Time from request to the last byte of the response, by route and router version.",
            ["route", "router_version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "roma_time_to_first_byte_seconds",
            "Time to the first body byte of streamed responses, by router version.",
            ["router_version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.version_changed = Counter(
            "roma_responses_spanning_swap",
            "Responses generated across a router swap (immediate policy), reported to clients.",
            registry=r,
        )
        self.deploys = Counter(
            "roma_deploys",
            "Deploys and activations, by kind (deploy, activate, promote, reconcile, on_demand: "
            "a version loaded into a slot for a request) and outcome.",
            ["kind", "outcome"],
            registry=r,
        )
        self.deploy_latency = Histogram(
            "roma_deploy_latency_seconds",
            "Duration of each deploy phase (upload, validate, store, drain, apply, verify, "
            "total) of successful deploys.",
            ["phase"],
            buckets=_DEPLOY_BUCKETS,
            registry=r,
        )
        self.active_version = Gauge(
            "roma_active_router_version", "The active router version (Redis).", registry=r
        )
        self.active_version_unfit = Gauge(
            "roma_active_version_unfit",
            "1 while the active router version cannot be applied to the served model (another "
            "model's patch, or refused by the engines); /ready says why.",
            registry=r,
        )
        self.engine_version = Gauge(
            "roma_engine_router_version",
            "The router version each engine holds (-1: unknown or unreachable).",
            ["engine"],
            registry=r,
        )
        self.engine_ready = Gauge(
            "roma_engine_ready",
            "1 when the engine is in rotation (healthy and holding the active version).",
            ["engine"],
            registry=r,
        )
        self.engine_requests = Counter(
            "roma_engine_requests",
            "Requests sent to each engine (how the load is spread).",
            ["engine"],
            registry=r,
        )
        self.engine_inflight = Gauge(
            "roma_engine_inflight_requests",
            "Requests in flight per engine.",
            ["engine"],
            registry=r,
        )

        # Filled by the expert-load exporter (gateway/expert_load.py) when it is on.
        self.expert_tokens = Counter(
            "roma_expert_tokens",
            "Tokens routed to each expert (top-k per token), by router version, MoE layer and "
            "expert; counted in the engines when ROMA_EXPERT_LOAD_INTERVAL_S > 0.",
            ["router_version", "layer", "expert"],
            registry=r,
        )
        self.router_tokens = Counter(
            "roma_router_tokens",
            "Tokens each MoE layer's router saw, by router version: an expert's share of a "
            "layer is roma_expert_tokens / (roma_router_tokens * top_k).",
            ["router_version", "layer"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
