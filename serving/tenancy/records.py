"""What the tenant modules share: the errors, keys and their hashes, the rows as the
CLI and the router see them, and the statements on ``tenant_keys`` that several changes
make (:mod:`serving.tenancy.tenants`, :mod:`serving.tenancy.config_tenants`,
:mod:`serving.tenancy.keys`)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa

from router import Tenant
from serving.config import NAME_PATTERN, tenant_name
from serving.state import tenant_keys as t_keys
from serving.tenancy.admission import NO_GRANTS, Admission

Source = Literal["config", "cli"]
Status = Literal["active", "suspended", "deleted"]
MAX_KEY_LENGTH = 256
# A config key is chosen by a person, not generated: a short one could be guessed.
MIN_CONFIG_KEY_LENGTH = 16
MAX_WEIGHT = 1000.0  # same bound as TenantConfig.weight
MAX_REASON_LENGTH = 1000
DEFAULT_LABEL = "default"
# A key must survive an HTTP header or gRPC metadata value unchanged: printable
# ASCII without spaces (header parsing strips surrounding whitespace).
KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")
HASH = re.compile(r"^[0-9a-f]{64}$")


class TenantError(Exception):
    """Base of the tenant errors; the message is meant for the operator."""


class TenantExistsError(TenantError):
    pass


class TenantDeletedError(TenantExistsError):
    """The name belongs to a deleted tenant, whose usage history keeps it."""


class TenantNotFoundError(TenantError):
    pass


class TenantKeyMissingError(TenantError):
    def __init__(self, tenant: str, env_var: str) -> None:
        super().__init__(
            f"tenant {tenant!r}: environment variable {env_var} (its api_key_env) is not "
            "set or is empty"
        )
        self.tenant = tenant
        self.env_var = env_var


class TenantKeyConflictError(TenantError):
    """A configured key is unusable or already belongs to another tenant."""


class KeyStateError(TenantError):
    """The state of the tenant's keys forbids the change (e.g. rotating a revoked key)."""


class TenantLookupError(TenantError):
    """The state database failed during authentication (map to 503, not 401)."""


def generate_api_key() -> str:
    return "gg_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # A plain (unsalted, fast) hash is enough: keys are 256 random bits, so there is
    # nothing to brute-force, and authentication must be able to look a row up by it.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def usable_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_LENGTH and KEY_CHARS.fullmatch(key) is not None


def aware(ts: datetime | None) -> datetime | None:
    """``ts`` in UTC; SQLite hands timestamps back without a zone (written as UTC)."""
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def aware_ts(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def when(ts: datetime | None) -> str | None:
    """The audit record's form of a time."""
    return None if ts is None else ts.isoformat()


def checked_reason(reason: str) -> str:
    """A suspension's reason: said to every refused client, so short and printable."""
    text = reason.strip()
    if not text:
        raise ValueError("give a reason: it is what the tenant's refused requests say")
    if len(text) > MAX_REASON_LENGTH or any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise ValueError(
            f"the reason must be at most {MAX_REASON_LENGTH} characters on one line, "
            "without control characters"
        )
    return text


@dataclass(frozen=True)
class TenantRow:
    """A tenant as listed by the CLI. Deliberately carries no key or key hash."""

    name: str
    weight: float
    models: tuple[str, ...]
    source: Source
    created_at: datetime
    updated_at: datetime
    admission: Admission = NO_GRANTS
    suspended_at: datetime | None = None
    suspended_reason: str | None = None
    deleted_at: datetime | None = None

    @property
    def status(self) -> Status:
        if self.deleted_at is not None:
            return "deleted"
        return "suspended" if self.suspended_at is not None else "active"

    def tenant(self) -> Tenant:
        return make_tenant(self.name, self.weight, self.models, self.admission, self.suspension)

    @property
    def suspension(self) -> str | None:
        if self.suspended_at is None:
            return None
        return self.suspended_reason or "suspended by an operator"


def make_tenant(
    name: str,
    weight: float,
    models: Iterable[str],
    admission: Admission,
    suspended: str | None = None,
) -> Tenant:
    return Tenant(
        name,
        weight,
        frozenset(models),
        frozenset(admission.priorities),
        admission.max_requests_in_flight,
        admission.max_bytes_in_flight,
        suspended=suspended,
    )


def validate(name: str, weight: float, models: Iterable[str]) -> tuple[str, ...]:
    tenant_name(name)
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise ValueError(f"tenant weight must be > 0 and <= {MAX_WEIGHT:g}, got {weight!r}")
    checked = tuple(dict.fromkeys(models))  # dedupe, keep order
    if not checked:
        raise ValueError("a tenant needs at least one model ('*' for all)")
    for m in checked:
        if m != "*" and not NAME_PATTERN.fullmatch(m):
            raise ValueError(f"model name {m!r} must be '*' or match {NAME_PATTERN.pattern}")
    return checked


def insert_key(
    conn: sa.Connection,
    tenant_id: int,
    label: str,
    now: datetime,
    expires_at: datetime | None = None,
) -> tuple[str, int]:
    """A new key of the tenant: (the key, shown once; its id)."""
    key = generate_api_key()
    result = conn.execute(
        t_keys.insert().values(
            tenant_id=tenant_id,
            label=label,
            key_hash=hash_key(key),
            created_at=now,
            expires_at=expires_at,
        )
    )
    return key, inserted_id(result)


def live_keys(conn: sa.Connection, tenant_id: int, now: datetime) -> list[Any]:
    """The tenant's keys that authenticate now, oldest first."""
    return [
        k
        for k in conn.execute(
            sa.select(t_keys)
            .where(t_keys.c.tenant_id == tenant_id, t_keys.c.revoked_at.is_(None))
            .order_by(t_keys.c.id)
        )
        if k.expires_at is None or aware_ts(k.expires_at) > now
    ]


def revoke_keys(conn: sa.Connection, tenant_id: int, now: datetime) -> int:
    """Revoke every key of the tenant not revoked yet; how many were."""
    done = conn.execute(
        t_keys.update()
        .where(t_keys.c.tenant_id == tenant_id, t_keys.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(done.rowcount)


def config_managed(name: str, what: str) -> TenantError:
    return TenantError(f"tenant {name!r} is managed by the config file; {what}")


def tenant_row(r: Any) -> TenantRow:
    return TenantRow(
        name=r.name,
        weight=float(r.weight),
        models=tuple(json.loads(r.models)),
        source=r.source,
        created_at=aware_ts(r.created_at),
        updated_at=aware_ts(r.updated_at),
        admission=Admission.of_row(r),
        suspended_at=aware(r.suspended_at),
        suspended_reason=r.suspended_reason,
        deleted_at=aware(r.deleted_at),
    )


def described(row: Any) -> dict[str, Any]:
    return {
        "name": row.name,
        "weight": float(row.weight),
        "models": json.loads(row.models),
        **Admission.of_row(row).described(),
    }


def inserted_id(result: sa.CursorResult[Any]) -> int:
    """The id the database gave the row ``result`` inserted."""
    (new_id,) = result.inserted_primary_key or (None,)
    if new_id is None:
        raise RuntimeError("the database returned no id for the new row")
    return int(new_id)
