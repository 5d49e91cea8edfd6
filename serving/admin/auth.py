"""Who calls the admin API and whether their role may: a bearer user token, checked
against :data:`serving.tenancy.PERMISSIONS` by the gateway, for the action each route
names (serving.admin.routing)."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes

from serving.admin.errors import DirectoryUnavailable, Unauthenticated
from serving.admin.services import services_of
from serving.tenancy import Principal, check

bearer = HTTPBearer(
    auto_error=False, description="A user's token (gpugate users create prints it once)."
)


def authorize(
    scopes: SecurityScopes,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    """Authenticate the bearer token and check its user may do the route's action."""
    if not request.headers.get("authorization"):
        raise Unauthenticated("missing token: send 'Authorization: Bearer <user token>'")
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token:
        raise Unauthenticated("malformed Authorization: expected 'Bearer <user token>'")
    try:
        principal = services_of(request).directory.lookup(token)
    except sa.exc.SQLAlchemyError:
        raise DirectoryUnavailable("cannot authenticate now: user directory unavailable") from None
    if principal is None:
        raise Unauthenticated("unknown user token")
    for action in scopes.scopes:
        check(principal, action)
    request.state.principal = principal


def _caller(request: Request) -> Principal:
    # Set by ``authorize``, which FastAPI solves first: it is the route's own dependency.
    principal: Principal = request.state.principal
    return principal


Caller = Annotated[Principal, Depends(_caller)]
