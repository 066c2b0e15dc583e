"""The canary split's arithmetic (pure): validation, shares, stickiness, minimal movement."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from pydantic import ValidationError

from roma_service.gateway.traffic import (
    BadCaller,
    BadSplit,
    TrafficSplit,
    caller_key,
    choose,
    point,
    validate_split,
)

CALLERS = [f"caller-{i}" for i in range(2000)]


def _within_binomial(counts: Counter[int], weights: dict[int, float], n: int) -> None:
    """Each version's count is within 4 standard deviations of n * share."""
    assert set(counts) <= set(weights)
    for version, share in weights.items():
        sd = math.sqrt(n * share * (1 - share))
        assert abs(counts[version] - n * share) <= 4 * sd, (version, counts, weights)


@pytest.mark.parametrize(
    "weights",
    [{3: 0.9, 4: 0.1}, {0: 0.5, 2: 0.3, 7: 0.2}, {1: 0.34, 2: 0.33, 3: 0.33}],
)
def test_shares_hold_for_callers_and_for_anonymous_requests(weights: dict[int, float]) -> None:
    split = validate_split({str(v): w for v, w in weights.items()}, max_versions=4)
    assert split.weights == weights
    _within_binomial(Counter(choose(split, c) for c in CALLERS), weights, len(CALLERS))
    rng = random.Random(7)
    _within_binomial(Counter(choose(split, None, rng) for _ in range(2000)), weights, 2000)


def test_a_caller_always_gets_the_same_version() -> None:
    split = validate_split({"3": 0.5, "4": 0.5})
    for caller in CALLERS[:200]:
        assert len({choose(split, caller, random.Random(s)) for s in range(5)}) == 1
    # The point is sha256-based, not Python's salted hash(): fixed across processes.
    assert (
        point("alice")
        == int.from_bytes(
            bytes.fromhex("2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90")[:8],
            "big",
        )
        / 2**64
    )
    assert 0.0 <= point("") < 1.0


def test_moving_weight_moves_only_callers_towards_the_gainer() -> None:
    before = validate_split({"3": 0.9, "4": 0.1})
    after = validate_split({"3": 0.8, "4": 0.2})
    moves = Counter((choose(before, c), choose(after, c)) for c in CALLERS)
    assert moves[(4, 3)] == 0
    assert moves[(3, 4)] > 0  # about 10 % of the callers
    _within_binomial(Counter({1: moves[(3, 4)]}), {1: 0.1}, len(CALLERS))
    # A caller on 4 before is on 4 after.
    assert all(choose(after, c) == 4 for c in CALLERS if choose(before, c) == 4)


def test_a_single_version_takes_everything_and_zero_shares_are_dropped() -> None:
    split = validate_split({"5": 1.0, "6": 0.0})
    assert split.weights == {5: 1.0} and split.versions == {5}
    assert {choose(split, c) for c in CALLERS[:100]} == {5}
    # Shares summing to 1 only within the tolerance still cover [0, 1).
    short = validate_split({"1": 0.5, "2": 0.4999999})
    assert choose(short, None, _Fixed(0.9999999999)) == 2


class _Fixed(random.Random):
    def __init__(self, u: float) -> None:
        super().__init__()
        self.u = u

    def random(self) -> float:
        return self.u


@pytest.mark.parametrize(
    ("raw", "fragment", "code"),
    [
        ([3, 4], "must be an object", "invalid_split"),
        ("3", "must be an object", "invalid_split"),
        (None, "must be an object", "invalid_split"),
        ({}, "at least one router version", "invalid_split"),
        ({"abc": 1.0}, "'abc' is not a router version", "invalid_split"),
        ({"-1": 1.0}, "'-1' is not a router version", "invalid_split"),
        ({"1.5": 1.0}, "'1.5' is not a router version", "invalid_split"),
        ({"３": 1.0}, "is not a router version", "invalid_split"),  # a full-width digit
        ({"3": 0.5, "03": 0.5}, "version 3 twice", "invalid_split"),
        ({"3": "0.9", "4": 0.1}, "weights['3']: '0.9' is not a number", "invalid_split"),
        ({"3": True}, "is not a number", "invalid_split"),
        ({"3": None}, "is not a number", "invalid_split"),
        ({"3": 1.5, "4": -0.5}, "weights['3']: 1.5 is not a share in [0, 1]", "invalid_split"),
        ({"3": -0.5, "4": 1.5}, "weights['3']: -0.5 is not a share", "invalid_split"),
        ({"3": math.nan}, "nan is not a share", "invalid_split"),
        ({"3": math.inf}, "inf is not a share", "invalid_split"),
        ({"3": 0.9, "4": 0.2}, "sum to 1 (within 1e-06); they sum to 1.1", "invalid_split"),
        ({"3": 0.0}, "they sum to 0", "invalid_split"),
        (
            {"1": 0.25, "2": 0.25, "3": 0.25, "4": 0.25},
            "names 4 versions (1, 2, 3, 4) but the engines hold at most 3",
            "too_many_versions",
        ),
    ],
)
def test_every_bad_split_is_refused_naming_the_problem(raw: object, fragment: str, code: str):
    with pytest.raises(BadSplit) as info:
        validate_split(raw, max_versions=3)
    assert fragment in info.value.message, info.value.message
    assert info.value.code == code and info.value.param == "weights"
    assert isinstance(info.value, ValueError)


def test_the_model_validates_too() -> None:
    assert TrafficSplit(weights={"3": 0.9, "4": 0.1}).weights == {3: 0.9, 4: 0.1}
    with pytest.raises(ValidationError, match="sum to 1"):
        TrafficSplit(weights={"3": 0.9})
    # Zero shares are dropped within the tolerance; a zero-count limit is not applied here.
    assert TrafficSplit(weights={3: 1.0, 4: 0.0}).versions == {3}


def test_caller_key_header_then_user_then_none() -> None:
    assert caller_key({"user": "u-1"}, {"x-router-caller": "team-a"}) == "team-a"
    assert caller_key({"user": "u-1"}, {"X-Router-Caller": "team-a"}) == "team-a"
    assert caller_key({"user": "u-1"}, {}) == "u-1"
    assert caller_key({"user": ""}, {}) is None
    assert caller_key({"user": 42}, {}) is None
    assert caller_key({}, {"authorization": "Bearer x"}) is None
    assert caller_key({}, {"x-router-caller": "c" * 256}) == "c" * 256
    with pytest.raises(BadCaller, match="is empty") as info:
        caller_key({"user": "u-1"}, {"x-router-caller": ""})
    assert info.value.param == "X-Router-Caller" and info.value.code == "invalid_caller"
    with pytest.raises(BadCaller, match="257 characters; at most 256"):
        caller_key({}, {"x-router-caller": "c" * 257})
