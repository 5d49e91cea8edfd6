"""The admin HTTP API under ``/admin/``: bearer user tokens, role checks, OpenAPI.

The router knows nothing about users, models or audit records. ``serving``
supplies an :class:`AdminBackend` (who a token belongs to, whether a role may do
an action) and the routes themselves, each an :class:`AdminRoute` naming the
action it needs. Adding an endpoint is one ``AdminRoute`` plus, if the action is
new, one line in the role table on the serving side.

Every error leaves as ``{"error": ...}`` with its status: 401 without a valid
token, 403 when the role lacks the action.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router._exceptions import (
    GatewayError,
    InvalidArgument,
    PayloadTooLarge,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

ADMIN_PREFIX = "/admin"
MAX_ADMIN_BODY = 64 * 1024


class Conflict(GatewayError):
    """The target exists already or is in a state that forbids the action."""

    http_status = 409


@dataclass(frozen=True)
class Principal:
    """An authenticated user of the admin API or CLI."""

    name: str
    role: str


class AdminBackend(Protocol):
    async def authenticate(self, token: str) -> Principal | None:
        """The user a bearer token belongs to, or None."""
        ...

    def permits(self, principal: Principal, action: str) -> bool: ...

    def roles_for(self, action: str) -> Sequence[str]:
        """The roles that may do ``action`` (for the API description)."""
        ...


@dataclass(frozen=True)
class AdminRequest:
    principal: Principal
    path_params: Mapping[str, str]
    query: Mapping[str, str]
    body: dict[str, Any]


Handler = Callable[[AdminRequest], Awaitable[Any]]


@dataclass(frozen=True)
class AdminRoute:
    """One endpoint: ``path`` is relative to ``/admin``; the handler returns JSON data."""

    method: str
    path: str
    action: str
    summary: str
    handler: Handler
    status: int = 200
    # JSON Schema of the request body, for the OpenAPI description; None = no body.
    body: dict[str, Any] | None = None
    query: Mapping[str, str] = field(default_factory=dict)  # name -> description


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


def _error(exc: GatewayError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    return Response(
        orjson.dumps({"error": exc.message}),
        exc.http_status,
        media_type="application/json",
        headers=headers,
    )


async def require(backend: AdminBackend, authorization: str | None, action: str) -> Principal:
    """Authenticate a bearer token and check its role may do ``action``."""
    if not authorization:
        raise Unauthenticated("missing token: send 'Authorization: Bearer <user token>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed Authorization: expected 'Bearer <user token>'")
    try:
        principal = await backend.authenticate(token.strip())
    except Exception:
        raise Unavailable("cannot authenticate now: user directory unavailable") from None
    if principal is None:
        raise Unauthenticated("unknown user token")
    if not backend.permits(principal, action):
        roles = ", ".join(backend.roles_for(action)) or "no role"
        raise PermissionDenied(
            f"user {principal.name!r} (role {principal.role}) may not {action}; needs {roles}"
        )
    return principal


async def _read_json(request: Request) -> dict[str, Any]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ADMIN_BODY:
            raise PayloadTooLarge(f"admin request body is over {MAX_ADMIN_BODY} bytes")
    if not body.strip():
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument("request body must be a JSON object")
    return parsed


def _endpoint(backend: AdminBackend, route: AdminRoute) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            principal = await require(backend, request.headers.get("authorization"), route.action)
            body = await _read_json(request) if route.body is not None else {}
            result = await route.handler(
                AdminRequest(principal, dict(request.path_params), dict(request.query_params), body)
            )
        except GatewayError as exc:
            return _error(exc)
        return _json(result, route.status)

    return endpoint


def build_admin_app(backend: AdminBackend, routes: Sequence[AdminRoute]) -> Starlette:
    """The ASGI app mounted at ``/admin``; ``/admin/openapi.json`` describes it."""
    spec = openapi(backend, routes)

    async def describe(request: Request) -> Response:
        return _json(spec)

    starlette_routes = [Route("/openapi.json", describe, methods=["GET"])]
    starlette_routes += [
        Route(r.path, _endpoint(backend, r), methods=[r.method], name=f"{r.method} {r.path}")
        for r in routes
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return _json({"error": f"no admin route {request.url.path}"}, 404)

    async def bad_method(request: Request, exc: Exception) -> Response:
        return _json({"error": f"method {request.method} not allowed"}, 405)

    return Starlette(routes=starlette_routes, exception_handlers={404: not_found, 405: bad_method})


def openapi(backend: AdminBackend, routes: Sequence[AdminRoute]) -> dict[str, Any]:
    """An OpenAPI 3.1 description built from the routes themselves."""
    error = {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in _path_params(r.path)
        ]
        params += [
            {
                "name": q,
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": text,
            }
            for q, text in r.query.items()
        ]
        op: dict[str, Any] = {
            "summary": r.summary,
            "description": f"Action `{r.action}`; roles: {', '.join(backend.roles_for(r.action))}.",
            "operationId": f"{r.method.lower()}_{r.action.replace('.', '_')}",
            "parameters": params,
            "responses": {
                str(r.status): {"description": "OK", "content": {"application/json": {}}},
                "400": error,
                "401": error,
                "403": error,
                "404": error,
                "409": error,
            },
        }
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": r.body}},
            }
        paths.setdefault(ADMIN_PREFIX + r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpugate admin API", "version": "1"},
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                }
            },
        },
        "paths": paths,
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]
