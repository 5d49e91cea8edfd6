"""Admin routes of users: create, list, disable, enable, rotate and delete.

Each change is audited by the store; after one, this gateway's token cache forgets
every token at once, so a disabled, rotated or deleted token is refused here from the
next request (and by other gateways within their cache's TTL). Endpoints are plain
functions: FastAPI runs them in its thread pool, since every store call blocks on the
database.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path

import serving.admin.schemas as schemas
from serving.admin.auth import Caller
from serving.admin.routing import AdminRoute, Services, route
from serving.admin.schemas import Name
from serving.tenancy import UserRow

router = APIRouter(route_class=AdminRoute)
UserName = Annotated[Name, Path(description="A user's name.")]


def _user(u: UserRow) -> schemas.User:
    return schemas.User(
        user=u.name,
        role=u.role,
        created_by=u.created_by,
        created_at=u.created_at,
        status=u.status(),  # type: ignore[arg-type]  # one of the Literal's values
        disabled_at=u.disabled_at,
        expires_at=u.expires_at,
    )


@route(router, "GET", "/users", "users.list", "List users and their status (never tokens)")
def list_users(services: Services) -> list[schemas.User]:
    return [_user(u) for u in services.users.list()]


@route(
    router,
    "POST",
    "/users",
    "users.create",
    "Create a user, optionally with an expiry; its token is returned once",
    status_code=201,
)
def create_user(new: schemas.NewUser, caller: Caller, services: Services) -> schemas.CreatedUser:
    expires_at = new.deadline()
    token = services.users.create(new.name, new.role, actor=caller.name, expires_at=expires_at)
    return schemas.CreatedUser(
        user=new.name,
        role=new.role,
        token=token,
        expires_at=services.users.get(new.name).expires_at,
    )


Change = Annotated[schemas.UserChange | None, Body()]


@route(
    router,
    "POST",
    "/users/{name}/disable",
    "users.disable",
    "Refuse the user's token until it is enabled again (not the last enabled admin)",
)
def disable_user(
    name: UserName, caller: Caller, services: Services, change: Change = None
) -> schemas.User:
    row = services.users.disable(name, actor=caller.name, reason=change.reason if change else "")
    services.directory.invalidate()
    return _user(row)


@route(router, "POST", "/users/{name}/enable", "users.enable", "Accept the user's token again")
def enable_user(
    name: UserName, caller: Caller, services: Services, change: Change = None
) -> schemas.User:
    row = services.users.enable(name, actor=caller.name, reason=change.reason if change else "")
    services.directory.invalidate()
    return _user(row)


@route(
    router,
    "POST",
    "/users/{name}/rotate",
    "users.rotate",
    "Give the user a new token (returned once); the old one stops working",
)
def rotate_user_token(
    name: UserName,
    caller: Caller,
    services: Services,
    rotation: Annotated[schemas.Rotation | None, Body()] = None,
) -> schemas.CreatedUser:
    rotation = rotation or schemas.Rotation()
    token = services.users.rotate(
        name,
        actor=caller.name,
        expires_at=rotation.deadline(),
        keep_expiry=not (rotation.given or rotation.never_expires),
        reason=rotation.reason,
    )
    services.directory.invalidate()
    row = services.users.get(name)
    return schemas.CreatedUser(user=name, role=row.role, token=token, expires_at=row.expires_at)


@route(
    router,
    "DELETE",
    "/users/{name}",
    "users.delete",
    "Delete a user (its token stops working; not the last enabled admin)",
)
def delete_user(name: UserName, caller: Caller, services: Services) -> schemas.DeletedUser:
    services.users.delete(name, actor=caller.name)
    services.directory.invalidate()
    return schemas.DeletedUser(user=name, deleted=True)
