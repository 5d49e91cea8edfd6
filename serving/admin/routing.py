"""How an admin endpoint is declared: the action it needs, and :class:`AdminRoute`, which
checks the caller may do it before anything of the request but its headers is read.

The OpenAPI description names the action in the operation's security requirement and
lists the roles that may do it. A JSON body is read up to :data:`MAX_JSON_BODY` bytes
(an artifact upload has its model's own limit). Query parameters a route does not
declare are refused, and so is any path or query value over :data:`MAX_PARAM_CHARS`
characters or holding a control character (NUL included), before it reaches a query.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Request, Response, Security, params
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive

from serving.admin.auth import admit, authorize
from serving.admin.errors import ERROR_RESPONSES
from serving.admin.services import AdminServices, services_of
from serving.tenancy import Principal, check, roles_for

MAX_JSON_BODY = 64 * 1024
# ASGI scope key under which an in-process caller (the web console, which has checked the
# user's session) hands over the user; the role check is then the same as for a token. No
# request from a socket carries it: servers build scopes from the standard keys only.
SIGNED_IN = "gpugate.signed_in"

MAX_PARAM_CHARS = 4096
# C0 controls and DEL: no name, filter or date holds one, and PostgreSQL refuses NUL in text.
_CONTROL = frozenset(map(chr, [*range(0x20), 0x7F]))

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


def _query_names(dependant: Dependant) -> frozenset[str]:
    """The query parameters an endpoint and its dependencies declare, a model's fields
    (``Annotated[Model, Query()]``) by their aliases."""
    names: set[str] = set()
    pending = [dependant]
    while pending:
        current = pending.pop()
        pending.extend(current.dependencies)
        for field in current.query_params:
            model = field.field_info.annotation
            if isinstance(model, type) and issubclass(model, BaseModel):
                names.update(f.alias or n for n, f in model.model_fields.items())
            else:
                names.add(field.alias)
    return frozenset(names)


def _refuse_malformed(request: Request) -> None:
    """400 for path and query values no endpoint could use: over-long, or holding controls."""
    values = [("path", k, v) for k, v in request.path_params.items()] + [
        ("query", k, v) for k, v in request.query_params.multi_items()
    ]
    errors = [
        {
            "type": "value_error",
            "loc": (where, name),
            "msg": f"must be at most {MAX_PARAM_CHARS} characters"
            if len(value) > MAX_PARAM_CHARS
            else "must not hold control characters",
            "input": value[:64],
        }
        for where, name, value in values
        if isinstance(value, str)
        and (len(value) > MAX_PARAM_CHARS or not _CONTROL.isdisjoint(value))
    ]
    if errors:
        raise RequestValidationError(errors)


class AdminRoute(APIRoute):
    """An admin endpoint, declared with :func:`route`. Before FastAPI reads the body or
    validates anything, it admits the caller for the route's action from the
    ``Authorization`` header (401 or 403 otherwise), or checks the user an in-process
    caller put under :data:`SIGNED_IN`, and refuses query parameters the
    route does not declare (400); it then reads a declared JSON body up to
    :data:`MAX_JSON_BODY` bytes."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.actions = [
            action
            for dep in self.dependencies
            if isinstance(dep, params.Security) and dep.dependency is authorize
            for action in dep.scopes or ()
        ]
        if not self.actions:
            raise TypeError(f"admin route {path} names no action: declare it with route()")
        self.query_names = _query_names(self.dependant)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        has_body = self.body_field is not None

        async def admitted(request: Request) -> Response:
            signed_in = request.scope.get(SIGNED_IN)
            if isinstance(signed_in, Principal):  # the console, in-process (serving.console)
                for action in self.actions:
                    check(signed_in, action)
                request.state.principal = signed_in
            else:
                request.state.principal = await run_in_threadpool(admit, request, self.actions)
            unknown = sorted(set(request.query_params) - self.query_names)
            if unknown:
                raise RequestValidationError(
                    [
                        {
                            "type": "extra_forbidden",
                            "loc": ("query", name),
                            "msg": "Extra inputs are not permitted",
                            "input": request.query_params[name],
                        }
                        for name in unknown
                    ]
                )
            _refuse_malformed(request)
            if has_body:
                request = Request(request.scope, _capped(request))
            return await handler(request)

        return admitted
