"""The registry: router versions in Redis (see :mod:`.keys` for the layout)."""

from roma_service.registry.errors import (
    ActiveVersion,
    BaseMismatch,
    RegistryError,
    RegistryNotReady,
    UnknownVersion,
    VersionInUse,
)
from roma_service.registry.local import LocalRedis
from roma_service.registry.records import (
    BaseRecord,
    HistoryEntry,
    TrafficHistoryEntry,
    TrafficRecord,
    VersionRecord,
)
from roma_service.registry.store import Registry

__all__ = [
    "ActiveVersion",
    "BaseMismatch",
    "BaseRecord",
    "HistoryEntry",
    "LocalRedis",
    "Registry",
    "RegistryError",
    "RegistryNotReady",
    "TrafficHistoryEntry",
    "TrafficRecord",
    "UnknownVersion",
    "VersionInUse",
    "VersionRecord",
]
