"""The canary traffic split: which router version a new request runs under (pure, no I/O).

A split maps versions to shares of new requests (``{3: 0.9, 4: 0.1}``). A request with a
caller key (header ``X-Router-Caller``, else the OpenAI ``user`` field) is sticky: the key's
sha256 places it at a point ``u`` in [0, 1), and it runs under the version whose interval on
the cumulative weights (versions in increasing order) holds ``u``. Every gateway computes the
same answer, across restarts, and moving weight between two neighbouring versions only moves
the callers in the slice that changed hands. A request without a key draws ``u`` at random.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, field_validator

from roma_service.errors import ServiceError

CALLER_HEADER = "X-Router-Caller"
MAX_CALLER_CHARS = 256
SUM_TOLERANCE = 1e-6


class BadSplit(ServiceError, ValueError):
    """A split (or a request about one) that cannot be used; answered 400."""

    def __init__(self, message: str, param: str | None = "weights", code: str = "invalid_split"):
        super().__init__(message, param)
        self.code = code


class BadCaller(BadSplit):
    """An ``X-Router-Caller`` header that cannot be a caller key."""

    def __init__(self, message: str) -> None:
        super().__init__(message, CALLER_HEADER, "invalid_caller")


class TrafficSplit(BaseModel):
    """Version -> share of new requests; shares in (0, 1], summing to 1 (zero shares dropped)."""

    weights: dict[int, float] = Field(description="router version -> share of new requests")

    @field_validator("weights", mode="before")
    @classmethod
    def _valid(cls, raw: Any) -> dict[int, float]:
        return parse_weights(raw)

    @property
    def versions(self) -> set[int]:
        return set(self.weights)


def validate_split(raw: Any, max_versions: int | None = None) -> TrafficSplit:
    """``raw`` (a JSON object, keys may be strings) as a split, or :class:`BadSplit` naming the
    problem. ``max_versions``: how many versions the engines can hold resident at once."""
    weights = parse_weights(raw)
    if max_versions is not None and len(weights) > max_versions:
        raise BadSplit(
            f"the split names {len(weights)} versions ({_names(weights)}) but the engines hold "
            f"at most {max_versions} router versions at once (ROMA_ROUTER_SLOTS)",
            code="too_many_versions",
        )
    return TrafficSplit.model_construct(weights=weights)


def parse_weights(raw: Any) -> dict[int, float]:
    """The checks of :func:`validate_split`, without the count limit."""
    if isinstance(raw, TrafficSplit):
        return dict(raw.weights)
    if not isinstance(raw, Mapping):
        raise BadSplit(
            f"weights must be an object mapping router versions to shares, e.g. "
            f'{{"3": 0.9, "4": 0.1}}; got {type(raw).__name__}'
        )
    if not raw:
        raise BadSplit("weights must name at least one router version")
    weights: dict[int, float] = {}
    for key, share in raw.items():
        version = _version(key)
        if version in weights:
            raise BadSplit(f"weights name version {version} twice ({key!r})")
        weights[version] = _share(key, share)
    total = math.fsum(weights.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise BadSplit(f"weights must sum to 1 (within {SUM_TOLERANCE:g}); they sum to {total:.9g}")
    return {v: w for v, w in sorted(weights.items()) if w > 0.0}


def _version(key: Any) -> int:
    # JSON object keys arrive as strings; only plain decimal digits are versions.
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    raise BadSplit(f"weights: {key!r} is not a router version (an integer >= 0)")


def _share(key: Any, share: Any) -> float:
    if isinstance(share, bool) or not isinstance(share, int | float):
        raise BadSplit(f"weights[{str(key)!r}]: {share!r} is not a number")
    if not math.isfinite(share) or not 0.0 <= share <= 1.0:
        raise BadSplit(f"weights[{str(key)!r}]: {share!r} is not a share in [0, 1]")
    return float(share)


def _names(weights: Mapping[int, float]) -> str:
    return ", ".join(str(v) for v in sorted(weights))


def point(caller: str) -> float:
    """Where ``caller`` sits in [0, 1): the first 8 bytes of its sha256, as a fraction."""
    digest = hashlib.sha256(caller.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose(
    split: TrafficSplit | Mapping[int, float], caller: str | None, rng: random.Random | None = None
) -> int:
    """The version a new request runs under: sticky per ``caller``, random without one.
    ``split``: a validated split, or its weights (the gateway keeps those per request)."""
    u = point(caller) if caller is not None else (rng or random).random()
    weights = sorted((split.weights if isinstance(split, TrafficSplit) else split).items())
    # Shares sum to 1 within SUM_TOLERANCE; scaling u by the true sum keeps the last interval
    # from being a hair short (or long).
    bound = u * math.fsum(w for _, w in weights)
    cumulative = 0.0
    for version, share in weights:
        cumulative += share
        if bound < cumulative:
            return version
    return weights[-1][0]


def caller_key(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The caller key of a request: header ``X-Router-Caller``, else the OpenAI ``user`` field
    when it is a non-empty string, else None (the request is placed at random)."""
    wanted = CALLER_HEADER.lower()
    for name, value in headers.items():
        if name.lower() == wanted:
            if not value:
                raise BadCaller(f"{CALLER_HEADER} is empty; send a caller id or leave it out")
            if len(value) > MAX_CALLER_CHARS:
                raise BadCaller(
                    f"{CALLER_HEADER} has {len(value)} characters; at most {MAX_CALLER_CHARS}"
                )
            return value
    user = body.get("user")
    return user if isinstance(user, str) and user else None
