"""A tenant's API keys: several per tenant, each with a label, an optional expiry, a
creation and a last-used time; revoked or rotated one at a time.

Keys are generated here and shown once; only their sha256 is stored
(``tenant_keys``). A rotation issues a new key with the same label and lets the old
one work for a grace period, so that clients can switch without a failed request. A
config tenant's one key comes from its environment variable, so its keys are not
managed here. Every change is audited.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from serving.state import audit, utcnow
from serving.state import tenant_keys as t_keys
from serving.state import tenants as t_tenants
from serving.tenancy.records import (
    DEFAULT_LABEL,
    KeyStateError,
    TenantNotFoundError,
    aware,
    aware_ts,
    config_managed,
    insert_key,
    when,
)

KeyStatus = Literal["active", "expired", "revoked"]
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A key may be given a life of up to this; beyond it, leave the expiry unset.
MAX_KEY_LIFE = timedelta(days=3660)
# The longest an old key may keep working after a rotation.
MAX_GRACE = timedelta(days=30)
# Enough of the key's sha256 to tell keys apart and to match a key one holds
# (``printf %s KEY | sha256sum``); far too little to stand for the key.
FINGERPRINT_CHARS = 12


class KeyNotFoundError(TenantNotFoundError):
    pass


@dataclass(frozen=True)
class KeyRow:
    """A key as listed: never the key, nor more of its hash than the fingerprint."""

    id: int
    tenant: str
    label: str
    fingerprint: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def status(self, now: datetime | None = None) -> KeyStatus:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return "expired"
        return "active"

    def as_json(self, now: datetime | None = None) -> dict[str, Any]:
        """The listed form of the key (the admin API's and the tenant's own view)."""
        return {
            "tenant": self.tenant,
            "key_id": self.id,
            "label": self.label,
            "fingerprint": self.fingerprint,
            "status": self.status(now),
            "created_at": self.created_at.isoformat(),
            "expires_at": when(self.expires_at),
            "revoked_at": when(self.revoked_at),
            "last_used_at": when(self.last_used_at),
        }


@dataclass(frozen=True)
class IssuedKey:
    """A new key: its row and the key itself (shown once)."""

    row: KeyRow
    api_key: str


def checked_label(label: str) -> str:
    if not LABEL_PATTERN.fullmatch(label):
        raise ValueError(f"key label {label!r} must match {LABEL_PATTERN.pattern}")
    return label


def checked_expiry(expires_at: datetime | None, now: datetime) -> datetime | None:
    if expires_at is None:
        return None
    if expires_at.tzinfo is None:
        raise ValueError("expires_at needs a time zone")
    expires_at = aware_ts(expires_at)
    if expires_at <= now:
        raise ValueError(f"expires_at {expires_at.isoformat()} is not in the future")
    if expires_at - now > MAX_KEY_LIFE:
        raise ValueError(f"expires_at is over {MAX_KEY_LIFE.days} days away")
    return expires_at


def _key_row(tenant: str, r: Any) -> KeyRow:
    return KeyRow(
        id=int(r.id),
        tenant=tenant,
        label=r.label,
        fingerprint=r.key_hash.strip()[:FINGERPRINT_CHARS],
        created_at=aware_ts(r.created_at),
        expires_at=aware(r.expires_at),
        revoked_at=aware(r.revoked_at),
        last_used_at=aware(r.last_used_at),
    )


def _described(k: KeyRow) -> dict[str, Any]:
    """The audit record's form of a key."""
    return {
        "key_id": k.id,
        "label": k.label,
        "fingerprint": k.fingerprint,
        "expires_at": when(k.expires_at),
        "revoked_at": when(k.revoked_at),
    }


