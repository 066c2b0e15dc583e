"""Why a swap did not happen. Plain exceptions, one class per kind of failure, each instance with
a stable ``code`` (the machine-readable reason); the HTTP edge (``gateway/errors.py``) gives each
class its status code."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from roma_service.errors import ServiceError

# Redis being away (as opposed to Redis refusing something): swaps stop, serving goes on.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


class SwapError(ServiceError):
    """Nothing was swapped, or every engine is back where it was."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.code = code


class CannotSwap(SwapError):
    """Nothing to swap yet: the base routers are not known (``not_ready``) or no engine is
    reachable (``no_engine``)."""


class Busy(SwapError):
    """Retry shortly: another swap holds the deploy lock (``deploy_in_progress``), or in-flight
    requests did not finish within ``ROMA_DRAIN_TIMEOUT_S`` (``drain_timeout``)."""


class PatchRejected(SwapError):
    """Every engine refused the patch; the code is theirs (``fingerprint_mismatch``, ...)."""


class EngineFailed(SwapError):
    """An engine failed the new version (``engine_apply_failed``; the others were put back on
    the previous one) or a call the swap needs (``engine_unavailable``; nothing was swapped)."""


class NoFreeSlot(SwapError):
    """Every router slot of the engines that could take a version is pinned or has requests in
    flight (``no_free_slot``): retry when some finish, or free versions from traffic."""


class SlotsDisabled(SwapError):
    """The request needs resident router versions (a version other than the active one, a
    canary split) but this gateway runs one global version (``slots_disabled``)."""
