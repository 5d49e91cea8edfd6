"""Web console sessions: a user signs in once with their token and the browser then
holds a session cookie instead.

A session is worth no more than the token it was opened with. It names the user and
the token's hash at sign-in, so it ends when the user is disabled, deleted, expires or
has the token rotated, and at its own expiry, whichever comes first; signing out
deletes it. The secret in the cookie is never stored: the row is keyed by its sha256.
Every session carries a CSRF token that the console's forms send back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from serving.state import audit, utcnow
from serving.state import console_sessions as t_sessions
from serving.state import users as t_users
from serving.tenancy.tenants import hash_key
from serving.tenancy.users import Principal, UserDirectory, _aware, _usable

# Longest a session may be asked to last.
MAX_SESSION_TTL = timedelta(days=30)
# A cookie value is "ggs_" + 43 url-safe characters; anything longer is not ours.
_MAX_SECRET = 128


@dataclass(frozen=True)
class Session:
    """A signed-in browser: who, the CSRF token its forms carry, and until when."""

    principal: Principal
    csrf: str
    expires_at: datetime

    def csrf_matches(self, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(self.csrf.encode(), (sent or "").encode())


@dataclass(frozen=True)
class OpenedSession:
    """A new session: ``secret`` goes into the browser's cookie and nowhere else."""

    secret: str
    session: Session


def _id_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class SessionStore:
    """Console sessions in the state database, shared by every gateway on it."""

    def __init__(
        self,
        engine: sa.Engine,
        directory: UserDirectory,
        *,
        ttl: timedelta = timedelta(hours=8),
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        if not timedelta(seconds=1) <= ttl <= MAX_SESSION_TTL:
            raise ValueError(f"a session lasts between 1 s and {MAX_SESSION_TTL}")
        self.engine = engine
        self.directory = directory
        self.ttl = ttl
        self._now = now

    def open(self, token: str) -> OpenedSession | None:
        """Sign in with a user token: a new session, or None when the token is not a
        usable user token (a tenant key is not one). Audited as ``console.sign_in``."""
        token = token.strip()
        principal = self.directory.lookup(token) if token else None
        if principal is None:
            return None
        token_hash = hash_key(token)
        now = self._now()
        expires = now + self.ttl
        if principal.expires_at is not None:
            expires = min(expires, principal.expires_at)
        secret = "ggs_" + secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        with audit.audited(self.engine) as tx:
            self._purge(tx.conn, now)
            user_id = tx.conn.execute(
                sa.select(t_users.c.id).where(
                    t_users.c.name == principal.name,
                    t_users.c.token_hash == token_hash,
                )
            ).scalar()
            if user_id is None:  # rotated or deleted since the directory's cache filled
                return None
            tx.conn.execute(
                t_sessions.insert().values(
                    id_hash=_id_hash(secret),
                    user_id=user_id,
                    token_hash=token_hash,
                    csrf=csrf,
                    created_at=now,
                    expires_at=expires,
                )
            )
            tx.append(
                principal.name,
                "console.sign_in",
                f"user:{principal.name}",
                after={"expires_at": expires.isoformat()},
            )
        return OpenedSession(secret, Session(principal, csrf, expires))

    def get(self, secret: str | None) -> Session | None:
        """The live session behind a cookie's secret, with its user's current role; None
        when there is none, it expired, or its user can no longer sign in (the session is
        then deleted)."""
        if not secret or len(secret) > _MAX_SECRET:
            return None
        now = self._now()
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    t_sessions.c.csrf,
                    t_sessions.c.expires_at,
                    t_sessions.c.token_hash,
                    t_users.c.token_hash.label("user_token_hash"),
                    t_users.c.name,
                    t_users.c.role,
                    t_users.c.disabled_at,
                    t_users.c.expires_at.label("user_expires_at"),
                )
                .join(t_users, t_users.c.id == t_sessions.c.user_id)
                .where(t_sessions.c.id_hash == _id_hash(secret))
            ).first()
        if row is None:
            return None
        expires = _aware(row.expires_at)
        if (
            expires is None
            or expires <= now
            # the token it was opened with was rotated
            or not hmac.compare_digest(row.token_hash.strip(), row.user_token_hash.strip())
            or not _usable(row.disabled_at, row.user_expires_at, now)
        ):
            # Ended for good: enabling the user again does not bring it back.
            self.close(secret)
            return None
        principal = Principal(row.name, row.role, _aware(row.user_expires_at))
        return Session(principal, row.csrf, expires)

    def close(self, secret: str | None, *, signed_out_by: str | None = None) -> bool:
        """End the session: delete it. True when there was one. ``signed_out_by``: the
        user signed out, audited as ``console.sign_out`` (a session that ended by itself,
        expired or its user's token gone, is not)."""
        if not secret or len(secret) > _MAX_SECRET:
            return False
        with audit.audited(self.engine) as tx:
            gone = tx.conn.execute(
                t_sessions.delete().where(t_sessions.c.id_hash == _id_hash(secret))
            ).rowcount
            if gone and signed_out_by is not None:
                tx.append(signed_out_by, "console.sign_out", f"user:{signed_out_by}")
        return bool(gone)

    @staticmethod
    def _purge(conn: sa.Connection, now: datetime) -> None:
        # Expired sessions go at the next sign-in: no sweeper, and the table stays small.
        conn.execute(t_sessions.delete().where(t_sessions.c.expires_at <= now))
