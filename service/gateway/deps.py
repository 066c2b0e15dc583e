"""Dependencies shared by the route modules: the gateway's objects and the admin-token check.

All ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
request for a few attribute reads."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from roma_service.gateway.errors import APIError
from roma_service.gateway.state import Gateway

_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="ROMA_ADMIN_TOKEN")
_api_key = HTTPBearer(auto_error=False, scheme_name="ApiKey", description="one of ROMA_API_KEYS")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def get_gateway(request: Request) -> Gateway:
    return _gateway(request)


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Bearer ``ROMA_ADMIN_TOKEN``, compared in constant time (no timing oracle on the token)."""
    if credentials is None:
        raise APIError(
            401,
            "control routes need 'Authorization: Bearer <ROMA_ADMIN_TOKEN>'",
            "missing_token",
            headers=_CHALLENGE,
        )
    expected = _gateway(request).settings.admin_token_value() or ""
    if not expected or not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise APIError(401, "the admin token is not valid", "invalid_token", headers=_CHALLENGE)


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_api_key)],
) -> None:
    """One of ``ROMA_API_KEYS`` as a bearer token (vLLM's ``--api-key`` convention); nothing
    when no key is set."""
    check_api_key(_gateway(request), credentials and credentials.credentials)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, as ``HTTPBearer`` reads it."""
    scheme, token = get_authorization_scheme_param(authorization)
    return token if authorization and scheme.lower() == "bearer" and token else None


def check_api_key(gateway: Gateway, token: str | None) -> None:
    """401 unless ``token`` is one of ``ROMA_API_KEYS`` (when any is set). Every key is
    compared, in constant time."""
    keys = gateway.settings.api_key_values()
    if not keys:
        return
    if token is None:
        raise APIError(
            401,
            "this gateway needs an API key: 'Authorization: Bearer <key>'",
            "missing_api_key",
            headers=_CHALLENGE,
        )
    given = token.encode()
    if not any([hmac.compare_digest(given, key.encode()) for key in keys]):
        raise APIError(401, "the API key is not valid", "invalid_api_key", headers=_CHALLENGE)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
AdminDep = Annotated[None, Depends(require_admin)]
ApiKeyDep = Depends(require_api_key)
