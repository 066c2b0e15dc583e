"""Structured JSON logs: one object per line, each carrying the router version it is about.

The version comes from a context variable: a request sets the version that serves it, and
anything logged outside a request carries the gateway's active version. So ``grep`` on a version
finds every line about it, across deploys, swaps and completions.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The version serving the current request (set by the completions proxy) ...
request_version: ContextVar[int | None] = ContextVar("request_version", default=None)
# ... and, for every other line, the active version as this gateway knows it.
_active_version: list[int | None] = [None]

# Record attributes that are not "extra" fields (plus uvicorn's ANSI-coloured duplicate).
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def set_active_version(version: int | None) -> None:
    _active_version[0] = version


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "router_version", ...extra}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        version = request_version.get()
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "router_version": version if version is not None else _active_version[0],
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Route the root logger (and uvicorn's) to stderr, as JSON lines unless told otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # One line per proxied request is logged by the gateway itself, with its version.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
