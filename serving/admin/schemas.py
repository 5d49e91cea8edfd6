"""The admin API's request and response bodies; the OpenAPI description is generated
from these.

Every string a caller sends is checked before it reaches the database: names match
the config's name pattern, free text holds no NUL (PostgreSQL refuses it) and no lone
surrogate (no database can encode it), times are RFC 3339 with their zone, numbers are
finite. The patterns are part of the generated description.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from router import DEFAULT_PRIORITY_LEVEL, MAX_PRIORITY_LEVEL
from serving.config import NAME_PATTERN
from serving.rollout import RolloutSpec
from serving.tenancy import MAX_BYTES_CAP, MAX_RATE, MAX_REQUESTS_CAP, MIN_RATE, Role


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return text


def _shaped(shape: re.Pattern[str], what: str) -> BeforeValidator:
    """Take only strings of ``shape`` (pydantic would also take e.g. Unix times)."""

    def check(value: object) -> object:
        if not isinstance(value, str) or not shape.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value

    return BeforeValidator(check)


Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN.pattern)]
Text = Annotated[
    str, StringConstraints(max_length=4096, pattern=r"^[^\x00]*$"), AfterValidator(_encodable)
]
Reason = Annotated[  # not blank
    str,
    StringConstraints(max_length=4096, pattern=r"^[^\x00]*\S[^\x00]*$"),
    AfterValidator(_encodable),
]
Day = Annotated[date, _shaped(re.compile(r"^\d{4}-\d{2}-\d{2}$"), "a day, YYYY-MM-DD")]


def _in_utc(value: datetime) -> datetime:
    """The time in UTC; one whose UTC form is past what a datetime holds (0001-01-01 at
    +01:00, 9999-12-31 at -01:00) is clamped to the first or last UTC instant."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return (datetime.max if value.year > 1 else datetime.min).replace(tzinfo=UTC)


def _whole(value: object) -> object:
    """JSON Schema's integer: 2.0 is one, "2" and true are not (strict ints refuse 2.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Whole = BeforeValidator(_whole)


Instant = Annotated[
    datetime,
    _shaped(
        re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"),
        "an RFC 3339 time with its zone, e.g. 2026-11-01T12:00:00Z",
    ),
    AfterValidator(_in_utc),
]
GroupBy = Annotated[
    str, StringConstraints(pattern=r"^((tenant|model|version|device|day)(,|$))*$", max_length=64)
]


class Strict(BaseModel):
    """A request body or query: unknown keys and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# -- users, tenants ----------------------------------------------------------------


class Caller(BaseModel):
    name: str
    role: str


_MAX_LIFE_S = 3660 * 86_400  # serving.tenancy.users.MAX_TOKEN_LIFE


class Expiry(Strict):
    """When a token (or key) stops working: at most one of the two; neither: it does not
    expire."""

    expires_at: Instant | None = Field(
        default=None, description="The token (or key) is refused from this time on."
    )
    expires_in_s: Annotated[int, Field(ge=1, le=_MAX_LIFE_S, strict=True), Whole] | None = Field(
        default=None,
        description="The token (or key) is refused this many seconds after the gateway "
        "receives this.",
    )

    @model_validator(mode="after")
    def _one(self) -> Expiry:
        if self.expires_at is not None and self.expires_in_s is not None:
            raise ValueError("give expires_at or expires_in_s, not both")
        return self

    def deadline(self) -> datetime | None:
        if self.expires_in_s is not None:
            return datetime.now(UTC) + timedelta(seconds=self.expires_in_s)
        return self.expires_at

    @property
    def given(self) -> bool:
        return self.expires_at is not None or self.expires_in_s is not None


class NewUser(Expiry):
    name: Name
    role: Role


class Rotation(Expiry):
    """A new token; the expiry is kept unless one is given or ``never_expires``."""

    never_expires: bool = Field(default=False, strict=True, description="Drop the token's expiry.")
    reason: Text = Field(default="", description="Why; kept in the audit record.")

    @model_validator(mode="after")
    def _never_or_when(self) -> Rotation:
        if self.never_expires and self.given:
            raise ValueError("never_expires and an expiry do not go together")
        return self


class UserChange(Strict):
    reason: Text = Field(default="", description="Why; kept in the audit record.")


class CreatedUser(BaseModel):
    user: str
    role: str
    token: str = Field(description="Shown once; only its sha256 is stored.")
    expires_at: datetime | None = None


class User(BaseModel):
    user: str
    role: str
    created_by: str
    created_at: datetime
    status: Literal["active", "disabled", "expired"] = Field(
        description="Whether the user's token is accepted now."
    )
    disabled_at: datetime | None = None
    expires_at: datetime | None = None


class DeletedUser(BaseModel):
    user: str
    deleted: bool


TenantModel = Annotated[str, StringConstraints(pattern=f"^[*]$|{NAME_PATTERN.pattern}")]
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


# -- rate quotas -------------------------------------------------------------------

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
_QUOTAS = "Rate quotas by model, '*' for the quota over every model together."


class TenantQuota(BaseModel):
    model: str | None = Field(description="null: the quota over every model together.")
    requests: RateSetting | None
    rows: RateSetting | None


# -- budgets ---------------------------------------------------------------------


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
    AfterValidator(_encodable),
]


class Suspension(Strict):
    reason: SuspendReason = Field(
        description="Why; every refused request of the tenant is told it (403)."
    )


KeyLabel = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
# serving.tenancy.MAX_GRACE
_MAX_GRACE_S = 30 * 86_400


class NewKey(Expiry):
    label: KeyLabel = Field(default="default", description="What the key is for, e.g. ci.")


