"""Router swaps, one job per module:

* ``target.py``: a version as the engines must hold it (patch + checksums); the read-back check.
* ``steps.py``: the swap's steps, each callable alone (drain, announce, apply, verify, reset
  caches, restore one engine, roll back).
* ``lock.py``: the deploy lock (this gateway's, then the one every gateway shares in Redis).
* ``context.py``: what the deployer and the reconciler share (engines, Redis, lock, settings).
* ``deployer.py``: ``POST /routers`` and ``/routers/{v}/activate`` (lock, store, swap, activate).
* ``reconcile.py``: lagging or restarted engines onto the active version before they serve.
* ``canary.py``: the traffic split between versions (set, promote, abort), over the engines'
  ``Residency`` (which versions their slots hold and pin).
* ``errors.py``: why a swap did not happen, each with a stable code (their HTTP statuses are
  the HTTP edge's, ``gateway/errors.py``).
"""

from roma_service.gateway.swaps.context import SwapContext
from roma_service.gateway.swaps.deployer import Deployer, SwapResult
from roma_service.gateway.swaps.errors import REDIS_DOWN, SwapError
from roma_service.gateway.swaps.lock import DeployLock
from roma_service.gateway.swaps.reconcile import Reconciler

__all__ = [
    "REDIS_DOWN",
    "DeployLock",
    "Deployer",
    "Reconciler",
    "SwapContext",
    "SwapError",
    "SwapResult",
]
