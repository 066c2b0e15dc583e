"""The Redis key layout of the registry: one namespace per served model.

``{p}`` is ``ROMA_REDIS_PREFIX`` (default roma), a colon, and the first 16 hex digits of the
served model's base-router fingerprint (``roma:3f2a9c0e5b7d1e48``), so one Redis holds several
models' versions side by side and a patch is never applied to another model's weights.

=======================  =======  ==============================================================
key                      type     holds
=======================  =======  ==============================================================
``{p}:base``             hash     version 0: model, fingerprint, specs (JSON), recorded_at
``{p}:version:next``     string   the version counter (INCR: strictly increasing, never reused)
``{p}:versions``         zset     every stored version number (score = version)
``{p}:version:{n}``      hash     version n: id, size, layers, meta (JSON), status, timestamps
``{p}:blob:{sha256}``    string   the patch file's bytes, content-addressed by sha256
``{p}:by-id:{sha256}``   string   the version holding that blob (same bytes -> same version)
``{p}:active``           string   the active version (absent = 0, the base routers)
``{p}:history``          stream   one entry per activation: version, previous, reason, by, at
``{p}:traffic``          string   the canary split in force, JSON {weights: {version: share},
                                  at, by, reason} (absent = all traffic to the active version)
``{p}:traffic:history``  stream   one entry per split change: weights, previous (JSON, null
                                  when none), reason, by, at
``{p}:events``           pub/sub  a JSON event on every change (stored, activated, deleted,
                                  traffic...)
``{p}:lock:deploy``      string   the deploy lock shared by every gateway (redis-py Lock)
``{p}:gateways``         zset     gateway id -> alive until (unix time), renewed each reconcile
=======================  =======  ==============================================================

Versions are allocated by a Lua script (atomic dedupe + INCR), so key names are built inside it:
the layout targets a single Redis (or a primary/replica pair), not Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "roma"

    @property
    def base(self) -> str:
        return f"{self.prefix}:base"

    @property
    def counter(self) -> str:
        return f"{self.prefix}:version:next"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:versions"

    def version(self, n: int) -> str:
        return f"{self.prefix}:version:{n}"

    def blob(self, sha256: str) -> str:
        return f"{self.prefix}:blob:{sha256}"

    def by_id(self, sha256: str) -> str:
        return f"{self.prefix}:by-id:{sha256}"

    @property
    def active(self) -> str:
        return f"{self.prefix}:active"

    @property
    def history(self) -> str:
        return f"{self.prefix}:history"

    @property
    def traffic(self) -> str:
        return f"{self.prefix}:traffic"

    @property
    def traffic_history(self) -> str:
        return f"{self.prefix}:traffic:history"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def deploy_lock(self) -> str:
        return f"{self.prefix}:lock:deploy"

    @property
    def gateways(self) -> str:
        return f"{self.prefix}:gateways"