class KeyRotation(Expiry):
    """The new key's expiry (none unless given) and how long the old key keeps working."""

    grace_s: Annotated[int, Field(ge=0, le=_MAX_GRACE_S, strict=True), Whole] = Field(
        default=0,
        description="The old key keeps working this many seconds (0: it is revoked at once).",
    )


class KeyRevocation(Strict):
    reason: Text = Field(default="", description="Why; kept in the audit record.")


class ApiKey(BaseModel):
    """A key as listed: never the key, nor its hash."""

    tenant: str
    key_id: int
    label: str
    fingerprint: str = Field(
        description="The first 12 hex digits of the key's sha256, to tell keys apart."
    )
    status: Literal["active", "expired", "revoked"]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(
        description="Recorded by the gateways about once a minute, so up to a minute or two behind."
    )


class IssuedKey(BaseModel):
    tenant: str
    key_id: int
    label: str
    api_key: str = Field(description="Shown once; only its sha256 is stored.")
    fingerprint: str
    created_at: datetime
    expires_at: datetime | None


class RotatedKey(IssuedKey):
    old_key: ApiKey = Field(description="The key rotated out, with when it stops working.")


# -- audit -------------------------------------------------------------------------


class AuditRecord(BaseModel):
    seq: int
    at: datetime
    actor: str
    action: str
    target: str
    before: Any = Field(description="The target before the change (JSON), or null.")
    after: Any = Field(description="The target after the change (JSON), or null.")
    reason: str
    prev_hash: str
    hash: str


class AuditCheck(BaseModel):
    ok: bool
    records: int
    problem: str = Field(description="The first record changed, inserted or removed.")
    first_bad_seq: int | None
    anchored_seq: int | None = Field(
        default=None,
        description="The newest record this gateway's anchor file holds, found intact; "
        "null when it anchored none.",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What the check could not establish, e.g. no anchor on this gateway "
        "to check the end of the log against, or a log not yet sealed with the key.",
    )


# -- models ------------------------------------------------------------------------


class Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class Signature(BaseModel):
    inputs: list[Tensor]
    outputs: list[Tensor]


class Lineage(BaseModel):
    parent_version: str | None
    source_uri: str | None
    dataset_digest: str | None
    code_revision: str | None


class Version(BaseModel):
    name: str
    version: str
    format: str
    sha256: str
    size_bytes: int
    model_class: str | None
    model_kwargs: dict[str, Any]
    signature: Signature
    metrics: dict[str, float]
    lineage: Lineage
    author: str
    created_at: datetime
    stage: str
    stage_changed_at: datetime


class Approval(BaseModel):
    approver: str
    decision: Literal["approve", "reject"]
    reason: str
    at: datetime


class VersionDetail(Version):
    approvals: list[Approval]


class Decision(Strict):
    reason: Reason


class Promotion(Strict):
    to: Literal["staging", "production"]


class Note(Strict):
    reason: Text = ""


Tensors = list[Annotated[str, StringConstraints(max_length=512), AfterValidator(_encodable)]]


class NewVersion(Strict):
    """Query parameters of an upload; the body is the artifact's bytes."""

    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="The artifact's sha256, as the sender computed it; the upload is "
        "refused if the bytes received hash otherwise."
    )
    format: Literal["torchscript", "export", "safetensors"]
    model_class: Annotated[str, StringConstraints(max_length=300)] | None = Field(
        default=None, description="For safetensors: 'package.module:Class'."
    )
    model_kwargs: Annotated[str, StringConstraints(max_length=4096)] | None = Field(
        default=None, description="JSON object of keyword arguments for model_class."
    )
    input: Tensors = Field(
        default=[], max_length=64, description="NAME:DATATYPE:DIMS, e.g. pixels:FP32:64."
    )
    output: Tensors = Field(default=[], max_length=64, description="NAME:DATATYPE:DIMS.")
    metric: Tensors = Field(
        default=[], max_length=64, description="NAME=VALUE, e.g. accuracy=0.97."
    )
    parent: Name | None = Field(default=None, description="The version it derives from.")
    source: Text | None = Field(default=None, description="URI of the run that produced it.")
    dataset_digest: Annotated[Text, StringConstraints(max_length=200)] | None = None
    code_revision: Annotated[Text, StringConstraints(max_length=200)] | None = None
    version: Name | None = Field(default=None, description="Default: the next integer.")


# -- rollouts ----------------------------------------------------------------------


class NewRollout(RolloutSpec):
    """A rollout's candidate version and its settings (see ``gpugate rollout start``)."""

    model_config = ConfigDict(allow_inf_nan=False)

    version: Name
    sticky: Annotated[str, StringConstraints(max_length=200)] | None = None


class RolloutSettings(BaseModel):
    steps: list[int]
    interval_s: float
    max_error_rate: float
    max_p99_ratio: float
    min_requests: int
    failure_threshold: int
    sticky: str | None
    mirror_pct: float
    min_agreement: float
    min_deadline_ms: float = Field(
        description="A deadline expiry counts as an error only for deadlines at least this long."
    )


class Rollout(BaseModel):
    id: int
    model: str
    candidate: str
    production: str
    state: str
    step: int = Field(description="1-based.")
    steps: int
    weights: dict[str, float] = Field(description="Version -> share of default traffic.")
    failures: int
    settings: RolloutSettings
    last_analysis: dict[str, Any] | None = Field(
        description="The figures of the last analysis: each version's requests, errors, "
        "p99, the shadow comparison, each check with its value and limit."
    )
    created_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class RolloutEvent(BaseModel):
    at: datetime
    actor: str
    action: str
    step: int
    weight: float = Field(description="The candidate's share after the event.")
    figures: dict[str, Any] | None
    reason: str


class RolloutStatus(Rollout):
    history: list[RolloutEvent]


# -- costs -------------------------------------------------------------------------


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
