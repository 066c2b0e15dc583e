"""The registry: router versions in Redis, the single source of truth shared by every gateway.

Every write that must be atomic (dedupe + version allocation, activation + history + event,
delete unless active or in the traffic split, the split + its history + event) is one Lua
script, so two gateways racing on one Redis can never produce two versions for the same bytes,
a reused version number, a deleted active version or a split naming a deleted one. The key
layout is documented in :mod:`roma_service.registry.keys`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.lock import Lock

from roma_patch import BaseRouters, Patch
from roma_service.registry.errors import (
    ActiveVersion,
    BaseMismatch,
    RegistryNotReady,
    UnknownVersion,
    VersionInUse,
)
from roma_service.registry.keys import Keys
from roma_service.registry.records import (
    BaseRecord,
    HistoryEntry,
    TrafficHistoryEntry,
    TrafficRecord,
    VersionRecord,
)

HISTORY_MAXLEN = 10_000

# -> {created (1|0), version}. Same bytes (same sha256) return the version that already has them.
_STORE = """
local p = ARGV[1]
local existing = redis.call('GET', p .. ':by-id:' .. ARGV[2])
if existing then return {0, tonumber(existing)} end
local v = redis.call('INCR', p .. ':version:next')
redis.call('SET', p .. ':blob:' .. ARGV[2], ARGV[3])
redis.call('SET', p .. ':by-id:' .. ARGV[2], v)
redis.call('HSET', p .. ':version:' .. v, 'version', v, 'id', ARGV[2], 'size', ARGV[4],
  'layers', ARGV[5], 'base_fingerprint', ARGV[6], 'objective', ARGV[7], 'meta', ARGV[8],
  'created_at', ARGV[9], 'status', 'staged')
redis.call('ZADD', p .. ':versions', v, v)
redis.call('PUBLISH', p .. ':events', cjson.encode({type = 'stored', version = v, id = ARGV[2]}))
return {1, v}
"""

# -> the previous active version, or -1 when the version does not exist.
_ACTIVATE = """
local p, v = ARGV[1], ARGV[2]
if v ~= '0' and redis.call('EXISTS', p .. ':version:' .. v) == 0 then return -1 end
local prev = redis.call('GET', p .. ':active') or '0'
redis.call('SET', p .. ':active', v)
if v ~= '0' then
  redis.call('HSET', p .. ':version:' .. v, 'status', 'deployed', 'activated_at', ARGV[5])
end
redis.call('XADD', p .. ':history', 'MAXLEN', '~', ARGV[6], '*', 'version', v,
  'previous', prev, 'reason', ARGV[3], 'by', ARGV[4], 'at', ARGV[5])
redis.call('PUBLISH', p .. ':events', cjson.encode({type = 'activated', version = tonumber(v),
  previous = tonumber(prev), by = ARGV[4], engines = cjson.decode(ARGV[7])}))
return tonumber(prev)
"""

# -> {1, ''} deleted, {0, ''} unknown, {-1, ''} active, {-2, split JSON} named by the split.
_DELETE = """
local p, v = ARGV[1], ARGV[2]
if (redis.call('GET', p .. ':active') or '0') == v then return {-1, ''} end
local id = redis.call('HGET', p .. ':version:' .. v, 'id')
if not id then return {0, ''} end
local traffic = redis.call('GET', p .. ':traffic')
if traffic and cjson.decode(traffic).weights[v] ~= nil then return {-2, traffic} end
redis.call('DEL', p .. ':version:' .. v, p .. ':blob:' .. id)
if redis.call('GET', p .. ':by-id:' .. id) == v then redis.call('DEL', p .. ':by-id:' .. id) end
redis.call('ZREM', p .. ':versions', v)
redis.call('PUBLISH', p .. ':events', cjson.encode({type = ARGV[3], version = tonumber(v)}))
return {1, ''}
"""

# Set (ARGV[2] = the record's JSON) or clear (ARGV[2] = '') the traffic split, append to its
# history and publish, atomically. ARGV[3]: the split's versions as a JSON array of strings,
# each checked to exist (0 always does); ARGV[4]: the new weights' JSON ('null' when clearing);
# ARGV[8]: the event's JSON. -> {1, previous record JSON or ''}, {0, the missing version}, or
# {2, ''} when there was nothing to clear (nothing recorded).
_TRAFFIC = """
local p = ARGV[1]
local key = p .. ':traffic'
if ARGV[2] ~= '' then
  for _, v in ipairs(cjson.decode(ARGV[3])) do
    if v ~= '0' and redis.call('EXISTS', p .. ':version:' .. v) == 0 then return {0, v} end
  end
