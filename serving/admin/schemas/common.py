"""What every admin API body shares: the strict base of request bodies and queries, and
the checked scalars (names, free text, days, times, expiries).

Every string a caller sends is checked before it reaches the database: names match
the config's name pattern, free text holds no NUL (PostgreSQL refuses it) and no lone
surrogate (no database can encode it), times are RFC 3339 with their zone, numbers are
finite. The patterns are part of the generated description.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from serving.config import NAME_PATTERN


def encodable(text: str) -> str:
    """``text``, if it can be stored: no lone surrogate, which no database can encode."""
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
    str, StringConstraints(max_length=4096, pattern=r"^[^\x00]*$"), AfterValidator(encodable)
]
Reason = Annotated[  # not blank
    str,
    StringConstraints(max_length=4096, pattern=r"^[^\x00]*\S[^\x00]*$"),
    AfterValidator(encodable),
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


class Strict(BaseModel):
    """A request body or query: unknown keys and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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


class Note(Strict):
    reason: Text = ""


# A model a tenant may be granted or have a quota for: a model's name, or '*' for every model.
TenantModel = Annotated[str, StringConstraints(pattern=f"^[*]$|{NAME_PATTERN.pattern}")]
