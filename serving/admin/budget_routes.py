"""Admin routes of tenants' budgets (serving.budgets): finance sets them, the control
loop watches them, the gateways enforce their action at 100%."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path

import serving.admin.schemas as schemas
from serving.admin.auth import Caller
from serving.admin.routing import AdminRoute, Services, route
from serving.admin.schemas import Name
from serving.budgets import Budget

router = APIRouter(route_class=AdminRoute)
TenantName = Annotated[Name, Path(description="A tenant's name.")]


def budget_of(setting: schemas.BudgetSetting) -> Budget:
    """The budget the API was given (checked: ValueError names the problem)."""
    period = setting.period
    return Budget.of(
        setting.unit,
        setting.amount,
        thresholds=tuple(setting.thresholds),
        action=setting.action,
        period=None
        if period == "month"
        else (period.from_, period.from_ + timedelta(days=period.days)),
        webhook_url=setting.webhook.url if setting.webhook else None,
        webhook_secret=setting.webhook.secret if setting.webhook else None,
    )


def _view(name: str, services: Services) -> schemas.TenantBudget:
    budget = services.budgets.get(name)  # TenantNotFoundError for no such tenant
    if budget is None:
        return schemas.TenantBudget(tenant=name, budget=None, spend=None, alerts=[])
    spend = services.budgets.spend(name, budget)
    alerts = services.budgets.alerts(name, spend.start)
    return schemas.TenantBudget(
        tenant=name,
        budget=schemas.BudgetView.model_validate(budget.described()),
        spend=schemas.BudgetSpend.model_validate(spend.described()),
        alerts=[
            schemas.BudgetAlert(
                id=a.id,
                threshold=a.threshold,
                period_start=a.period_start,
                spent=a.shown(budget)[0],
                amount=a.shown(budget)[1],
                crossed_at=a.crossed_at,
                deliveries=services.budgets.deliveries(a.id),
            )
            for a in alerts
        ],
    )


@route(
    router,
    "GET",
    "/tenants/{name}/budget",
    "budgets.read",
    "A tenant's budget, its spend this period with a forecast, and this period's alerts",
)
def show_budget(name: TenantName, services: Services) -> schemas.TenantBudget:
    return _view(name, services)


@route(
    router,
    "PUT",
    "/tenants/{name}/budget",
    "budgets.write",
    "Give a tenant a budget (replacing its budget)",
)
def set_budget(
    name: TenantName, setting: schemas.BudgetSetting, caller: Caller, services: Services
) -> schemas.TenantBudget:
    services.budgets.set(name, budget_of(setting), actor=caller.name)
    services.on_tenants_changed()
    return _view(name, services)


@route(
    router,
    "DELETE",
    "/tenants/{name}/budget",
    "budgets.write",
    "Remove a tenant's budget (its alerts stay on record); deleted is false if it had none",
)
def clear_budget(name: TenantName, caller: Caller, services: Services) -> schemas.DeletedTenant:
    removed = services.budgets.clear(name, actor=caller.name)
    services.on_tenants_changed()
    return schemas.DeletedTenant(tenant=name, deleted=removed)
