"""Figures across tenants, models and the audit log for the people who steer the
gateway: adoption (tenants, requests, device-hours, production, promotions and
rollbacks) and risk (approvals waiting, guardrail refusals, failed rollouts, budgets
near their end, the audit chain), each computed by the package that owns it."""

from serving.insights.adoption import PROMOTIONS, ROLLBACKS
from serving.insights.overview import MAX_DAYS, Insights, window
from serving.insights.risk import BUDGET_WATCH_PERCENT, FAILED_STATES

__all__ = [
    "BUDGET_WATCH_PERCENT",
    "FAILED_STATES",
    "MAX_DAYS",
    "PROMOTIONS",
    "ROLLBACKS",
    "Insights",
    "window",
]
