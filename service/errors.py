"""The base of the service's own errors: a stable machine-readable ``code``, a message that says
what went wrong, and the offending parameter when there is one. Raised by domain code (registry,
swaps); only the gateway's HTTP edge (``gateway/errors.py``) gives them status codes."""

from __future__ import annotations


class ServiceError(Exception):
    code: str  # set by each subclass

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
