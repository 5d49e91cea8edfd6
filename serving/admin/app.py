"""The admin API's ASGI app, mounted at ``/admin`` on the gateway's HTTP port.

Routes: users (user_routes), tenants, audit and costs (core_routes), tenants' API keys
(key_routes), rate quotas (quota_routes), budgets (budget_routes), the model registry
(model_routes), canary rollouts (rollout_routes), and the views across them: the
overview and every model's rollout (insight_routes). ``/admin/openapi.json`` is the
description FastAPI generates from them (no token needed). Errors are answered from the
one table in serving.admin.errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.routing import APIRoute

import serving.admin.budget_routes as budget_routes
import serving.admin.core_routes as core_routes
import serving.admin.insight_routes as insight_routes
import serving.admin.key_routes as key_routes
import serving.admin.model_routes as model_routes
import serving.admin.quota_routes as quota_routes
import serving.admin.rollout_routes as rollout_routes
import serving.admin.user_routes as user_routes
from serving.admin.errors import install_error_answers
from serving.admin.services import AdminServices
from serving.config import GatewayConfig
from serving.costs import Pricing

API_VERSION = "1"


def _operation_id(route: APIRoute) -> str:
    return route.name


def admin_app(services: AdminServices) -> FastAPI:
    """The admin API over ``services``."""
    app = FastAPI(
        title="gpugate admin API",
        version=API_VERSION,
        description="Users, tenants, the model registry, canary rollouts, the audit log and "
        "cost reports of one gateway. Every operation needs `Authorization: Bearer <user "
        'token>` and names the action it checks; errors are `{"error": "..."}`.',
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=_operation_id,
    )
    app.state.services = services
    install_error_answers(app)
    app.include_router(core_routes.router)
    app.include_router(key_routes.router)
    app.include_router(quota_routes.router)
    app.include_router(budget_routes.router)
    app.include_router(user_routes.router)
    app.include_router(model_routes.router)
    app.include_router(rollout_routes.router)
    app.include_router(insight_routes.router)
    return app


def build_admin_app(
    engine: sa.Engine,
    state_dir: Path,
    config: GatewayConfig,
    pricing: Pricing,
    **options: Any,
) -> FastAPI:
    """The admin API of a gateway: its state database, state folder and config (whose
    policies every register, approval and promotion follows)."""
    return admin_app(AdminServices.open(engine, state_dir, config, pricing, **options))
