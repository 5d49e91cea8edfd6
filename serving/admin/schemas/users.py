"""Bodies of the admin API's users: who is calling, users' tokens and their roles."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from serving.admin.schemas.common import Expiry, Name, Strict, Text
from serving.tenancy import Role


class Caller(BaseModel):
    name: str
    role: str


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
