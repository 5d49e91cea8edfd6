"""What the admin API's routes act on: the gateway's stores, built once per app from the
state database and the gateway's own config (policies included)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from fastapi import Request

from serving.budgets import BudgetStore
from serving.config import GatewayConfig
from serving.costs import LedgerReports, Pricing
from serving.insights import Insights
from serving.registry import Registry, Stages
from serving.rollout import Rollouts
from serving.tenancy import QuotaStore, TenantKeyStore, TenantStore, UserDirectory, UserStore


@dataclass(frozen=True)
class AdminServices:
    engine: sa.Engine
    directory: UserDirectory
    users: UserStore
    tenants: TenantStore
    keys: TenantKeyStore
    quotas: QuotaStore
    budgets: BudgetStore
    registry: Registry
    stages: Stages
    rollouts: Rollouts
    reports: LedgerReports
    insights: Insights
    # Called after a tenant changes, so the gateway's key cache forgets it at once.
    on_tenants_changed: Callable[[], None]

    @classmethod
    def open(
        cls,
        engine: sa.Engine,
        state_dir: Path,
        config: GatewayConfig,
        pricing: Pricing,
        on_tenants_changed: Callable[[], None] = lambda: None,
    ) -> AdminServices:
        users = UserStore(engine)
        registry = Registry(engine, state_dir, config)
        stages = Stages(registry)
        rollouts = Rollouts(stages)
        tenants = TenantStore(engine)
        budgets = BudgetStore(engine, pricing)
        return cls(
            engine=engine,
            directory=UserDirectory(users),
            users=users,
            tenants=tenants,
            keys=TenantKeyStore(engine),
            quotas=QuotaStore(engine),
            budgets=budgets,
            registry=registry,
            stages=stages,
            rollouts=rollouts,
            reports=LedgerReports(engine, pricing),
            insights=Insights(engine, pricing, tenants, stages, rollouts, budgets),
            on_tenants_changed=on_tenants_changed,
        )


def services_of(request: Request) -> AdminServices:
    """The services of the app that received ``request``."""
    services: AdminServices = request.app.state.services
    return services
