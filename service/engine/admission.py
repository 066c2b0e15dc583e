"""The API server's check that a request's router version is one the engine can serve now.

The engine binds a request to its version's slot only at the request's first step, in the
worker (``slots.py``), where nothing can be answered to the client any more: a version that is
not resident there runs on slot 0 (the base routers) and is only counted as a miss. So the
check is made earlier, in vLLM's API server process, before the request enters the engine:
start the server with ``--middleware roma_service.engine.admission.VersionAdmission``, and a
request whose ``vllm_xargs.roma_version`` names a version that is neither resident nor
redirected is refused with 409 ``version_not_resident`` (an OpenAI error body). The gateway
then refreshes its view of the engine and loads the version again.

The workers and the API server are different processes: worker 0 publishes the versions it
can serve to a small JSON file (``ROMA_SLOT_STATE_FILE``, written atomically after every load,
free and slot-0 swap, before the RPC that changed it returns); the middleware reads it again
only when it changed (one ``stat`` per request). A version that leaves after this check and
before the request's first step is still a miss: leases and pins are what prevent that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from roma_service.engine.binding import VERSION_XARG

NOT_RESIDENT = "version_not_resident"


class AdmissionSettings(BaseSettings):
    """Read by the workers (who write the file) and the API server (who reads it)."""

    model_config = SettingsConfigDict(env_prefix="ROMA_", extra="ignore")

    slot_state_file: Path | None = Field(
        None,
        description="Where worker 0 publishes the router versions it can serve, for the API "
        "server's admission check; EngineProcess sets one per engine. Unset: no check",
    )


def publish(path: Path, servable: list[str]) -> None:
    """Write ``servable`` atomically (the API server may read the file at any moment)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"servable": servable}))
    os.replace(tmp, path)


def named_version(body: bytes) -> str | None:
    """The router version a JSON request body names in ``vllm_xargs`` (None: none, or not a
    JSON object: vLLM answers those itself)."""
    if VERSION_XARG.encode() not in body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    xargs = payload.get("vllm_xargs") if isinstance(payload, dict) else None
    if not isinstance(xargs, dict) or xargs.get(VERSION_XARG) is None:
        return None
    return str(xargs[VERSION_XARG])


class VersionAdmission:
    """Pure ASGI middleware (it must not buffer responses: streams pass through untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.path = AdmissionSettings().slot_state_file
        self._seen: tuple[int, int, int] | None = None
        self._servable: frozenset[str] = frozenset()

    def servable(self) -> frozenset[str] | None:
        """What worker 0 last published (None: nothing yet, e.g. slots are off)."""
        assert self.path is not None
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # replaced whole: a new inode
        if key != self._seen:
            self._servable = frozenset(json.loads(self.path.read_text())["servable"])
            self._seen = key
        return self._servable

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.path is None or scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone; nothing to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        version = named_version(body)
        servable = None if version is None else self.servable()
        if servable is not None and version not in servable:
            await _refuse(send, version, sorted(servable))  # type: ignore[arg-type]
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # later messages: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _refuse(send: Any, version: str, servable: list[str]) -> None:
    message = (
        f"router version {version} is not resident in this engine (it serves {servable}): it "
        "was freed or evicted after the request was routed here. Load it again (load_slot) and "
        "resend; a gateway does this by itself"
    )
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": f"vllm_xargs.{VERSION_XARG}",
                "code": NOT_RESIDENT,
            }
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 409, "headers": headers})
    await send({"type": "http.response.body", "body": body})
