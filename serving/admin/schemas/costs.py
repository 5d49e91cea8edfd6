"""Bodies of costs: the cost report's query, rows and totals, and the monthly invoice
with its statements per tenant."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from serving.admin.schemas.common import Day, Instant, Name, Strict

GroupBy = Annotated[
    str, StringConstraints(pattern=r"^((tenant|model|version|device|day)(,|$))*$", max_length=64)
]


class CostQuery(Strict):
    from_: Day | Instant | None = Field(
        default=None,
        alias="from",
        description="Start: a UTC day (2026-11-01) or a time; default: this month's first.",
    )
    to: Day | Instant | None = Field(
        default=None, description="End: a UTC day (included whole) or a time; default: now."
    )
    group_by: GroupBy = Field(
        default="tenant", description="Comma list of tenant, model, version, device, day."
    )
    share_idle: bool = Field(default=False, description="Spread idle capacity over tenants.")
    tenant: Name | None = Field(default=None, description="Only this tenant's usage, no idle.")


class CostFigures(BaseModel):
    requests: int
    rows: int
    used_ns: int
    idle_ns: int
    gpu_seconds: float
    gpu_hours: float
    cost: str = Field(description="Decimal, in the currency.")
    currency: str


class CostGroup(BaseModel):
    """The group_by keys of a row; only those asked for are present."""

    tenant: str | None = None
    model: str | None = None
    version: str | None = None
    device: str | None = None
    day: str | None = None


class CostRow(CostFigures, CostGroup):
    pass


class CostTotals(CostFigures):
    reserved_ns: int
    reserved_gpu_seconds: float


class CostReport(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: datetime = Field(alias="from")
    to: datetime
    group_by: list[str]
    currency: str
    rows: list[CostRow] = Field(description="Only the group_by keys are present in a row.")
    totals: CostTotals


# YYYY-MM, from 0001-01 to 9999-12 (serving.costs.invoice.PERIOD, without a lookahead).
Period = Annotated[
    str,
    StringConstraints(
        pattern=r"^([1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])-(0[1-9]|1[0-2])$"
    ),
]


class InvoiceQuery(Strict):
    period: Period = Field(description="The calendar month, YYYY-MM, in UTC.")
    tenant: Name | None = Field(
        default=None, description="Only this tenant's statement (its idle share included)."
    )
    share_idle: bool = Field(
        default=False, description="Bill each tenant its share of idle capacity, by use."
    )


class InvoiceLine(CostFigures):
    model: str
    version: str
    device: str


class InvoiceSection(BaseModel):
    lines: list[InvoiceLine] = Field(description="One per model, version and device.")
    totals: CostFigures


class InvoiceBudget(BaseModel):
    unit: str = Field(description="A currency code, or device_hours.")
    amount: str
    spent: str = Field(description="The tenant's own usage in the month (no idle share).")
    overrun: str = Field(description="What was spent past the amount (0 within it).")
    exhausted: bool


class InvoiceStatement(InvoiceSection):
    tenant: str
    budget: InvoiceBudget | None = Field(
        default=None, description="The tenant's monthly budget as it stands now; null: none."
    )


class CostInvoice(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    period: str
    from_: datetime = Field(alias="from")
    to: datetime
    closed: bool = Field(description="The month is over: its figures no longer grow.")
    currency: str
    share_idle: bool
    tenant: str | None = Field(description="The tenant asked for; null: every tenant.")
    statements: list[InvoiceStatement] = Field(
        description="One per tenant with usage in the month; with tenant, that tenant's."
    )
    idle: InvoiceSection | None = Field(
        description="Idle capacity billed to no tenant; null with tenant."
    )
    totals: CostFigures = Field(description="The statements' and the idle section's sum.")
