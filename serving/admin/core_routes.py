"""Admin routes of tenants, the audit log and cost reports (users: user_routes).

Endpoints are plain functions: FastAPI runs them in its thread pool, since every
store call blocks on the database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query

import serving.admin.schemas as schemas
from serving.admin.auth import Caller
from serving.admin.budget_routes import budget_of
from serving.admin.quota_routes import quota_row
from serving.admin.routing import AdminRoute, Services, route
from serving.admin.schemas import Name
from serving.state import audit
from serving.tenancy import Admission, TenantNotFoundError, TenantRow

router = APIRouter(route_class=AdminRoute)
TenantName = Annotated[Name, Path(description="A tenant's name.")]


@route(router, "GET", "/whoami", "models.read", "The caller's user and role")
def whoami(caller: Caller) -> schemas.Caller:
    return schemas.Caller(name=caller.name, role=caller.role)


# -- tenants -----------------------------------------------------------------------


def _tenant(r: TenantRow) -> schemas.Tenant:
    return schemas.Tenant(
        tenant=r.name,
        weight=r.weight,
        models=list(r.models),
        source=r.source,
        priorities=list(r.admission.priorities),
        max_requests_in_flight=r.admission.max_requests_in_flight,
        max_bytes_in_flight=r.admission.max_bytes_in_flight,
        status=r.status,
        suspended_at=r.suspended_at,
        suspended_reason=r.suspension,
        deleted_at=r.deleted_at,
    )


@route(router, "GET", "/tenants", "tenants.list", "List tenants (never keys)")
def list_tenants(
    services: Services,
    deleted_too: Annotated[bool, Query(alias="all", description="Deleted tenants too.")] = False,
) -> list[schemas.Tenant]:
    return [_tenant(r) for r in services.tenants.list(include_deleted=deleted_too)]


@route(
    router,
    "POST",
    "/tenants",
    "tenants.create",
    "Create a tenant, with its quotas and budget if given; its API key is returned once",
    status_code=201,
)
def create_tenant(new: schemas.NewTenant, caller: Caller, services: Services) -> schemas.TenantKey:
    admission = Admission.checked(
        new.priorities, new.max_requests_in_flight, new.max_bytes_in_flight
    )
    # Checked before anything is written.
    quotas = [quota_row(limits, model) for model, limits in new.quotas.items()]
    budget = budget_of(new.budget) if new.budget is not None else None
    key = services.tenants.create(
        new.name, new.weight, new.models, admission=admission, actor=caller.name
    )
    for row in quotas:
        services.quotas.set(new.name, row, actor=caller.name)
    if budget is not None:
        services.budgets.set(new.name, budget, actor=caller.name)
    services.on_tenants_changed()
    return schemas.TenantKey(tenant=new.name, api_key=key)


@route(
    router,
    "PATCH",
    "/tenants/{name}",
    "tenants.update",
    "Change a tenant's weight, models, priority grants, in-flight caps or rate quotas (the "
    "keys stay)",
)
def update_tenant(
    name: TenantName, change: schemas.TenantChange, caller: Caller, services: Services
) -> schemas.Tenant:
    # Only the fields sent change; a cap sent as null goes back to the server's default.
    given = change.model_dump(include=change.model_fields_set - {"quotas"})
    for field in ("weight", "models", "priorities", "quotas"):
        if field in given and given[field] is None:
            del given[field]
    # Checked before anything is written.
    quotas = [quota_row(limits, model) for model, limits in (change.quotas or {}).items()]
    if given or not quotas:
        row = services.tenants.update(name, **given, actor=caller.name)
    for quota in quotas:  # a config tenant's quotas too: the config file does not state them
        services.quotas.set(name, quota, actor=caller.name)
    if not given and quotas:
        row = services.tenants.get(name)
    services.on_tenants_changed()
    return _tenant(row)


@route(
    router,
    "DELETE",
    "/tenants/{name}",
    "tenants.delete",
    "Delete a CLI tenant: every key is revoked; the tenant and its usage stay on record, "
    "and its name is not reused",
)
def delete_tenant(name: TenantName, caller: Caller, services: Services) -> schemas.DeletedTenant:
    services.tenants.delete(name, actor=caller.name)
    services.on_tenants_changed()
    return schemas.DeletedTenant(tenant=name, deleted=True)


@route(
    router,
    "POST",
    "/tenants/{name}/restore",
    "tenants.restore",
    "Bring a deleted CLI tenant back with a new API key (returned once)",
)
def restore_tenant(name: TenantName, caller: Caller, services: Services) -> schemas.TenantKey:
    key = services.tenants.restore(name, actor=caller.name)
    services.on_tenants_changed()
    return schemas.TenantKey(tenant=name, api_key=key)


@route(
    router,
    "POST",
    "/tenants/{name}/suspend",
    "tenants.suspend",
    "Refuse every request of the tenant (403, with the reason) until it is resumed",
)
def suspend_tenant(
    name: TenantName, suspension: schemas.Suspension, caller: Caller, services: Services
) -> schemas.Tenant:
    row = services.tenants.suspend(name, suspension.reason, actor=caller.name)
    services.on_tenants_changed()
    return _tenant(row)


@route(router, "POST", "/tenants/{name}/resume", "tenants.resume", "Serve the tenant again")
def resume_tenant(
    name: TenantName,
    caller: Caller,
    services: Services,
    note: Annotated[schemas.Note | None, Body()] = None,
) -> schemas.Tenant:
    row = services.tenants.resume(name, actor=caller.name, reason=note.reason if note else "")
    services.on_tenants_changed()
    return _tenant(row)


@route(
    router,
    "POST",
    "/tenants/{name}/rotate",
    "tenants.rotate",
    "Replace a tenant's one API key with a new one (returned once); the old key stops "
    "working (several keys: rotate one with /tenants/{name}/keys/{key_id}/rotate)",
)
def rotate_tenant_key(name: TenantName, caller: Caller, services: Services) -> schemas.TenantKey:
    key = services.tenants.rotate_key(name, actor=caller.name)
    services.on_tenants_changed()
    return schemas.TenantKey(tenant=name, api_key=key)


# -- audit -------------------------------------------------------------------------


@route(
    router,
    "GET",
    "/audit",
    "audit.read",
    "Audit records, oldest first (or newest first), by model, actor, action, target and "
    "time, a page at a time",
)
def read_audit_log(
    query: Annotated[schemas.AuditQuery, Query()], services: Services
) -> list[schemas.AuditRecord]:
    records = audit.read(
        services.engine,
        target_prefix=audit.model_targets(query.model) if query.model else None,
        since=query.since,
        until=query.until,
        actors=query.actor,
        actions=query.action,
        targets=query.target,
        after_seq=query.after_seq,
        before_seq=query.before_seq,
        newest_first=query.order == "desc",
        limit=query.limit,
    )
    return [schemas.AuditRecord.model_validate(r.as_json()) for r in records]


@route(
    router,
    "GET",
    "/audit/verify",
    "audit.read",
    "Recompute the audit MAC chain and check it against this gateway's anchors",
)
def verify_audit_log(services: Services) -> schemas.AuditCheck:
    result = audit.verify(services.engine)
    return schemas.AuditCheck(
        ok=result.ok,
        records=result.records,
        problem=result.problem,
        first_bad_seq=result.first_bad_seq,
        anchored_seq=result.anchored_seq,
        warnings=list(result.warnings),
    )


# -- costs -------------------------------------------------------------------------


@route(
    router,
    "GET",
    "/costs",
    "costs.read",
    "Device-seconds, device-hours and cost per group, with idle capacity",
    response_model_exclude_none=True,
)
def cost_report(
    query: Annotated[schemas.CostQuery, Query()], services: Services
) -> schemas.CostReport:
    report = services.reports.report(
        query.from_,
        query.to,
        query.group_by,
        share_idle=query.share_idle,
        tenant=query.tenant,
    )
    return schemas.CostReport.model_validate(report)


@route(
    router,
    "GET",
    "/costs/invoice",
    "costs.read",
    "A calendar month's statement per tenant: usage and cost by model, version and "
    "device, and totals that equal the month's cost report",
)
def cost_invoice(
    query: Annotated[schemas.InvoiceQuery, Query()], services: Services
) -> schemas.CostInvoice:
    invoice = services.reports.invoice(
        query.period, tenant=query.tenant, share_idle=query.share_idle
    )
    end = datetime.fromisoformat(invoice["to"])
    at = min(datetime.now(UTC), end - timedelta(microseconds=1))  # a moment of the month
    for statement in invoice["statements"]:
        statement["budget"] = _invoice_budget(services, statement["tenant"], at)
    return schemas.CostInvoice.model_validate(invoice)


def _invoice_budget(services: Services, tenant: str, at: datetime) -> dict[str, Any] | None:
    """The tenant's monthly budget against its spend in the month of ``at`` (a budget over
    a fixed period is not a month's: none)."""
    try:
        budget = services.budgets.get(tenant)
    except TenantNotFoundError:  # deleted since: its statement stands, without a budget
        return None
    if budget is None or budget.period_start is not None:
        return None
    spend = services.budgets.spend(tenant, budget, at)
    unit = services.budgets.pricing.currency if budget.unit == "currency" else "device_hours"
    return {
        "unit": unit,
        "amount": budget.display(budget.amount),
        "spent": budget.display(spend.spent),
        "overrun": budget.display(max(0, spend.spent - budget.amount)),
        "exhausted": spend.exhausted,
    }
