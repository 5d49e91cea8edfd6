"""Users of the admin API (and so of the CLI, its client): roles, tokens, and the one
role -> action table.

A user's token is shown once at creation (and at each rotation); only its sha256 is
stored, and checks re-compare in constant time. A user may be disabled, given an
expiry, rotated or deleted; each change is audited, and a refused token stops
working within the token cache's TTL (:class:`UserDirectory`). The last enabled admin
can be neither disabled nor deleted. :data:`PERMISSIONS` is the single place that
says which role may do what; the gateway checks it on every admin request.
"""

from __future__ import annotations

import builtins
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, get_args

import sqlalchemy as sa

from serving.config import NAME_PATTERN
from serving.state import audit, utcnow
from serving.state import users as t_users
from serving.tenancy.tenants import _locked, _read_key_file, _write_key_file, hash_key

log = logging.getLogger(__name__)

Role = Literal["admin", "deployer", "approver", "finance", "auditor"]
ROLES: tuple[str, ...] = get_args(Role)
ADMIN_TOKEN_FILE = "admin.token"
BOOTSTRAP_ADMIN = "admin"
_HASH = re.compile(r"^[0-9a-f]{64}$")

# Which roles may do each action. Admins may do everything; separation of duties is
# the registry's rule that nobody approves a version they registered.
PERMISSIONS: dict[str, frozenset[str]] = {
    "users.create": frozenset({"admin"}),
    "users.list": frozenset({"admin", "auditor"}),
    "users.disable": frozenset({"admin"}),
    "users.enable": frozenset({"admin"}),
    "users.rotate": frozenset({"admin"}),
    "users.delete": frozenset({"admin"}),
    "tenants.create": frozenset({"admin"}),
    "tenants.delete": frozenset({"admin"}),
    "tenants.rotate": frozenset({"admin"}),
    "tenants.update": frozenset({"admin"}),
    "tenants.list": frozenset({"admin", "auditor"}),
    "tenants.suspend": frozenset({"admin"}),
    "tenants.resume": frozenset({"admin"}),
    "tenants.restore": frozenset({"admin"}),
    "tenants.keys.create": frozenset({"admin"}),
    "tenants.keys.list": frozenset({"admin", "auditor"}),
    "tenants.keys.revoke": frozenset({"admin"}),
    "tenants.keys.rotate": frozenset({"admin"}),
    "overview.read": frozenset(ROLES),
    "models.read": frozenset(ROLES),
    "models.register": frozenset({"admin", "deployer"}),
    "models.approve": frozenset({"admin", "approver"}),
    "models.promote": frozenset({"admin", "deployer"}),
    "audit.read": frozenset({"admin", "auditor"}),
    "costs.read": frozenset({"admin", "finance"}),
    "budgets.read": frozenset({"admin", "finance", "auditor"}),
    "budgets.write": frozenset({"admin", "finance"}),
}


@dataclass(frozen=True)
class Principal:
    """An authenticated user of the admin API: who acts, and with which role."""

    name: str
    role: str
    # When the token stops working (None: never); caches must not outlive it.
    expires_at: datetime | None = field(default=None, compare=False)


class UserError(Exception):
    """Base of the user errors; the message is meant for the operator."""


class UserExistsError(UserError):
    pass


class UserNotFoundError(UserError):
    pass


class LastAdminError(UserError):
    """The change would leave no enabled admin, and so nobody to undo it."""


class Forbidden(UserError):
    """The user's role may not do the action (HTTP 403)."""


def roles_for(action: str) -> list[str]:
    return sorted(PERMISSIONS.get(action, frozenset()))


def permits(principal: Principal, action: str) -> bool:
    return principal.role in PERMISSIONS.get(action, frozenset())


def check(principal: Principal, action: str) -> None:
    if not permits(principal, action):
        raise Forbidden(
            f"user {principal.name!r} (role {principal.role}) may not {action}; "
            f"needs {', '.join(roles_for(action)) or 'no role'}"
        )


