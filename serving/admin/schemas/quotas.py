"""Bodies of tenants' rate quotas: token buckets of requests and of rows per second."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from serving.admin.schemas.common import Name, Strict, TenantModel
from serving.tenancy import MAX_RATE, MIN_RATE

PerSecond = Annotated[float, Field(ge=MIN_RATE, le=MAX_RATE, strict=True)]
Burst = Annotated[float, Field(ge=1, le=MAX_RATE, strict=True)]


class RateSetting(Strict):
    """A token bucket."""

    per_s: PerSecond = Field(description="Tokens (requests, or rows) per second.")
    burst: Burst | None = Field(
        default=None,
        description="Tokens held at most, taken at once after idling; default: one second's "
        "worth. A request of more rows than a rows burst is refused 413.",
    )


class QuotaLimits(Strict):
    """A kind left out (or null) is no quota of that kind; neither removes the quota."""

    requests: RateSetting | None = Field(default=None, description="Requests per second.")
    rows: RateSetting | None = Field(default=None, description="Rows per second.")


class QuotaSetting(QuotaLimits):
    """A tenant's quota over every model, or for one model."""

    model: Name | None = Field(
        default=None, description="The model it is for; left out: every model together."
    )


# additionalProperties false: the description says that a key must match the pattern
# (pydantic writes patternProperties only, which leave other keys open).
Quotas = Annotated[
    dict[TenantModel, QuotaLimits],
    Field(max_length=257, json_schema_extra={"additionalProperties": False}),
]


class TenantQuota(BaseModel):
    model: str | None = Field(description="null: the quota over every model together.")
    requests: RateSetting | None
    rows: RateSetting | None
