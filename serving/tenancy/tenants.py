"""Tenants: API keys, the tenant table, and request authentication.

A tenant comes from the config file (its key read from an environment variable at
start) or from the CLI (a generated key shown once). Either way only the sha256 of
the key is stored. ``TenantDirectory`` is the router's view: an in-memory cache in
front of ``TenantStore`` so that authenticating a request normally costs one hash
and one dict lookup.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from router import Tenant
from serving.config import NAME_PATTERN, TenantConfig, tenant_name
from serving.state import audit
from serving.state import tenants as t_tenants
from serving.tenancy.admission import KEEP, NO_GRANTS, Admission

log = logging.getLogger(__name__)

Source = Literal["config", "cli"]
MAX_KEY_LENGTH = 256
# A config key is chosen by a person, not generated: a short one could be guessed.
MIN_CONFIG_KEY_LENGTH = 16
MAX_WEIGHT = 1000.0  # same bound as TenantConfig.weight
DEMO_TENANT = "demo"
DEMO_MODEL = "digits"
DEMO_KEY_FILE = "demo_tenant.key"
# A key must survive an HTTP header or gRPC metadata value unchanged: printable
# ASCII without spaces (header parsing strips surrounding whitespace).
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


class TenantError(Exception):
    """Base of the tenant errors; the message is meant for the operator."""


class TenantExistsError(TenantError):
    pass


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


class TenantLookupError(TenantError):
    """The state database failed during authentication (map to 503, not 401)."""


def generate_api_key() -> str:
    return "gg_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # A plain (unsalted, fast) hash is enough: keys are 256 random bits, so there is
    # nothing to brute-force, and authentication must be able to look a row up by it.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def usable_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_LENGTH and _KEY_CHARS.fullmatch(key) is not None


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

    def tenant(self) -> Tenant:
        return _tenant(self.name, self.weight, self.models, self.admission)


def _tenant(name: str, weight: float, models: Iterable[str], admission: Admission) -> Tenant:
    return Tenant(
        name,
        weight,
        frozenset(models),
        frozenset(admission.priorities),
        admission.max_requests_in_flight,
        admission.max_bytes_in_flight,
    )


def _validate(name: str, weight: float, models: Iterable[str]) -> tuple[str, ...]:
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


def _aware(ts: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; they were written as UTC.
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


class TenantStore:
    """Reads and writes the ``tenants`` table. Blocking; call from a thread in async code."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def create(
        self,
        name: str,
        weight: float = 1.0,
        models: Iterable[str] = ("*",),
        source: Source = "cli",
        *,
        admission: Admission = NO_GRANTS,
        actor: str = "system",
    ) -> str:
        """Add a tenant and return its new API key (the only time it is visible); audited."""
        checked = _validate(name, weight, models)
        admission = Admission.checked(
            admission.priorities, admission.max_requests_in_flight, admission.max_bytes_in_flight
        )
        if source not in ("config", "cli"):
            raise ValueError(f"tenant source must be 'config' or 'cli', got {source!r}")
        key = generate_api_key()
        try:
            with audit.audited(self.engine) as tx:
                tx.conn.execute(
                    t_tenants.insert().values(
                        name=name,
                        weight=float(weight),
                        models=json.dumps(list(checked)),
                        key_hash=hash_key(key),
                        source=source,
                        **admission.columns(),
                    )
                )
                after = {
                    "name": name,
                    "weight": float(weight),
                    "models": list(checked),
                    **admission.described(),
                }
                tx.append(actor, "tenant.create", f"tenant:{name}", after=after)
        except sa.exc.IntegrityError:
            # The key hash is 256 fresh random bits, so the unique name is what clashed.
            raise TenantExistsError(f"tenant {name!r} already exists") from None
        return key

    def upsert_from_config(
        self, tenants: Sequence[TenantConfig], environ: Mapping[str, str]
    ) -> None:
        """Make the config tenants in the database match the config, in one transaction.

        Keys are read from each tenant's ``api_key_env``; every variable is checked
        before anything is written. Existing config tenants get the configured weight,
        models and key; config tenants no longer in the config are deleted, so
        removing a tenant from the file revokes its key. A CLI tenant with a
        configured name is an error rather than being taken over, since that would
        silently replace the key its clients use.
        """
        wanted: list[tuple[TenantConfig, tuple[str, ...], str]] = []
        for tc in tenants:
            Admission.of_config(tc)  # a bad value stops the start before anything is written
        for tc in tenants:
            key = environ.get(tc.api_key_env, "")
            if not key:
                raise TenantKeyMissingError(tc.name, tc.api_key_env)
            if not usable_key(key) or len(key) < MIN_CONFIG_KEY_LENGTH:
                raise TenantKeyConflictError(
                    f"tenant {tc.name!r}: the key in {tc.api_key_env} must be "
                    f"{MIN_CONFIG_KEY_LENGTH}-{MAX_KEY_LENGTH} printable ASCII characters "
                    "without spaces"
                )
            wanted.append((tc, _validate(tc.name, tc.weight, tc.models), hash_key(key)))
        by_hash: dict[str, str] = {}
        for tc, _, h in wanted:
            if h in by_hash:
                raise TenantKeyConflictError(
                    f"tenants {by_hash[h]!r} and {tc.name!r} are configured with the same key"
                )
            by_hash[h] = tc.name

        # A concurrent start of another gateway process can insert the same config
        # tenant between our UPDATE and INSERT; the retry then finds it and updates.
        for attempt in range(3):
            try:
                self._apply_config(wanted)
                return
            except sa.exc.IntegrityError:
                problem = self._explain_conflict(wanted)
                if problem is not None:
                    raise problem from None
                if attempt == 2:
                    raise

    def _apply_config(self, wanted: Sequence[tuple[TenantConfig, tuple[str, ...], str]]) -> None:
        names = [tc.name for tc, _, _ in wanted]
        with audit.audited(self.engine) as tx:
            conn = tx.conn
            before = {
                r.name: r
                for r in conn.execute(
                    sa.select(
                        t_tenants.c.name,
                        t_tenants.c.weight,
                        t_tenants.c.models,
                        t_tenants.c.key_hash,
                        t_tenants.c.priorities,
                        t_tenants.c.max_requests_in_flight,
                        t_tenants.c.max_bytes_in_flight,
                    ).where(t_tenants.c.source == "config")
                )
            }
            # Prune first so a key moved from a removed tenant to a new one does not
            # collide with the row that is about to go.
            conn.execute(
                t_tenants.delete().where(
                    t_tenants.c.source == "config", t_tenants.c.name.not_in(names)
                )
            )
            for name, gone in sorted(before.items()):
                if name not in names:
                    tx.append(
                        "config",
                        "tenant.delete",
                        f"tenant:{name}",
                        before=_described(gone),
                        reason="removed from the config file",
                    )
            for tc, models, h in wanted:
                admission = Admission.of_config(tc)
                values = {
                    "weight": float(tc.weight),
                    "models": json.dumps(list(models)),
                    **admission.columns(),
                }
                updated = conn.execute(
                    t_tenants.update()
                    .where(t_tenants.c.name == tc.name, t_tenants.c.source == "config")
                    .values(key_hash=h, **values)
                )
                if updated.rowcount == 0:
                    conn.execute(
                        t_tenants.insert().values(
                            name=tc.name, key_hash=h, source="config", **values
                        )
                    )
                after = {
                    "name": tc.name,
                    "weight": float(tc.weight),
                    "models": list(models),
                    **admission.described(),
                }
                old = before.get(tc.name)
                if old is None:
                    tx.append(
                        "config",
                        "tenant.create",
                        f"tenant:{tc.name}",
                        after=after,
                        reason="declared in the config file",
                    )
                elif _described(old) != after:
                    tx.append(
                        "config",
                        "tenant.update",
                        f"tenant:{tc.name}",
                        before=_described(old),
                        after=after,
                        reason="config file changed",
                    )
                if old is not None and old.key_hash.strip() != h:
                    tx.append(
                        "config",
                        "tenant.rotate_key",
                        f"tenant:{tc.name}",
                        reason=f"new key in {tc.api_key_env}",
                    )

    def _explain_conflict(
        self, wanted: Sequence[tuple[TenantConfig, tuple[str, ...], str]]
    ) -> TenantError | None:
        names = [tc.name for tc, _, _ in wanted]
        hashes = [h for _, _, h in wanted]
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t_tenants.c.name, t_tenants.c.source, t_tenants.c.key_hash).where(
                    sa.or_(t_tenants.c.name.in_(names), t_tenants.c.key_hash.in_(hashes))
                )
            ).all()
        for tc, _, h in wanted:
            for row in rows:
                if row.name == tc.name and row.source != "config":
                    return TenantExistsError(
                        f"config tenant {tc.name!r} clashes with a tenant of that name created "
                        f"with the CLI; delete it (gpugate tenants delete {tc.name}) or rename "
                        "the config tenant"
                    )
                if row.key_hash == h and row.name != tc.name:
                    return TenantKeyConflictError(
                        f"tenant {tc.name!r}: the key in {tc.api_key_env} already belongs to "
                        f"tenant {row.name!r}"
                    )
        return None

    def get_by_key_hash(self, key_hash: str) -> Tenant | None:
        if not _HASH.fullmatch(key_hash):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    t_tenants.c.name,
                    t_tenants.c.weight,
                    t_tenants.c.models,
                    t_tenants.c.key_hash,
                    t_tenants.c.priorities,
                    t_tenants.c.max_requests_in_flight,
                    t_tenants.c.max_bytes_in_flight,
                ).where(t_tenants.c.key_hash == key_hash)
            ).first()
        # Re-check in constant time rather than trusting the database's comparison
        # (collations, CHAR padding) with an authentication decision.
        if row is None or not hmac.compare_digest(row.key_hash.strip(), key_hash):
            return None
        return _tenant(row.name, float(row.weight), json.loads(row.models), Admission.of_row(row))

    def update(
        self,
        name: str,
        *,
        weight: float = KEEP,
        models: Iterable[str] = KEEP,
        priorities: Iterable[int] = KEEP,
        max_requests_in_flight: int | None = KEEP,
        max_bytes_in_flight: int | None = KEEP,
        actor: str = "system",
    ) -> TenantRow:
        """Change a CLI tenant's weight, models, priority grants or caps (each left as it
        is unless given; a cap of None means the server's default); audited. The key stays."""
        with audit.audited(self.engine) as tx:
            conn = tx.conn
            row = conn.execute(sa.select(t_tenants).where(t_tenants.c.name == name)).first()
            if row is None:
                raise TenantNotFoundError(f"no tenant {name!r}")
            if row.source == "config":
                # The next start would put the file's values back.
                raise TenantError(
                    f"tenant {name!r} is managed by the config file; change it there instead"
                )
            old = _described(row)
            new_models = _validate(
                name,
                old["weight"] if weight is KEEP else weight,
                old["models"] if models is KEEP else models,
            )
            admission = Admission.checked(
                old["priorities"] if priorities is KEEP else priorities,
                old["max_requests_in_flight"]
                if max_requests_in_flight is KEEP
                else max_requests_in_flight,
                old["max_bytes_in_flight"] if max_bytes_in_flight is KEEP else max_bytes_in_flight,
            )
            new_weight = float(old["weight"] if weight is KEEP else weight)
            after = {
                "name": name,
                "weight": new_weight,
                "models": list(new_models),
                **admission.described(),
            }
            if after != old:
                conn.execute(
                    t_tenants.update()
                    .where(t_tenants.c.name == name)
                    .values(
                        weight=new_weight,
                        models=json.dumps(list(new_models)),
                        **admission.columns(),
                    )
                )
                tx.append(actor, "tenant.update", f"tenant:{name}", before=old, after=after)
                row = conn.execute(sa.select(t_tenants).where(t_tenants.c.name == name)).one()
            return _row(row)

    def rotate_key(self, name: str, *, actor: str = "system") -> str:
        """Give a CLI tenant a new key (returned) and invalidate the old one; audited."""
        key = generate_api_key()
        with audit.audited(self.engine) as tx:
            conn = tx.conn
            source = conn.execute(
                sa.select(t_tenants.c.source).where(t_tenants.c.name == name)
            ).scalar()
            if source is None:
                raise TenantNotFoundError(f"no tenant {name!r}")
            if source == "config":
                # Its key comes from the environment; a rotated key would be put back
                # by the next start.
                raise TenantError(
                    f"tenant {name!r} is managed by the config file; change the key in its "
                    "api_key_env variable instead"
                )
            conn.execute(
                t_tenants.update().where(t_tenants.c.name == name).values(key_hash=hash_key(key))
            )
            tx.append(actor, "tenant.rotate_key", f"tenant:{name}")
        return key

    def delete(self, name: str, *, actor: str = "system") -> None:
        """Remove a tenant (audited). A config tenant comes back at the next start."""
        with audit.audited(self.engine) as tx:
            row = tx.conn.execute(sa.select(t_tenants).where(t_tenants.c.name == name)).first()
            if row is None:
                raise TenantNotFoundError(f"no tenant {name!r}")
            tx.conn.execute(t_tenants.delete().where(t_tenants.c.name == name))
            before = {**_described(row), "source": row.source}
            tx.append(actor, "tenant.delete", f"tenant:{name}", before=before)

    def list(self) -> builtins.list[TenantRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t_tenants).order_by(t_tenants.c.name)).all()
        return [_row(r) for r in rows]


