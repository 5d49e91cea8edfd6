"""Who calls the admin API and whether their role may: a bearer user token, checked
against :data:`serving.tenancy.PERMISSIONS` by the gateway, for the action each route
names (serving.admin.routing)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from fastapi.security.utils import get_authorization_scheme_param

from serving.admin.errors import DirectoryUnavailable, Unauthenticated
from serving.admin.services import services_of
from serving.tenancy import Principal, check

bearer = HTTPBearer(
    auto_error=False, description="A user's token (gpugate users create prints it once)."
)


def admit(request: Request, actions: Sequence[str]) -> Principal:
    """The user whose bearer token ``request`` carries, if their role may do every one of
    ``actions``; raises Unauthenticated, Forbidden or DirectoryUnavailable. Reads the
    ``Authorization`` header only, never the body. Blocking (a database lookup)."""
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated("missing token: send 'Authorization: Bearer <user token>'")
    scheme, token = get_authorization_scheme_param(header)
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("malformed Authorization: expected 'Bearer <user token>'")
    try:
        principal = services_of(request).directory.lookup(token)
    except sa.exc.SQLAlchemyError:
        raise DirectoryUnavailable("cannot authenticate now: user directory unavailable") from None
    if principal is None:
        raise Unauthenticated("unknown user token")
    for action in actions:
        check(principal, action)
    return principal


def authorize(
    scopes: SecurityScopes,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    """Admit the caller for the route's action (its security scope), unless the route
    (serving.admin.routing.AdminRoute) already did before reading the request. As a
    dependency it also puts the bearer scheme and the action in the OpenAPI description
    (``credentials`` is declared for that)."""
    if getattr(request.state, "principal", None) is None:
        request.state.principal = admit(request, scopes.scopes)


def _caller(request: Request) -> Principal:
    # Set by ``admit`` before the endpoint's other dependencies are solved.
    principal: Principal = request.state.principal
    return principal


Caller = Annotated[Principal, Depends(_caller)]
