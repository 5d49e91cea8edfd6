"""Bodies of tenants' budgets: the setting, its webhook, and the period's spend and
alerts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from serving.admin.schemas.common import Instant, Strict, Whole


class BudgetPeriod(Strict):
    from_: Instant = Field(alias="from", description="Start (a time with its offset).")
    days: Annotated[int, Field(ge=1, le=3660, strict=True), Whole] = Field(
        description="Its length."
    )


class Webhook(Strict):
    url: Annotated[str, StringConstraints(max_length=2000, pattern=r"^https?://\S+$")] = Field(
        description="Alerts are POSTed here."
    )
    secret: Annotated[
        str, StringConstraints(min_length=16, max_length=200, pattern=r"^[\x21-\x7e]+$")
    ] = Field(description="Signs each delivery (HMAC-SHA256); never shown again.")


Percent = Annotated[int, Field(ge=1, le=1000, strict=True), Whole]


class BudgetSetting(Strict):
    unit: Literal["currency", "device_hours"] = Field(
        description="currency: the configured prices' currency; device_hours: device time."
    )
    amount: Annotated[float, Field(gt=0, le=1e9, strict=True)] = Field(
        description="In the unit, per period."
    )
    period: Literal["month"] | BudgetPeriod = Field(
        default="month", description="'month': each calendar month (UTC); or a fixed period."
    )
    thresholds: list[Percent] = Field(
        default=[50, 80, 100],
        min_length=1,
        max_length=20,
        description="Alert at these percentages of the amount, each once per period "
        "(100 is added when the action is not notify).",
    )
    action: Literal["notify", "reject", "best-effort"] = Field(
        default="notify",
        description="At 100%: notify only; reject (403 'budget exhausted'); or best-effort "
        "(the least urgent priority level and a minimal weight).",
    )
    webhook: Webhook | None = Field(default=None, description="Where alerts are POSTed.")


class BudgetView(BaseModel):
    unit: str
    amount: str
    thresholds: list[int]
    action: str
    period: Any
    webhook_url: str | None


class BudgetSpend(BaseModel):
    from_: str = Field(alias="from")
    to: str
    spent: str
    percent: float
    forecast: str = Field(description="At the period's end, at the rate so far.")
    exhausted: bool


class BudgetAlert(BaseModel):
    id: int
    threshold: int
    period_start: datetime
    spent: str
    amount: str
    crossed_at: datetime
    deliveries: list[dict[str, Any]]


class TenantBudget(BaseModel):
    tenant: str
    budget: BudgetView | None = Field(description="null: the tenant has no budget.")
    spend: BudgetSpend | None = Field(description="This period's; null without a budget.")
    alerts: list[BudgetAlert] = Field(description="This period's, oldest first.")
