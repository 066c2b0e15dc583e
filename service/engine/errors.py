"""Engine errors. The gateway maps them to HTTP: unreachable -> 503, rejected -> 400/422,
rpc failed / disagreement -> 502. ``status`` is the engine's HTTP status when there was one."""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """Anything that went wrong talking to the engine."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str = "engine_error",
        param: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.detail = detail or {}


class EngineUnreachable(EngineError):
    """No answer (connection refused, timeout): the engine is down or starting."""


class EngineRPCFailed(EngineError):
    """The engine answered with an error, or its workers failed or disagree."""


class EngineRejected(EngineError):
    """The engine refused a patch (format, names, shapes, dtype, fingerprint). Nothing changed."""


class EngineStartError(EngineError):
    """The engine process could not be started or never became healthy."""
