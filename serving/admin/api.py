"""The serving side of the admin HTTP API: the token backend and the routes.

Each route names the action it needs (checked by ``router.admin.require``
against :data:`serving.tenancy.users.PERMISSIONS`) and runs the same store operations
as the CLI, in a worker thread since they block on the database.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from router._exceptions import GatewayError, InvalidArgument, NotFound, PermissionDenied
from router.admin import AdminRequest, AdminRoute, Conflict, Handler, Principal
from serving.state import audit
from serving.tenancy import (
    Forbidden,
    TenantError,
    TenantExistsError,
    TenantNotFoundError,
    TenantStore,
    UserDirectory,
    UserError,
    UserExistsError,
    UserStore,
    permits,
    roles_for,
)


class UserBackend:
    """router.admin.AdminBackend over the users table."""

    def __init__(self, engine: sa.Engine) -> None:
        self._directory = UserDirectory(UserStore(engine))

    async def authenticate(self, token: str) -> Principal | None:
        return await asyncio.to_thread(self._directory.lookup, token)

    def permits(self, principal: Principal, action: str) -> bool:
        return permits(principal, action)

    def roles_for(self, action: str) -> Sequence[str]:
        return roles_for(action)


def to_http_error(exc: Exception) -> GatewayError | None:
    """The admin API's answer to a serving-side error, or None if it is unexpected."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, Forbidden):
        return PermissionDenied(str(exc))
    if isinstance(exc, TenantExistsError | UserExistsError):
        return Conflict(str(exc))
    if isinstance(exc, TenantNotFoundError) or type(exc).__name__.endswith("NotFoundError"):
        return NotFound(str(exc))
    from serving.registry import RegistryError

    if isinstance(exc, TenantError | UserError | RegistryError | ValueError):
        return InvalidArgument(str(exc))
    return None


def blocking(fn: Callable[[AdminRequest], Any]) -> Handler:
    """Run a blocking handler in a thread and map serving errors to HTTP errors."""

    @functools.wraps(fn)
    async def handler(req: AdminRequest) -> Any:
        try:
            return await asyncio.to_thread(fn, req)
        except Exception as exc:
            mapped = to_http_error(exc)
            if mapped is None:
                raise
            raise mapped from None

    return handler


def _str(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise InvalidArgument(f"{key!r} must be a string")
    return value


def parse_since(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"since {text!r} is not an ISO 8601 time") from None
    return ts if ts.tzinfo is not None else ts.astimezone()


def core_routes(engine: sa.Engine, on_tenants_changed: Callable[[], None]) -> list[AdminRoute]:
    """Users, tenants and the audit log."""
    users, tenants = UserStore(engine), TenantStore(engine)

    def whoami(req: AdminRequest) -> Any:
        return {"name": req.principal.name, "role": req.principal.role}

    def users_create(req: AdminRequest) -> Any:
        name, role = _str(req.body, "name"), _str(req.body, "role")
        token = users.create(name, role, actor=req.principal.name)
        return {"user": name, "role": role, "token": token}

    def users_list(req: AdminRequest) -> Any:
        return [
            {
                "user": u.name,
                "role": u.role,
                "created_by": u.created_by,
                "created_at": u.created_at.isoformat(),
            }
            for u in users.list()
        ]

    def tenants_create(req: AdminRequest) -> Any:
        name = _str(req.body, "name")
        weight = req.body.get("weight", 1.0)
        models = req.body.get("models", ["*"])
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidArgument("'weight' must be a number")
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise InvalidArgument("'models' must be a list of model names")
        key = tenants.create(name, float(weight), models, actor=req.principal.name)
        on_tenants_changed()
        return {"tenant": name, "api_key": key}

    def tenants_delete(req: AdminRequest) -> Any:
        name = req.path_params["name"]
        tenants.delete(name, actor=req.principal.name)
        on_tenants_changed()
        return {"tenant": name, "deleted": True}

    def tenants_rotate(req: AdminRequest) -> Any:
        name = req.path_params["name"]
        key = tenants.rotate_key(name, actor=req.principal.name)
        on_tenants_changed()
        return {"tenant": name, "api_key": key}

    def tenants_list(req: AdminRequest) -> Any:
        return [
            {"tenant": r.name, "weight": r.weight, "models": list(r.models), "source": r.source}
            for r in tenants.list()
        ]

    def audit_log(req: AdminRequest) -> Any:
        model = req.query.get("model")
        return [
            r.as_json()
            for r in audit.read(
                engine,
                target_prefix=f"model:{model}" if model else None,
                since=parse_since(req.query.get("since")),
            )
        ]

    def audit_verify(req: AdminRequest) -> Any:
        result = audit.verify(engine)
        return {
            "ok": result.ok,
            "records": result.records,
            "problem": result.problem,
            "first_bad_seq": result.first_bad_seq,
        }

    name_role = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
        "required": ["name", "role"],
    }
    tenant_body = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "weight": {"type": "number"},
            "models": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name"],
    }
    audit_query = {"model": "only records about this model", "since": "ISO 8601 time"}
    return [
        AdminRoute("GET", "/whoami", "models.read", "The caller's user and role", blocking(whoami)),
        AdminRoute(
            "GET", "/users", "users.list", "List users (never tokens)", blocking(users_list)
        ),
        AdminRoute(
            "POST",
            "/users",
            "users.create",
            "Create a user; the token is returned once",
            blocking(users_create),
            status=201,
            body=name_role,
        ),
        AdminRoute("GET", "/tenants", "tenants.list", "List tenants", blocking(tenants_list)),
        AdminRoute(
            "POST",
            "/tenants",
            "tenants.create",
            "Create a tenant; the key is returned once",
            blocking(tenants_create),
            status=201,
            body=tenant_body,
        ),
        AdminRoute(
            "DELETE",
            "/tenants/{name}",
            "tenants.delete",
            "Delete a tenant (revokes its key)",
            blocking(tenants_delete),
        ),
        AdminRoute(
            "POST",
            "/tenants/{name}/rotate",
            "tenants.rotate",
            "Give a tenant a new key (returned once); the old key stops working",
            blocking(tenants_rotate),
        ),
        AdminRoute(
            "GET",
            "/audit",
            "audit.read",
            "Audit records, oldest first",
            blocking(audit_log),
            query=audit_query,
        ),
        AdminRoute(
            "GET",
            "/audit/verify",
            "audit.read",
            "Recompute the audit hash chain",
            blocking(audit_verify),
        ),
    ]
