"""Whether the active router version fits the served model, and what to say when it does not.

A registry can hold an active version that no engine can take: a patch stored for another
model (a Redis shared by mistake, or written by an older layout), or one an engine refuses.
Retrying it would never succeed, so the reconciler asks this tracker first: the version is
checked once against the served base routers (the same validation as a deploy), the cause is
logged once, ``/ready`` and completions answer with it, ``roma_active_version_unfit`` is 1, and
nothing is applied until another version is activated (version 0 always can be).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from roma_patch import BaseRouters, Patch, PatchError, read_patch, validate_patch
from roma_service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unfit:
    version: int
    cause: str

    def reason(self) -> str:
        return (
            f"the active router version {self.version} cannot be applied to the served model: "
            f"{self.cause}. Activate another version (POST /routers/0/activate restores the "
            "base routers)."
        )


class ActiveFit:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.unfit: Unfit | None = None

    def read(
        self, version: int, data: bytes | None, base: BaseRouters, max_bytes: int
    ) -> Patch | None:
        """The patch of ``version`` (None for the base routers) after checking that it fits
        ``base``; when it does not, the version is recorded as unfit and None is returned."""
        if data is None:
            return None
        try:
            patch = read_patch(data, max_bytes=max_bytes)
            validate_patch(patch, base)
        except PatchError as exc:
            self.refused(version, exc.message)
            return None
        return patch

    def refused(self, version: int, cause: str) -> None:
        """Record that ``version`` cannot be applied (logged once per version and cause)."""
        unfit = Unfit(version, cause)
        if unfit != self.unfit:
            log.error("active router version cannot be applied", extra={
                "version": version, "cause": cause})  # fmt: skip
        self.unfit = unfit
        self.metrics.active_version_unfit.set(1)

    def blocks(self, version: int) -> bool:
        """Whether applying ``version`` is known to fail (do not retry it)."""
        return self.unfit is not None and self.unfit.version == version

    def active_is(self, version: int) -> None:
        """Another version became active: what was recorded about the old one no longer holds."""
        if self.unfit is not None and self.unfit.version != version:
            self.unfit = None
            self.metrics.active_version_unfit.set(0)

    def reason(self) -> str | None:
        return self.unfit.reason() if self.unfit is not None else None
