"""Admin routes that look across models and tenants: the overview (adoption and risk,
``overview.read``) and every model's rollout."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

import serving.admin.schemas as schemas
from serving.admin.routing import AdminRoute, Services, route
from serving.rollout import LIVE_STATES

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
    query: Annotated[schemas.OverviewQuery, Query()], services: Services
) -> schemas.Overview:
    return schemas.Overview.model_validate(services.insights.overview(query.days))


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
