"""Admin routes that look across models and tenants: the overview (adoption and risk,
``overview.read``) and every model's rollout."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

import serving.admin.schemas as schemas
from serving.admin.auth import Caller
from serving.admin.routing import AdminRoute, Services, route
from serving.rollout import LIVE_STATES
from serving.tenancy import permits

router = APIRouter(route_class=AdminRoute)


@route(
    router,
    "GET",
    "/overview",
    "overview.read",
    "Adoption and risk over the last days: tenants, requests, device-hours, production, "
    "promotions and rollbacks; approvals waiting, guardrail refusals, failed rollouts, "
    "budgets near their end, the audit chain",
)
def overview(
    query: Annotated[schemas.OverviewQuery, Query()], caller: Caller, services: Services
) -> schemas.Overview:
    seen = services.insights.overview(query.days)
    if not permits(caller, "budgets.read"):  # who may not read budgets sees no amounts
        for watched in seen["risk"]["budgets"]["tenants"]:
            watched["spent"] = watched["amount"] = None
    return schemas.Overview.model_validate(seen)


@route(
    router,
    "GET",
    "/rollouts",
    "models.read",
    "Each model's live rollout, else its latest: step, weights, state, last analysis",
)
def list_rollouts(
    query: Annotated[schemas.RolloutsQuery, Query()], services: Services
) -> list[schemas.Rollout]:
    states = () if query.state is None else LIVE_STATES if query.state == "live" else (query.state,)
    return [
        schemas.Rollout.model_validate(ro.as_json()) for ro in services.rollouts.latest_each(states)
    ]