end
local prev = redis.call('GET', key)
if ARGV[2] == '' then
  if not prev then return {2, ''} end
  redis.call('DEL', key)
else
  redis.call('SET', key, ARGV[2])
end
local previous = 'null'
if prev then
  -- The record is written as {"weights":{...},...}: copy its weights verbatim (re-encoding
  -- with cjson would round shares to 14 digits).
  previous = string.match(prev, '^{"weights":(%b{})') or cjson.encode(cjson.decode(prev).weights)
end
redis.call('XADD', p .. ':traffic:history', 'MAXLEN', '~', ARGV[9], '*', 'weights', ARGV[4],
  'previous', previous, 'reason', ARGV[5], 'by', ARGV[6], 'at', ARGV[7])
redis.call('PUBLISH', p .. ':events', ARGV[8])
return {1, prev or ''}
"""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _split(weights: dict[int, float]) -> str:
    return "{" + ", ".join(f"{v}: {w:g}" for v, w in sorted(weights.items())) + "}"


class Registry:
    """Router versions, blobs, the active pointer, history and change events in one Redis."""

    def __init__(self, redis: Redis, prefix: str = "roma") -> None:
        self.redis = redis
        self.prefix = prefix
        self._keys: Keys | None = None  # the served model's namespace, set by record_base
        self._fingerprint = ""  # the served model's (all base routers), set by record_base
        self._store = redis.register_script(_STORE)
        self._activate = redis.register_script(_ACTIVATE)
        self._delete = redis.register_script(_DELETE)
        self._traffic = redis.register_script(_TRAFFIC)

    @classmethod
    def from_url(cls, url: str, prefix: str = "roma", timeout_s: float = 5.0) -> Registry:
        """A registry whose every call fails fast (``timeout_s``) when Redis is away, so that
        control routes answer 503 quickly instead of hanging."""
        redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )
        return cls(redis, prefix)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    @property
    def keys(self) -> Keys:
        if self._keys is None:
            raise RegistryNotReady(
                "the router registry is not open yet: no engine has reported the served "
                "model's base routers"
            )
        return self._keys

    # --- version 0 -----------------------------------------------------------------------------
    async def record_base(self, base: BaseRouters) -> BaseRecord:
        """Open the served model's namespace (``{prefix}:{fingerprint[:16]}``) and record its
        base routers there as version 0, or check they match the record.

        Versions are only valid for the base routers they were made for, so each model keeps
        its own versions, active pointer and history: gateways serving different models can
        share one Redis (and one prefix) without ever applying a patch to the wrong weights."""
        fingerprint = base.fingerprint()
        keys = Keys(f"{self.prefix}:{fingerprint[:16]}")
        record = BaseRecord(
            model=base.model,
            fingerprint=fingerprint,
            specs=base.to_json()["specs"],
            recorded_at=_now(),
        )
        created = await self.redis.hsetnx(keys.base, "record", record.model_dump_json())
        existing = record if created else await self._read_base(keys)
        if existing is None or existing.fingerprint != fingerprint:
            found = "nothing readable" if existing is None else repr(existing.model)
            raise BaseMismatch(
                f"Redis namespace {keys.prefix!r} holds router versions for {found}, not for "
                f"{base.model!r} (fingerprint {fingerprint[:16]}...). Set ROMA_REDIS_PREFIX to "
                "another namespace for this model."
            )
        self._keys, self._fingerprint = keys, fingerprint
        return existing

    async def _read_base(self, keys: Keys) -> BaseRecord | None:
        raw = await self.redis.hget(keys.base, "record")
        return BaseRecord.model_validate_json(raw) if raw else None

    async def base(self) -> BaseRecord | None:
        return await self._read_base(self.keys)

    # --- versions ------------------------------------------------------------------------------
    async def store(self, patch: Patch, data: bytes) -> tuple[VersionRecord, bool]:
        """Store a validated patch under the next version. Returns (record, created); the same
        bytes again return the version that already holds them with ``created=False``."""
        meta = patch.meta.model_dump()
        created, version = await self._store(
            args=[
                self.keys.prefix,
                patch.id,
                data,
                patch.size,
                json.dumps(patch.layers),
                patch.meta.base_fingerprint,
                patch.meta.objective,
                json.dumps(meta, sort_keys=True),
                _now(),
            ]
        )
        return await self.get(int(version)), bool(created)

    async def get(self, version: int) -> VersionRecord:
        if version == 0:
            return await self._base_version()
        raw = await self.redis.hgetall(self.keys.version(version))
        if not raw:
            raise UnknownVersion(f"router version {version} does not exist", "version")
        return VersionRecord.from_hash(raw, self._fingerprint)

    async def list(self) -> list[VersionRecord]:
        """Version 0 first, then every stored version in increasing order."""
        numbers = [int(v) for v in await self.redis.zrange(self.keys.versions, 0, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in numbers:
                pipe.hgetall(self.keys.version(n))
            rows = await pipe.execute()
        base = await self._base_version()
        return [base] + [VersionRecord.from_hash(r, self._fingerprint) for r in rows if r]

    async def blob(self, version: int) -> bytes | None:
        """The patch bytes of ``version``; None for version 0 (the base routers)."""
        if version == 0:
            return None
        record = await self.get(version)
        data = await self.redis.get(self.keys.blob(record.id or ""))
        if data is None:
            raise UnknownVersion(f"router version {version} has no stored patch", "version")
        return bytes(data)

    async def active(self) -> int:
        raw = await self.redis.get(self.keys.active)
        return int(raw) if raw is not None else 0

    async def activate(
        self, version: int, reason: str, by: str, engines: list[str] | None = None
    ) -> int:
        """Move the active pointer, append to the history and publish, atomically. ``engines``
        (the URLs that verifiably hold ``version`` now) travel in the event, so that other
        gateways sharing those engines learn at once that they changed. Returns the previously
        active version."""
        previous = await self._activate(
            args=[
                self.keys.prefix,
                version,
                reason,
                by,
                _now(),
                HISTORY_MAXLEN,
                json.dumps(engines or []),
            ]
        )
        if int(previous) < 0:
            raise UnknownVersion(f"router version {version} does not exist", "version")
        return int(previous)

    async def delete(self, version: int, event: str = "deleted") -> None:
        """Remove an inactive version and its blob. ``event`` names the published change
        (``discarded`` when a deploy failed before activation)."""
        if version == 0:
            raise ActiveVersion("version 0 is the base routers and cannot be deleted", "version")
        status, split = await self._delete(args=[self.keys.prefix, version, event])
        if int(status) == 0:
            raise UnknownVersion(f"router version {version} does not exist", "version")
        if int(status) == -1:
            raise ActiveVersion(
                f"router version {version} is active; activate another version first", "version"
            )
        if int(status) == -2:
            weights = TrafficRecord.model_validate_json(split).weights
            raise VersionInUse(
                f"router version {version} takes part in the traffic split {_split(weights)}; "
                "change the split (PUT /routers/traffic) or abort it "
                "(POST /routers/traffic/abort) first",
                "version",
            )

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        """The last ``limit`` activations, oldest first."""
        rows = await self.redis.xrevrange(self.keys.history, count=limit)
        out = []
        for entry_id, fields in reversed(rows):
            data = {k.decode(): v.decode() for k, v in fields.items()}
            out.append(
                HistoryEntry(
                    id=entry_id.decode(),
                    version=int(data["version"]),
                    previous=int(data["previous"]),
                    reason=data["reason"],
                    by=data["by"],
                    at=data["at"],
                )
            )
        return out

    # --- the canary traffic split ---------------------------------------------------------------
    async def traffic(self) -> TrafficRecord | None:
        """The split in force; None when there is none (all traffic to the active version)."""
        raw = await self.redis.get(self.keys.traffic)
        return TrafficRecord.model_validate_json(raw) if raw is not None else None

    async def set_traffic(
        self, weights: dict[int, float], reason: str, by: str
    ) -> TrafficRecord | None:
        """Put a split in force (validated by the caller: ``gateway.traffic.validate_split``),
        record it in the history and publish it, atomically. :class:`UnknownVersion` (nothing
        stored) if a version it names does not exist. Returns the split it replaced."""
        if not weights:
            raise ValueError("a traffic split names at least one version")
        status, value = await self._write_traffic(weights, reason, by)
        if status == 0:
            raise UnknownVersion(
                f"router version {value} does not exist; the traffic split is unchanged",
                "weights",
            )
        return TrafficRecord.model_validate_json(value) if value else None

    async def clear_traffic(self, reason: str, by: str) -> TrafficRecord | None:
        """End the split (all traffic back to the active version), recorded and published like
        a change. Returns the split that was in force; None when there was none (and nothing is
        recorded)."""
        status, value = await self._write_traffic(None, reason, by)
        return TrafficRecord.model_validate_json(value) if status == 1 and value else None

    async def _write_traffic(
        self, weights: dict[int, float] | None, reason: str, by: str
    ) -> tuple[int, str]:
        at = _now()
        named = None if weights is None else {str(v): w for v, w in sorted(weights.items())}
        record = (
            ""
            if weights is None
            else TrafficRecord(weights=weights, at=at, by=by, reason=reason).model_dump_json()
        )
        status, value = await self._traffic(
            args=[
                self.keys.prefix,
                record,
                json.dumps(list(named or {})),
                json.dumps(named),
                reason,
                by,
                at,
                json.dumps({"type": "traffic", "weights": named, "by": by}),
                HISTORY_MAXLEN,
            ]
        )
        return int(status), value.decode() if isinstance(value, bytes) else str(value)

    async def traffic_history(self, limit: int = 100) -> list[TrafficHistoryEntry]:
        """The last ``limit`` changes of the split, oldest first."""
        rows = await self.redis.xrevrange(self.keys.traffic_history, count=limit)
        out = []
        for entry_id, fields in reversed(rows):
            data = {k.decode(): v.decode() for k, v in fields.items()}
            out.append(
                TrafficHistoryEntry(
                    id=entry_id.decode(),
                    weights=json.loads(data["weights"]),
                    previous=json.loads(data["previous"]),
                    reason=data["reason"],
                    by=data["by"],
                    at=data["at"],
                )
            )
        return out

    # --- coordination --------------------------------------------------------------------------
    async def heartbeat(self, gateway_id: str, valid_s: float) -> None:
        """Say that ``gateway_id`` is alive for the next ``valid_s`` seconds (see :meth:`peers`).
        Each gateway states its own validity, so gateways may reconcile at different rates."""
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.gateways, {gateway_id: now + valid_s})
            pipe.zremrangebyscore(self.keys.gateways, 0, now - 3600)
            await pipe.execute()

    async def peers(self, gateway_id: str) -> list[str]:
        """Other gateways alive now. With none, nobody else can be sending traffic to the
        engines, so a drain need not pause them."""
        alive = await self.redis.zrangebyscore(self.keys.gateways, time.time(), "+inf")
        return [g.decode() for g in alive if g.decode() != gateway_id]

    def deploy_lock(self, lease_s: float, wait_s: float) -> Lock:
        """The lock every gateway takes around a swap. The lease expires on its own if the
        holder dies, so a crashed gateway cannot block deploys forever."""
        return self.redis.lock(
            self.keys.deploy_lock, timeout=lease_s, blocking_timeout=wait_s, thread_local=False
        )

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Change events as they are published (stops with an exception when Redis goes)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.keys.events)
        try:
            while True:
                # A bounded wait: an unbounded one would trip the client's socket timeout.
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message["type"] == "message":
                    yield json.loads(message["data"])
        finally:
            await pubsub.aclose()

    async def publish(self, event: dict[str, Any]) -> None:
        await self.redis.publish(self.keys.events, json.dumps(event))

    async def _base_version(self) -> VersionRecord:
        base = await self.base()
        if base is None:
            raise UnknownVersion("version 0 is not recorded yet (no engine has started)", "version")
        return VersionRecord(
            version=0,
            model_fingerprint=base.fingerprint,
            meta={"model": base.model},
            created_at=base.recorded_at,
            status="base",
        )