class TenantKeyStore:
    """Issues, lists, revokes and rotates tenants' keys. Blocking; call from a thread in
    async code."""

    def __init__(self, engine: sa.Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.now = clock

    def _tenant(self, conn: sa.Connection, name: str, *, change: bool = True) -> Any:
        row = conn.execute(
            sa.select(
                t_tenants.c.id, t_tenants.c.name, t_tenants.c.source, t_tenants.c.deleted_at
            ).where(t_tenants.c.name == name)
        ).first()
        if row is None:
            raise TenantNotFoundError(f"no tenant {name!r}")
        if change and row.deleted_at is not None:
            raise TenantNotFoundError(
                f"no tenant {name!r}: it was deleted at {aware_ts(row.deleted_at).isoformat()}"
            )
        if change and row.source == "config":
            raise config_managed(
                name, "its one key is the one in its api_key_env variable: change it there"
            )
        return row

    def _key(self, conn: sa.Connection, tenant: Any, key_id: int) -> KeyRow:
        row = conn.execute(
            sa.select(t_keys).where(t_keys.c.id == key_id, t_keys.c.tenant_id == tenant.id)
        ).first()
        if row is None:
            raise KeyNotFoundError(f"tenant {tenant.name!r} has no key {key_id}")
        return _key_row(tenant.name, row)

    def create(
        self,
        tenant: str,
        label: str = DEFAULT_LABEL,
        *,
        expires_at: datetime | None = None,
        actor: str = "system",
    ) -> IssuedKey:
        """A new key of a CLI tenant (suspended ones too); audited."""
        checked_label(label)
        now = self.now()
        expiry = checked_expiry(expires_at, now)
        with audit.audited(self.engine) as tx:
            row = self._tenant(tx.conn, tenant)
            key, key_id = insert_key(tx.conn, row.id, label, now, expiry)
            made = self._key(tx.conn, row, key_id)
            tx.append(actor, "tenant.key.create", f"tenant:{tenant}", after=_described(made))
        return IssuedKey(made, key)

    def list(self, tenant: str) -> builtins.list[KeyRow]:
        """Every key of the tenant, revoked and expired ones too, oldest first (a
        deleted tenant's as well: they are its record)."""
        with self.engine.connect() as conn:
            row = self._tenant(conn, tenant, change=False)
            keys = conn.execute(
                sa.select(t_keys).where(t_keys.c.tenant_id == row.id).order_by(t_keys.c.id)
            ).all()
        return [_key_row(tenant, k) for k in keys]

    def newest(self, tenant: str, limit: int) -> tuple[builtins.list[KeyRow], int]:
        """At most ``limit`` of the tenant's keys, the unrevoked ones first, newest first
        within each; and how many keys it has in all."""
        with self.engine.connect() as conn:
            row = self._tenant(conn, tenant, change=False)
            mine = t_keys.c.tenant_id == row.id
            total = conn.execute(
                sa.select(sa.func.count()).select_from(t_keys).where(mine)
            ).scalar_one()
            keys = conn.execute(
                sa.select(t_keys)
                .where(mine)
                .order_by(t_keys.c.revoked_at.is_(None).desc(), t_keys.c.id.desc())
                .limit(limit)
            ).all()
        return [_key_row(tenant, k) for k in keys], int(total)

    def revoke(
        self, tenant: str, key_id: int, *, actor: str = "system", reason: str = ""
    ) -> KeyRow:
        """Refuse the key from now on (within the gateways' key cache TTL); audited.
        Revoking a revoked key changes nothing."""
        now = self.now()
        with audit.audited(self.engine) as tx:
            row = self._tenant(tx.conn, tenant)
            key = self._key(tx.conn, row, key_id)
            if key.revoked_at is not None:
                return key
            tx.conn.execute(t_keys.update().where(t_keys.c.id == key.id).values(revoked_at=now))
            done = self._key(tx.conn, row, key.id)
            tx.append(
                actor,
                "tenant.key.revoke",
                f"tenant:{tenant}",
                before=_described(key),
                after=_described(done),
                reason=reason,
            )
            return done

    def rotate(
        self,
        tenant: str,
        key_id: int,
        *,
        grace: timedelta = timedelta(0),
        expires_at: datetime | None = None,
        actor: str = "system",
    ) -> tuple[IssuedKey, KeyRow]:
        """A new key with the old one's label (and ``expires_at``, none by default); the
        old key keeps working for ``grace`` (at most until its own expiry), or is revoked
        now if the grace is zero. Returns the new key and the old key's row; audited."""
        if not timedelta(0) <= grace <= MAX_GRACE:
            raise ValueError(f"the grace must be between 0 and {MAX_GRACE.days} days")
        now = self.now()
        expiry = checked_expiry(expires_at, now)
        with audit.audited(self.engine) as tx:
            row = self._tenant(tx.conn, tenant)
            old = self._key(tx.conn, row, key_id)
            state = old.status(now)
            if state != "active":
                raise KeyStateError(
                    f"key {key_id} of tenant {tenant!r} is {state}; create a new key instead "
                    f"(gpugate tenants keys create {tenant} --label {old.label})"
                )
            if grace:
                end = now + grace
                if old.expires_at is None or end < old.expires_at:
                    tx.conn.execute(
                        t_keys.update().where(t_keys.c.id == old.id).values(expires_at=end)
                    )
            else:
                tx.conn.execute(t_keys.update().where(t_keys.c.id == old.id).values(revoked_at=now))
            key, new_id = insert_key(tx.conn, row.id, old.label, now, expiry)
            made = self._key(tx.conn, row, new_id)
            ended = self._key(tx.conn, row, old.id)
            tx.append(
                actor,
                "tenant.key.rotate",
                f"tenant:{tenant}",
                before=_described(old),
                after={"old": _described(ended), "new": _described(made)},
                reason=f"grace {int(grace.total_seconds())}s",
            )
        return IssuedKey(made, key), ended
