"""Queries and answers of the admin API's views across models, tenants and the audit log:
the overview, the audit log's filters and paging, every model's rollout, and a version's
card with its standing against production. The rest: serving.admin.schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from serving.admin.schemas import (
    AuditCheck,
    Instant,
    Name,
    Strict,
    VersionDetail,
    _encodable,
)
from serving.insights import MAX_DAYS

MAX_AUDIT_PAGE = 5000
MAX_PATTERNS = 20
_SEQ_MAX = 2**63 - 1  # the audit log's seq is a 64-bit integer

Stage = Literal["registered", "approved", "rejected", "staging", "production", "archived"]
RolloutState = Literal["running", "paused", "succeeded", "failed", "aborted", "live"]
# Query values hold no control characters (serving.admin.routing refuses them).
Pattern = Annotated[
    str,
    StringConstraints(min_length=1, max_length=300, pattern=r"^[^\x00-\x1f\x7f]+$"),
    AfterValidator(_encodable),
]
Seq = Annotated[int, Field(ge=0, le=_SEQ_MAX)]
_PATTERN = "; repeat it for any of several. A value ending in * is a prefix (literal, "
_PATTERN += "case-sensitive), e.g. "


# -- overview ----------------------------------------------------------------------


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
    spent: str
    amount: str
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


# -- the audit log -----------------------------------------------------------------


class AuditQuery(Strict):
    model: Name | None = Field(
        default=None, description="Only records about this model: its versions and its rollouts."
    )
    since: Instant | None = Field(default=None, description="Only records at or after this time.")
    until: Instant | None = Field(default=None, description="Only records before this time.")
    actor: list[Pattern] = Field(
        default=[], max_length=MAX_PATTERNS, description="Only records by this user" + _PATTERN
        + "ci-*.",
    )  # fmt: skip
    action: list[Pattern] = Field(
        default=[], max_length=MAX_PATTERNS, description="Only records of this action" + _PATTERN
        + "model.promote.*.",
    )  # fmt: skip
    target: list[Pattern] = Field(
        default=[], max_length=MAX_PATTERNS, description="Only records about this target" + _PATTERN
        + "tenant:*.",
    )  # fmt: skip
    after_seq: Seq | None = Field(
        default=None,
        description="Only records after this sequence number (the next page, oldest first).",
    )
    before_seq: Seq | None = Field(
        default=None,
        description="Only records before this sequence number (the next page, newest first).",
    )
    order: Literal["asc", "desc"] = Field(
        default="asc", description="asc: oldest first; desc: newest first."
    )
    limit: Annotated[int, Field(ge=1, le=MAX_AUDIT_PAGE)] = Field(
        default=500,
        description="At most this many records; a full page may have more after it.",
    )


# -- rollouts and versions ---------------------------------------------------------


class RolloutsQuery(Strict):
    state: RolloutState | None = Field(
        default=None,
        description="Only rollouts in this state (live: running or paused).",
    )


class MetricComparison(BaseModel):
    metric: str
    value: float | None = Field(description="The version's; null: it has none.")
    production: float | None = Field(description="Production's; null: it has none.")
    delta: float | None = Field(description="value - production.")
    higher_is_better: bool | None = Field(description="The policy's rule; null: no rule.")
    max_regression: float | None
    passes: bool | None = Field(
        description="Whether the metrics guardrail lets it through; null: not checked (no "
        "rule, or production has no such metric)."
    )


class Refusal(BaseModel):
    check: str
    reason: str


class AgainstProduction(BaseModel):
    """The checks a promotion to production would run now, with the gateway's policy."""

    production_version: str
    metrics: list[MetricComparison]
    signature_compatible: bool
    passes: bool = Field(description="Signature and metrics guardrails both pass.")
    refusal: Refusal | None = Field(description="The first that would refuse it; null: none.")


class GuardrailRefusal(BaseModel):
    seq: int = Field(description="The audit record's.")
    at: datetime
    actor: str
    target: str
    check: str
    during: str | None = Field(description="register, or promote:STAGE.")
    reason: str


class VersionCard(VersionDetail):
    against_production: AgainstProduction | None = Field(
        description="null: the model has no production version, or this is it."
    )
    guardrail_refusals: list[GuardrailRefusal] = Field(
        description="The guardrails' refusals about this version, oldest first."
    )
