"""Bodies of tenants' API keys: issuing, rotating with a grace period, revoking, and a
key as listed (never the key, nor its hash)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from serving.admin.schemas.common import Expiry, Strict, Text, Whole

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
