"""Bodies of tenants: their grants, weights, in-flight caps, quotas and budget at
creation, changes, suspension, and a tenant as listed."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from router import DEFAULT_PRIORITY_LEVEL, MAX_PRIORITY_LEVEL
from serving.admin.schemas.budgets import BudgetSetting
from serving.admin.schemas.common import Name, Strict, TenantModel, Whole, encodable
from serving.admin.schemas.quotas import Quotas
from serving.tenancy import MAX_BYTES_CAP, MAX_REQUESTS_CAP

PriorityLevel = Annotated[int, Field(ge=1, le=MAX_PRIORITY_LEVEL, strict=True), Whole]
_PRIORITIES = (
    f"Priority levels the tenant may ask for (1 most urgent .. {MAX_PRIORITY_LEVEL}); the "
    f"default level {DEFAULT_PRIORITY_LEVEL} is always granted, other levels are refused 403."
)
_MAX_REQUESTS = "Cap on the tenant's requests in flight; null: the server's default."
_MAX_BYTES = (
    "Cap on the input bytes of the tenant's requests in flight; null: the server's default."
)
RequestsCap = Annotated[int, Field(ge=0, le=MAX_REQUESTS_CAP, strict=True), Whole]
BytesCap = Annotated[int, Field(ge=0, le=MAX_BYTES_CAP, strict=True), Whole]
# strict: a JSON true is not the number 1.
Weight = Annotated[float, Field(gt=0, le=1000, strict=True)]
_QUOTAS = "Rate quotas by model, '*' for the quota over every model together."


class NewTenant(Strict):
    name: Name
    weight: Weight = Field(default=1.0, description="Fair-share weight.")
    models: list[TenantModel] = Field(
        default=["*"], min_length=1, max_length=256, description="'*' for every model."
    )
    priorities: list[PriorityLevel] = Field(
        default=[DEFAULT_PRIORITY_LEVEL], max_length=MAX_PRIORITY_LEVEL, description=_PRIORITIES
    )
    max_requests_in_flight: RequestsCap | None = Field(default=None, description=_MAX_REQUESTS)
    max_bytes_in_flight: BytesCap | None = Field(default=None, description=_MAX_BYTES)
    quotas: Quotas = Field(default={}, description=_QUOTAS)
    budget: BudgetSetting | None = Field(
        default=None, description="Its budget (see PUT /tenants/{name}/budget); none if left out."
    )


class TenantChange(Strict):
    """The fields to change; a field left out stays as it is."""

    weight: Weight | None = Field(default=None, description="Fair-share weight.")
    models: list[TenantModel] | None = Field(
        default=None, min_length=1, max_length=256, description="'*' for every model."
    )
    priorities: list[PriorityLevel] | None = Field(
        default=None, max_length=MAX_PRIORITY_LEVEL, description=_PRIORITIES
    )
    max_requests_in_flight: RequestsCap | None = Field(default=None, description=_MAX_REQUESTS)
    max_bytes_in_flight: BytesCap | None = Field(default=None, description=_MAX_BYTES)
    quotas: Quotas | None = Field(
        default=None, description=_QUOTAS + " Each replaces the quota of its model; others stay."
    )


class TenantKey(BaseModel):
    tenant: str
    api_key: str = Field(description="Shown once; only its sha256 is stored.")


class DeletedTenant(BaseModel):
    tenant: str
    deleted: bool


class Tenant(BaseModel):
    tenant: str
    weight: float
    models: list[str]
    source: str = Field(description="'config' (from the config file) or 'cli'.")
    priorities: list[int] = Field(description="Granted priority levels.")
    max_requests_in_flight: int | None = Field(description=_MAX_REQUESTS)
    max_bytes_in_flight: int | None = Field(description=_MAX_BYTES)
    status: Literal["active", "suspended", "deleted"] = Field(
        default="active", description="Whether the tenant's requests are served."
    )
    suspended_at: datetime | None = None
    suspended_reason: str | None = Field(
        default=None, description="What a suspended tenant's refused requests are told."
    )
    deleted_at: datetime | None = None


# One line of printable text: every refused request of the tenant carries it.
SuspendReason = Annotated[
    str,
    StringConstraints(
        max_length=1000, pattern=r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
    ),
    AfterValidator(encodable),
]


class Suspension(Strict):
    reason: SuspendReason = Field(
        description="Why; every refused request of the tenant is told it (403)."
    )
