"""Upload a patch to a running gateway: ``POST {url}/routers`` (multipart field ``patch``).

The admin token comes from ``ROMA_ADMIN_TOKEN`` (``Authorization: Bearer ...``). Every failure
becomes a :class:`PushError` whose message says what went wrong and what to do; the gateway's
own OpenAI-style error message (``{"error": {"message", ...}}``) is quoted when there is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict


class PushSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROMA_")

    admin_token: str | None = None


class PushError(RuntimeError):
    """The upload failed; ``status`` is the HTTP status when the gateway answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = f" [{error['code']}]" if error.get("code") else ""
        return f"{error.get('message', '')}{code}"
    return str(body)[:500]


def push_patch(
    path: str | Path, url: str, token: str | None = None, timeout: float = 60.0
) -> dict[str, Any]:
    """POST the patch file; returns the gateway's JSON answer (e.g. the new router version)."""
    path = Path(path)
    token = token if token is not None else PushSettings().admin_token
    if not token:
        raise PushError("ROMA_ADMIN_TOKEN is not set: export the gateway's admin token first")
    endpoint = url.rstrip("/") + "/routers"
    try:
        with path.open("rb") as handle:
            response = httpx.post(
                endpoint,
                files={"patch": (path.name, handle, "application/octet-stream")},
                headers={"Authorization": f"Bearer {token}"},
                timeout=timeout,
            )
    except httpx.HTTPError as exc:
        raise PushError(
            f"could not reach the gateway at {endpoint}: {exc}. Is it running?"
        ) from exc
    if response.status_code == 401 or response.status_code == 403:
        raise PushError(
            f"the gateway refused the admin token ({response.status_code}): "
            f"{_server_message(response)}. Check ROMA_ADMIN_TOKEN.",
            response.status_code,
        )
    if response.status_code >= 400:
        raise PushError(
            f"the gateway rejected the patch ({response.status_code}): {_server_message(response)}",
            response.status_code,
        )
    try:
        return response.json()
    except ValueError:
        return {"status": response.status_code, "body": response.text}