def _validate(name: str, role: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"user name {name!r} must match {NAME_PATTERN.pattern}")
    if role not in ROLES:
        raise ValueError(f"role {role!r} must be one of {', '.join(ROLES)}")


_ANY_ADMIN = sa.select(t_users.c.id).where(t_users.c.role == "admin").limit(1)
# Tokens may be given a life of up to this; beyond it, leave the expiry unset.
MAX_TOKEN_LIFE = timedelta(days=3660)


def generate_token() -> str:
    return "ggu_" + secrets.token_urlsafe(32)


def _aware(ts: datetime | None) -> datetime | None:
    # SQLite hands timestamps back without a zone; they were written as UTC.
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _usable(disabled_at: datetime | None, expires_at: datetime | None, now: datetime) -> bool:
    expiry = _aware(expires_at)
    return disabled_at is None and (expiry is None or expiry > now)


def _expiry(expires_at: datetime | None, now: datetime) -> datetime | None:
    if expires_at is None:
        return None
    if expires_at.tzinfo is None:
        raise ValueError("expires_at needs a time zone")
    try:
        expires_at = expires_at.astimezone(UTC)
    except OverflowError:
        # 9999-12-31T23:59:59-01:00 is past the last datetime once in UTC (and year 1
        # ahead of UTC before the first): no time a token could be given.
        raise ValueError(f"expires_at {expires_at.isoformat()} is out of range") from None
    if expires_at <= now:
        raise ValueError(f"expires_at {expires_at.isoformat()} is not in the future")
    if expires_at - now > MAX_TOKEN_LIFE:
        raise ValueError(f"expires_at is over {MAX_TOKEN_LIFE.days} days away")
    return expires_at


