"""Registry failures the gateway maps to HTTP statuses (404, 409, 503...)."""

from __future__ import annotations

from roma_service.errors import ServiceError


class RegistryError(ServiceError):
    """Base class; ``code`` is the machine-readable reason put in the error body."""

    code = "registry_error"


class UnknownVersion(RegistryError):
    code = "unknown_version"


class ActiveVersion(RegistryError):
    code = "version_active"


class VersionInUse(RegistryError):
    """The version is named by the canary traffic split: change or abort the split first."""

    code = "version_in_use"


class BaseMismatch(RegistryError):
    """Redis already holds versions trained for other base routers: refuse to mix them."""

    code = "base_mismatch"


class RegistryNotReady(RegistryError):
    """The served model's namespace is not open yet (no engine has reported its base routers)."""

    code = "not_ready"
