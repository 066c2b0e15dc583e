"""Dependencies shared by the route modules: the gateway's objects and the admin-token check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from roma_service.gateway.errors import APIError
from roma_service.gateway.state import Gateway

_bearer = HTTPBearer(auto_error=False, description="ROMA_ADMIN_TOKEN")


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Bearer ``ROMA_ADMIN_TOKEN``, compared in constant time (no timing oracle on the token)."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise APIError(
            401,
            "control routes need 'Authorization: Bearer <ROMA_ADMIN_TOKEN>'",
            "missing_token",
            headers=challenge,
        )
    expected = get_gateway(request).settings.admin_token_value() or ""
    if not expected or not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise APIError(401, "the admin token is not valid", "invalid_token", headers=challenge)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
AdminDep = Annotated[None, Depends(require_admin)]
