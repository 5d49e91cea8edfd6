"""Users of the admin API (and so of the CLI, its client): roles, tokens, and the one
role -> action table.

A user's token is shown once at creation; only its sha256 is stored, and checks
re-compare in constant time. :data:`PERMISSIONS` is the single place that says
which role may do what; the gateway checks it on every admin request.
"""

from __future__ import annotations

import builtins
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, get_args

import sqlalchemy as sa

from serving.config import NAME_PATTERN
from serving.state import audit
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
    "tenants.create": frozenset({"admin"}),
    "tenants.delete": frozenset({"admin"}),
    "tenants.rotate": frozenset({"admin"}),
    "tenants.list": frozenset({"admin", "auditor"}),
    "models.read": frozenset(ROLES),
    "models.register": frozenset({"admin", "deployer"}),
    "models.approve": frozenset({"admin", "approver"}),
    "models.promote": frozenset({"admin", "deployer"}),
    "audit.read": frozenset({"admin", "auditor"}),
    "costs.read": frozenset({"admin", "finance"}),
}


@dataclass(frozen=True)
class Principal:
    """An authenticated user of the admin API: who acts, and with which role."""

    name: str
    role: str


class UserError(Exception):
    """Base of the user errors; the message is meant for the operator."""


class UserExistsError(UserError):
    pass


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


def generate_token() -> str:
    return "ggu_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class UserRow:
    name: str
    role: str
    created_by: str
    created_at: datetime


class UserStore:
    """Reads and writes the ``users`` table. Blocking; call from a thread in async code."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def create(self, name: str, role: str, *, actor: str) -> str:
        """Add a user and return its token (the only time it is visible); audited."""
        _validate(name, role)
        token = generate_token()
        try:
            with audit.audited(self.engine) as tx:
                self._insert(tx, name, role, token, actor)
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
                self._insert(tx, name, "admin", token, "system")
        except sa.exc.IntegrityError:
            raise UserExistsError(f"user {name!r} already exists") from None
        return token

    @staticmethod
    def _insert(tx: audit.Audit, name: str, role: str, token: str, actor: str) -> None:
        tx.conn.execute(
            t_users.insert().values(
                name=name, role=role, token_hash=hash_key(token), created_by=actor
            )
        )
        tx.append(actor, "user.create", f"user:{name}", after={"name": name, "role": role})

    def authenticate(self, token: str) -> Principal | None:
        if not token or len(token) > 256:
            return None
        h = hash_key(token)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t_users.c.name, t_users.c.role, t_users.c.token_hash).where(
                    t_users.c.token_hash == h
                )
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash.strip(), h):
            return None
        return Principal(row.name, row.role)

    def list(self) -> builtins.list[UserRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t_users).order_by(t_users.c.name)).all()
        return [
            UserRow(
                r.name,
                r.role,
                r.created_by,
                r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=UTC),
            )
            for r in rows
        ]

    def has_admin(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(_ANY_ADMIN).first() is not None


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
        h = hash_key(token) if token else ""
        now = self._clock()
        hit = self._cache.get(h)
        if hit is not None and hit.expires > now:
            return hit.principal
        principal = self._store.authenticate(token)
        if len(self._cache) > 10_000:
            self._cache.clear()  # a flood of bad tokens costs lookups, not memory
        self._cache[h] = _Cached(principal, now + (self._ttl if principal else 0.25))
        return principal

    @staticmethod
    def permits(principal: Principal, action: str) -> bool:
        return permits(principal, action)

    @staticmethod
    def roles_for(action: str) -> Sequence[str]:
        return roles_for(action)
