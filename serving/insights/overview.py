"""The overview: adoption and risk over the last N UTC days, in one answer
(``GET /admin/overview``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa

import serving.insights.adoption as adoption
import serving.insights.risk as risk
from serving.budgets import BudgetStore
from serving.costs import Pricing
from serving.registry import Stages
from serving.rollout import Rollouts
from serving.tenancy import TenantStore

MAX_DAYS = 366


def window(days: int, now: datetime) -> tuple[datetime, datetime]:
    """The last ``days`` UTC days, today included, as ``[start, end)``: from the first
    day's midnight to the midnight after today (the bounds of the cost report from the
    first day to today)."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be in 1..{MAX_DAYS}")
    today = now.astimezone(UTC).date()
    end = datetime.combine(today + timedelta(days=1), time(), UTC)
    return end - timedelta(days=days), end


@dataclass(frozen=True)
class Insights:
    """The overview over one gateway's state. Blocking; call from a thread in async code."""

    engine: sa.Engine
    pricing: Pricing
    tenants: TenantStore
    stages: Stages
    rollouts: Rollouts
    budgets: BudgetStore
    chain_check: risk.ChainCheck = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chain_check", risk.ChainCheck(self.engine))

    def overview(self, days: int = 30, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        start, end = window(days, now)
        registry = self.stages.registry
        used = adoption.usage(self.engine, self.pricing, start, end, now)
        production = adoption.in_production(registry)
        return {
            "days": days,
            "from": start.isoformat(),
            "to": end.isoformat(),
            "at": now.isoformat(),
            "adoption": {
                "tenants": {
                    "active": len(used["active_tenants"]),
                    "enabled": adoption.enabled_tenants(self.tenants),
                },
                "per_day": used["per_day"],
                "totals": used["totals"],
                "production": {
                    "models": len({p.partition(":")[0] for p in production}),
                    "versions": production,
                },
                "per_week": adoption.changes_per_week(self.engine, start, end),
                "counted_actions": {
                    "promotions": list(adoption.PROMOTIONS),
                    "rollbacks": list(adoption.ROLLBACKS),
                },
            },
            "risk": {
                "approvals_waiting": _counted("versions", risk.approvals_waiting(self.stages, now)),
                "guardrail_refusals": risk.refusals(self.engine, start, end),
                "failed_rollouts": _counted(
                    "rollouts", risk.failed_rollouts(self.rollouts, start, end)
                ),
                "budgets": {
                    "percent": risk.BUDGET_WATCH_PERCENT,
                    **_counted("tenants", risk.budgets_near_end(self.budgets, now)),
                },
                "audit": self.chain_check(),
            },
        }


def _counted(key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"count": len(items), key: items}