def _row(r: Any) -> TenantRow:
    return TenantRow(
        name=r.name,
        weight=float(r.weight),
        models=tuple(json.loads(r.models)),
        source=r.source,
        created_at=_aware(r.created_at),
        updated_at=_aware(r.updated_at),
        admission=Admission.of_row(r),
    )


def _described(row: Any) -> dict[str, Any]:
    return {
        "name": row.name,
        "weight": float(row.weight),
        "models": json.loads(row.models),
        **Admission.of_row(row).described(),
    }


def ensure_demo_tenant(store: TenantStore, state_dir: Path) -> str:
    """Return a working key of the "demo" tenant, creating the tenant on first run.

    The key is kept in ``state_dir/demo_tenant.key`` (mode 0600) so it stays the
    same across restarts. If the file and the database disagree (tenant deleted,
    key rotated, file lost) the tenant is re-created or rotated and the file
    rewritten. A lock file serialises concurrent starts sharing the state dir, which
    would otherwise rotate each other's key.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / DEMO_KEY_FILE
    with _locked(state_dir / (DEMO_KEY_FILE + ".lock")):
        key = _read_key_file(path)
        if key is not None:
            tenant = store.get_by_key_hash(hash_key(key))
            if tenant is not None and tenant.name == DEMO_TENANT:
                return key
        try:
            # Scoped to the demo model: the key is printed and kept on disk, and must not
            # open production models if this state dir later serves a real config.
            key = store.create(DEMO_TENANT, 1.0, (DEMO_MODEL,), source="cli")
        except TenantExistsError:
            key = store.rotate_key(DEMO_TENANT)
            log.warning("demo tenant key did not match %s; rotated it", path)
        _write_key_file(path, key)
        return key


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_key_file(path: Path) -> str | None:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if path.stat().st_mode & 0o077:
        # Someone widened it; a key readable by other users is a leaked key.
        log.warning("%s was readable by other users; restricting it to the owner", path)
        path.chmod(0o600)
    return key if usable_key(key) else None


def _write_key_file(path: Path, key: str) -> None:
    # Created 0600 by open(2) itself, never chmod'ed afterwards, so the key is not
    # world-readable even for an instant; replace() makes the swap atomic so a
    # crash never leaves a truncated key file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crashed process that had our pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, 0o600)
    try:
        os.write(fd, (key + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
