"""Bodies of the overview: adoption (usage per day, tenants, production versions,
promotions and rollbacks per week) and risk (approvals waiting, guardrail refusals,
failed rollouts, budgets near their end, the audit chain)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.admin.schemas.audit import AuditCheck
from serving.admin.schemas.common import Strict
from serving.insights import MAX_DAYS


class OverviewQuery(Strict):
    days: Annotated[int, Field(ge=1, le=MAX_DAYS)] = Field(
        default=30, description="The window: the last DAYS UTC days, today included."
    )


class DayUsage(BaseModel):
    """One UTC day's figures: those of ``GET /admin/costs?group_by=day`` for that day."""

    day: str = Field(description="YYYY-MM-DD (UTC).")
    requests: int
    rows: int
    used_ns: int = Field(description="Device time the tenants' batches used.")
    idle_ns: int = Field(description="Reserved device time no batch used.")
    device_hours: float = Field(
        description="(used_ns + idle_ns) in hours: the cost report's gpu_hours."
    )


class UsageTotals(BaseModel):
    requests: int
    rows: int
    used_ns: int
    idle_ns: int
    device_hours: float


class TenantCounts(BaseModel):
    active: int = Field(description="Tenants with at least one request in the window.")
    enabled: int = Field(description="Tenants served now (neither suspended nor deleted).")


class Production(BaseModel):
    models: int = Field(description="Models with a production version.")
    versions: list[str] = Field(description="NAME:VERSION of each, by model name.")


class WeekChanges(BaseModel):
    week: str = Field(description="The ISO week, YYYY-Www.")
    starts: str = Field(description="Its Monday, YYYY-MM-DD.")
    promotions: int
    rollbacks: int


class CountedActions(BaseModel):
    """The audit actions counted in ``per_week``."""

    promotions: list[str]
    rollbacks: list[str]


class Adoption(BaseModel):
    tenants: TenantCounts
    per_day: list[DayUsage] = Field(description="Every day of the window, oldest first.")
    totals: UsageTotals
    production: Production
    per_week: list[WeekChanges] = Field(
        description="Every ISO week that meets the window, counted within the window."
    )
    counted_actions: CountedActions


class WaitingVersion(BaseModel):
    name: str
    version: str
    author: str
    registered_at: datetime
    age_s: int = Field(description="Seconds since it was registered.")
    approvals: int = Field(description="Approvals it has.")
    required: int = Field(description="Approvals its model's policy requires.")


class ApprovalsWaiting(BaseModel):
    count: int
    versions: list[WaitingVersion] = Field(description="Oldest first.")


class RefusalCounts(BaseModel):
    count: int = Field(description="Guardrail refusals (model.refused with a check).")
    by_check: dict[str, int]


class FailedRollout(BaseModel):
    id: int
    model: str
    candidate: str
    production: str
    state: Literal["failed", "aborted"]
    created_by: str
    finished_at: datetime | None
    reason: str = Field(description="The reason of its last event.")


class FailedRollouts(BaseModel):
    count: int
    rollouts: list[FailedRollout] = Field(description="Oldest first.")


class BudgetWatch(BaseModel):
    tenant: str
    percent: float = Field(description="Spent this period, in % of the amount.")
    unit: str = Field(description="A currency code, or device_hours.")
    spent: str | None = Field(description="Null unless the caller may budgets.read.")
    amount: str | None = Field(description="Null unless the caller may budgets.read.")
    exhausted: bool
    action: str = Field(description="What happens at 100%: notify, reject or best-effort.")


class BudgetsNearEnd(BaseModel):
    percent: int = Field(description="The share of the budget from which a tenant is listed.")
    count: int
    tenants: list[BudgetWatch] = Field(description="The most spent first.")


class AnchorMark(BaseModel):
    seq: int
    at: str = Field(description="When this host anchored it (RFC 3339).")


class AuditChain(AuditCheck):
    last_anchor: AnchorMark | None = Field(
        description="The newest record this gateway's anchor file holds; null: none."
    )
    checked_at: str = Field(
        description="When the chain was verified (RFC 3339). The overview verifies again "
        "when the chain's head moves, else at most once a minute; GET /admin/audit/verify "
        "always verifies afresh."
    )


class Risk(BaseModel):
    approvals_waiting: ApprovalsWaiting
    guardrail_refusals: RefusalCounts
    failed_rollouts: FailedRollouts
    budgets: BudgetsNearEnd
    audit: AuditChain


class Overview(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    days: int
    from_: datetime = Field(alias="from", description="The window's start (a UTC midnight).")
    to: datetime = Field(description="Its end, excluded: the midnight after today.")
    at: datetime = Field(description="When the figures were taken.")
    adoption: Adoption
    risk: Risk