def _when(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat()


@dataclass(frozen=True)
class UserRow:
    name: str
    role: str
    created_by: str
    created_at: datetime
    disabled_at: datetime | None = None
    expires_at: datetime | None = None

    def status(self, now: datetime | None = None) -> str:
        """``active``, ``disabled`` or ``expired``."""
        if self.disabled_at is not None:
            return "disabled"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return "expired"
        return "active"


class UserStore:
    """Reads and writes the ``users`` table. Blocking; call from a thread in async code."""

    def __init__(self, engine: sa.Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self._now = clock

    def create(
        self, name: str, role: str, *, actor: str, expires_at: datetime | None = None
    ) -> str:
        """Add a user and return its token (the only time it is visible); audited."""
        _validate(name, role)
        expiry = _expiry(expires_at, self._now())
        token = generate_token()
        try:
            with audit.audited(self.engine) as tx:
                self._insert(tx, name, role, token, actor, expiry)
        except sa.exc.IntegrityError:
            raise UserExistsError(f"user {name!r} already exists") from None
        return token

    def bootstrap(self, name: str = BOOTSTRAP_ADMIN) -> str:
        """The first admin of a database that has none; returns its token (audited,
        actor ``system``). Refused once any admin exists: admins create the others."""
        _validate(name, "admin")
        token = generate_token()
        try:
            with audit.audited(self.engine) as tx:
                # The audit lock is held: no other writer can add an admin meanwhile.
                if tx.conn.execute(_ANY_ADMIN).first() is not None:
                    raise UserExistsError(
                        "the database has an admin already; an admin adds users with "
                        "'gpugate users create'"
                    )
                self._insert(tx, name, "admin", token, "system", None)
        except sa.exc.IntegrityError:
            raise UserExistsError(f"user {name!r} already exists") from None
        return token

    @staticmethod
    def _insert(
        tx: audit.Audit,
        name: str,
        role: str,
        token: str,
        actor: str,
        expires_at: datetime | None,
    ) -> None:
        tx.conn.execute(
            t_users.insert().values(
                name=name,
                role=role,
                token_hash=hash_key(token),
                created_by=actor,
                expires_at=expires_at,
            )
        )
        after: dict[str, object] = {"name": name, "role": role}
        if expires_at is not None:
            after["expires_at"] = _when(expires_at)
        tx.append(actor, "user.create", f"user:{name}", after=after)

    # -- lifecycle: each under the audit lock, so the last-admin check cannot race --

    def disable(self, name: str, *, actor: str, reason: str = "") -> UserRow:
        """Refuse the user's token from now on (within the token cache's TTL)."""
        with audit.audited(self.engine) as tx:
            row = self._row(tx.conn, name)
            if row.disabled_at is None:
                self._keep_an_admin(tx.conn, row, "disable")
                now = self._now()
                tx.conn.execute(
                    t_users.update().where(t_users.c.name == name).values(disabled_at=now)
                )
                tx.append(actor, "user.disable", f"user:{name}", reason=reason)
        return self.get(name)

    def enable(self, name: str, *, actor: str, reason: str = "") -> UserRow:
        """Accept the user's token again (an expired token stays expired: rotate it)."""
        with audit.audited(self.engine) as tx:
            row = self._row(tx.conn, name)
            if row.disabled_at is not None:
                tx.conn.execute(
                    t_users.update().where(t_users.c.name == name).values(disabled_at=None)
                )
                tx.append(actor, "user.enable", f"user:{name}", reason=reason)
        return self.get(name)

    def rotate(
        self,
        name: str,
        *,
        actor: str,
        expires_at: datetime | None = None,
        keep_expiry: bool = True,
        reason: str = "",
    ) -> str:
        """Give the user a new token (returned once); the old one stops working. The
        expiry is kept unless ``keep_expiry`` is false (then ``expires_at``, None for
        none); keeping one already past is refused (:class:`UserError`)."""
        now = self._now()
        expiry = None if keep_expiry else _expiry(expires_at, now)
        token = generate_token()
        with audit.audited(self.engine) as tx:
            row = self._row(tx.conn, name)
            if keep_expiry and row.expires_at is not None and row.expires_at <= now:
                # Keeping a past expiry would hand out a token that is refused at once.
                raise UserError(
                    f"user {name!r} expired at {row.expires_at.isoformat()}: give the new "
                    "token an expiry or none (--expires-in, --expires-at or --no-expiry)"
                )
            values: dict[str, object] = {"token_hash": hash_key(token)}
            after: dict[str, object] = {}
            if not keep_expiry:
                values["expires_at"] = expiry
                after["expires_at"] = _when(expiry)
            tx.conn.execute(t_users.update().where(t_users.c.name == name).values(**values))
            before = {"expires_at": _when(row.expires_at)} if after else None
            tx.append(
                actor,
                "user.rotate",
                f"user:{name}",
                before=before,
                after=after or None,
                reason=reason,
            )
        return token

    def delete(self, name: str, *, actor: str, reason: str = "") -> None:
        """Remove the user; its token stops working (within the cache's TTL)."""
        with audit.audited(self.engine) as tx:
            row = self._row(tx.conn, name)
            self._keep_an_admin(tx.conn, row, "delete")
            tx.conn.execute(t_users.delete().where(t_users.c.name == name))
            before = {"name": row.name, "role": row.role, "created_by": row.created_by}
            tx.append(actor, "user.delete", f"user:{name}", before=before, reason=reason)

    def _keep_an_admin(self, conn: sa.Connection, row: UserRow, what: str) -> None:
        if row.role != "admin" or row.status(self._now()) != "active":
            return
        others = conn.execute(
            sa.select(t_users.c.disabled_at, t_users.c.expires_at).where(
                t_users.c.role == "admin", t_users.c.name != row.name
            )
        ).all()
        now = self._now()
        if not any(_usable(o.disabled_at, o.expires_at, now) for o in others):
            raise LastAdminError(
                f"cannot {what} {row.name!r}: it is the last enabled admin; create or enable "
                "another admin first"
            )

    def _row(self, conn: sa.Connection, name: str) -> UserRow:
        found = conn.execute(sa.select(t_users).where(t_users.c.name == name)).first()
        if found is None:
            raise UserNotFoundError(f"no user {name!r}")
        return _user_row(found)

    def get(self, name: str) -> UserRow:
        with self.engine.connect() as conn:
            return self._row(conn, name)

    def authenticate(self, token: str) -> Principal | None:
        """The token's user, unless it is unknown, disabled or expired."""
        if not token or len(token) > 256:
            return None
        h = hash_key(token)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    t_users.c.name,
                    t_users.c.role,
                    t_users.c.token_hash,
                    t_users.c.disabled_at,
                    t_users.c.expires_at,
                ).where(t_users.c.token_hash == h)
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash.strip(), h):
            return None
        if not _usable(row.disabled_at, row.expires_at, self._now()):
            return None
        return Principal(row.name, row.role, _aware(row.expires_at))

    def list(self) -> builtins.list[UserRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t_users).order_by(t_users.c.name)).all()
        return [_user_row(r) for r in rows]

    def has_admin(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(_ANY_ADMIN).first() is not None


def _user_row(r: Any) -> UserRow:
    created_at = _aware(r.created_at)
    assert created_at is not None
    return UserRow(
        r.name,
        r.role,
        r.created_by,
        created_at,
        _aware(r.disabled_at),
        _aware(r.expires_at),
    )


def ensure_admin(store: UserStore, state_dir: Path) -> str | None:
    """The embedded default's admin token, creating the admin on a fresh state.

    The token lives in ``state_dir/admin.token`` (mode 0600, like the demo tenant
    key). Only a database without any admin gets one this way: once an admin
    exists, a lost or edited token file does not mint a new one (None is returned
    and the caller must pass a token).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / ADMIN_TOKEN_FILE
    with _locked(state_dir / (ADMIN_TOKEN_FILE + ".lock")):
        token = _read_key_file(path)
        if token is not None:
            principal = store.authenticate(token)
            if principal is not None and principal.role == "admin":
                return token
        if store.has_admin():
            return None
        token = store.create(BOOTSTRAP_ADMIN, "admin", actor="system")
        _write_key_file(path, token)
        log.info("created the admin user; its token is in %s", path)
        return token


@dataclass
class _Cached:
    principal: Principal | None
    expires: float


class UserDirectory:
    """The admin API's token check: a short cache in front of :class:`UserStore`."""

    def __init__(
        self,
        store: UserStore,
        *,
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl_s
        self._clock = clock
        self._cache: dict[str, _Cached] = {}

    def lookup(self, token: str) -> Principal | None:
        """The token's user; a token disabled, rotated or deleted elsewhere (another
        gateway, the CLI's direct commands) is refused at most ``ttl_s`` later, and an
        expiring one from its expiry on."""
        h = hash_key(token) if token else ""
        now = self._clock()
        hit = self._cache.get(h)
        if hit is not None and hit.expires > now:
            return hit.principal
        principal = self._store.authenticate(token)
        if len(self._cache) > 10_000:
            self._cache.clear()  # a flood of bad tokens costs lookups, not memory
        keep = self._ttl if principal else 0.25
        if principal is not None and principal.expires_at is not None:
            left = (principal.expires_at - utcnow()).total_seconds()
            keep = max(0.0, min(keep, left))
        self._cache[h] = _Cached(principal, now + keep)
        return principal

    def invalidate(self) -> None:
        """Forget every cached token: a user changed here is refused at once."""
        self._cache.clear()

    @staticmethod
    def permits(principal: Principal, action: str) -> bool:
        return permits(principal, action)

    @staticmethod
    def roles_for(action: str) -> Sequence[str]:
        return roles_for(action)
