"""Admin routes of tenants' rate quotas (the router enforces them: router.quota)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

import serving.admin.schemas as schemas
from serving.admin.auth import Caller
from serving.admin.routing import AdminRoute, Services, route
from serving.admin.schemas import Name
from serving.tenancy import QuotaRow

router = APIRouter(route_class=AdminRoute)
TenantName = Annotated[Name, Path(description="A tenant's name.")]


def quota_row(limits: schemas.QuotaLimits, model: str | None) -> QuotaRow:
    """The store's row of a quota the API was given for ``model`` (None or '*': every
    model), checked: ValueError if out of range."""
    requests, rows = limits.requests, limits.rows
    return QuotaRow(
        "" if model in (None, "*") else str(model),
        requests.per_s if requests else None,
        requests.burst if requests else None,
        rows.per_s if rows else None,
        rows.burst if rows else None,
    ).checked()


def _rate(per_s: float | None, burst: float | None) -> schemas.RateSetting | None:
    return None if per_s is None else schemas.RateSetting(per_s=per_s, burst=burst)


def _quota(row: QuotaRow) -> schemas.TenantQuota:
    return schemas.TenantQuota(
        model=row.model or None,
        requests=_rate(row.requests_per_s, row.requests_burst),
        rows=_rate(row.rows_per_s, row.rows_burst),
    )


@route(
    router,
    "GET",
    "/tenants/{name}/quotas",
    "tenants.list",
    "A tenant's rate quotas: over every model, and per model",
)
def list_quotas(name: TenantName, services: Services) -> list[schemas.TenantQuota]:
    return [_quota(row) for row in services.quotas.list(name)]


@route(
    router,
    "PUT",
    "/tenants/{name}/quotas",
    "tenants.update",
    "Set a tenant's rate quota over every model or for one model (no rate: remove it)",
)
def set_quota(
    name: TenantName, setting: schemas.QuotaSetting, caller: Caller, services: Services
) -> schemas.TenantQuota:
    stored = services.quotas.set(name, quota_row(setting, setting.model), actor=caller.name)
    services.on_tenants_changed()
    return _quota(stored)
