"""How an admin endpoint is declared: the action it needs, checked before the endpoint
runs and before any request body is read; the OpenAPI description names the action in
the operation's security requirement and lists the roles that may do it. A JSON body
is read up to :data:`MAX_JSON_BODY` bytes (an artifact upload has its model's own limit).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Request, Response, Security
from fastapi.routing import APIRoute
from starlette.types import Message, Receive

from serving.admin.auth import authorize
from serving.admin.errors import ERROR_RESPONSES
from serving.admin.services import AdminServices, services_of
from serving.tenancy import roles_for

MAX_JSON_BODY = 64 * 1024

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
Services = Annotated[AdminServices, Depends(services_of)]


def route(
    router: APIRouter,
    method: str,
    path: str,
    action: str,
    summary: str,
    *,
    status_code: int = 200,
    **options: Any,
) -> Callable[[Endpoint], Endpoint]:
    """Declare an endpoint that only users whose role may do ``action`` reach."""
    roles = ", ".join(roles_for(action)) or "no role"
    decorate: Callable[[Endpoint], Endpoint] = router.api_route(
        path,
        methods=[method],
        summary=summary,
        description=f"Action `{action}`; roles: {roles}.",
        status_code=status_code,
        dependencies=[Security(authorize, scopes=[action])],
        responses=ERROR_RESPONSES,
        **options,
    )
    return decorate


def _too_large() -> HTTPException:
    # An HTTPException: FastAPI passes it through from the body read as it is.
    return HTTPException(413, f"request body is over the {MAX_JSON_BODY}-byte limit")


def _capped(request: Request) -> Receive:
    declared = request.headers.get("content-length", "")
    seen = 0

    async def receive() -> Message:
        nonlocal seen
        if declared.isdigit() and int(declared) > MAX_JSON_BODY:
            raise _too_large()
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_JSON_BODY:
                raise _too_large()
        return message

    return receive


class JsonBodyRoute(APIRoute):
    """A route whose declared JSON body is read up to :data:`MAX_JSON_BODY` bytes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def capped(request: Request) -> Response:
            return await handler(Request(request.scope, _capped(request)))

        return capped
