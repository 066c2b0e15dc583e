"""Why a swap did not happen. Plain exceptions with a stable ``code`` (the machine-readable
reason); the HTTP edge (``gateway/errors.py``) gives each its status code."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Redis being away (as opposed to Redis refusing something): swaps stop, serving goes on.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


class SwapError(Exception):
    """Base class: nothing was swapped, or every engine is back where it was."""

    code: str

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotReady(SwapError):
    """The gateway has not learnt the base routers from an engine yet."""

    code = "not_ready"


class NoReachableEngine(SwapError):
    """No reachable engine to swap."""

    code = "no_engine"


class DeployInProgress(SwapError):
    """Another deploy (in this gateway or another one) holds the deploy lock."""

    code = "deploy_in_progress"


class DrainTimeout(SwapError):
    """In-flight requests did not finish within ``ROMA_DRAIN_TIMEOUT_S``."""

    code = "drain_timeout"


class EngineUnavailable(SwapError):
    """An engine failed a call the swap needs (pause, prefix-cache reset)."""

    code = "engine_unavailable"


class PatchRejected(SwapError):
    """Every engine refused the patch; ``code`` is the engines' reason (``fingerprint_mismatch``,
    ``shape_mismatch``...)."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.code = code


class ApplyFailed(SwapError):
    """The version failed on some engine(s); the others were put back on the previous one."""

    code = "engine_apply_failed"
