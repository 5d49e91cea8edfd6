"""Tenants: the tenant table, its lifecycle, and request authentication.

A tenant comes from the config file (its one key read from an environment variable at
start; :mod:`serving.tenancy.config_tenants`) or from the CLI (keys generated and shown
once; :mod:`serving.tenancy.keys` manages several per tenant). Either way only the
sha256 of a key is stored, in ``tenant_keys``. A tenant may be suspended (its keys still
authenticate; every request is refused 403 with the reason) and deleted: the row stays,
so the cost ledger's usage keeps its tenant and the name is never handed to another
tenant by accident; every key is revoked. ``TenantDirectory`` is the router's view: an
in-memory cache in front of ``TenantStore`` so that authenticating a request normally
costs one hash and one dict lookup.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hmac
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from router import Tenant
from serving.state import audit, utcnow
from serving.state import tenant_keys as t_keys
from serving.state import tenants as t_tenants
from serving.tenancy.admission import KEEP, NO_GRANTS, Admission
from serving.tenancy.config_tenants import ConfigTenants
from serving.tenancy.records import (
    DEFAULT_LABEL,
    HASH,
    MAX_KEY_LENGTH,
    MIN_CONFIG_KEY_LENGTH,
    KeyStateError,
    Source,
    TenantDeletedError,
    TenantError,
    TenantExistsError,
    TenantKeyConflictError,
    TenantKeyMissingError,
    TenantLookupError,
    TenantNotFoundError,
    TenantRow,
    aware,
    aware_ts,
    checked_reason,
    config_managed,
    described,
    generate_api_key,
    hash_key,
    insert_key,
    inserted_id,
    live_keys,
    make_tenant,
    revoke_keys,
    tenant_row,
    usable_key,
    validate,
    when,
)

__all__ = [
    "DEMO_KEY_FILE",
    "DEMO_MODEL",
    "DEMO_TENANT",
    "MAX_KEY_LENGTH",
    "MIN_CONFIG_KEY_LENGTH",
    "KeyMatch",
    "KeyStateError",
    "TenantDeletedError",
    "TenantError",
    "TenantExistsError",
    "TenantKeyConflictError",
    "TenantKeyMissingError",
    "TenantLookupError",
    "TenantNotFoundError",
    "TenantRow",
    "TenantStore",
    "ensure_demo_tenant",
    "generate_api_key",
    "hash_key",
    "usable_key",
]

log = logging.getLogger(__name__)

DEMO_TENANT = "demo"
DEMO_MODEL = "digits"
DEMO_KEY_FILE = "demo_tenant.key"


@dataclass(frozen=True)
class KeyMatch:
    """What authentication found for a key: its tenant, and the key's id and expiry (the
    router's cache must not hold a key past it)."""

    tenant: Tenant
    key_id: int
    expires_at: datetime | None


class TenantStore(ConfigTenants):
    """Reads and writes the ``tenants`` table and the keys' authentication. Blocking; call
    from a thread in async code. Every change is audited in its own transaction."""

    def __init__(self, engine: sa.Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.now = clock

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
        """Add a tenant with one key labelled ``default`` and return the key (the only
        time it is visible); audited. The name of a deleted tenant is refused."""
        checked = validate(name, weight, models)
        admission = Admission.checked(
            admission.priorities, admission.max_requests_in_flight, admission.max_bytes_in_flight
        )
        if source not in ("config", "cli"):
            raise ValueError(f"tenant source must be 'config' or 'cli', got {source!r}")
        try:
            with audit.audited(self.engine) as tx:
                result = tx.conn.execute(
                    t_tenants.insert().values(
                        name=name,
                        weight=float(weight),
                        models=json.dumps(list(checked)),
                        source=source,
                        **admission.columns(),
                    )
                )
                tenant_id = inserted_id(result)
                key, _ = insert_key(tx.conn, tenant_id, DEFAULT_LABEL, self.now())
                after = {
                    "name": name,
                    "weight": float(weight),
                    "models": list(checked),
                    **admission.described(),
                }
                tx.append(actor, "tenant.create", f"tenant:{name}", after=after)
        except sa.exc.IntegrityError:
            # The key hash is 256 fresh random bits, so the unique name is what clashed.
            raise self._taken(name) from None
        return key

    def _taken(self, name: str) -> TenantExistsError:
        with self.engine.connect() as conn:
            deleted_at = conn.execute(
                sa.select(t_tenants.c.deleted_at).where(t_tenants.c.name == name)
            ).scalar()
        if deleted_at is None:
            return TenantExistsError(f"tenant {name!r} already exists")
        return TenantDeletedError(
            f"tenant {name!r} was deleted at {aware_ts(deleted_at).isoformat()}; the name stays "
            "with its usage history and is not given to a new tenant: choose another name, "
            f"or bring the tenant back with `gpugate tenants restore {name}`"
        )

    # -- authentication ------------------------------------------------------------

    def lookup_key(self, key_hash: str) -> KeyMatch | None:
        """The tenant a key (by its hash) authenticates, unless the key is unknown,
        revoked or expired, or its tenant deleted. A suspended tenant is found, with its
        reason, so that its requests can be told why they are refused."""
        if not HASH.fullmatch(key_hash):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    t_tenants.c.name,
                    t_tenants.c.weight,
                    t_tenants.c.models,
                    t_tenants.c.priorities,
                    t_tenants.c.max_requests_in_flight,
                    t_tenants.c.max_bytes_in_flight,
                    t_tenants.c.suspended_at,
                    t_tenants.c.suspended_reason,
                    t_tenants.c.deleted_at,
                    t_keys.c.id.label("key_id"),
                    t_keys.c.key_hash,
                    t_keys.c.expires_at,
                    t_keys.c.revoked_at,
                )
                .join(t_keys, t_keys.c.tenant_id == t_tenants.c.id)
                .where(t_keys.c.key_hash == key_hash)
            ).first()
        # Re-check in constant time rather than trusting the database's comparison
        # (collations, CHAR padding) with an authentication decision.
        if row is None or not hmac.compare_digest(row.key_hash.strip(), key_hash):
            return None
        expires_at = aware(row.expires_at)
        if row.revoked_at is not None or row.deleted_at is not None:
            return None
        if expires_at is not None and expires_at <= self.now():
            return None
        suspended = None
        if row.suspended_at is not None:
            suspended = row.suspended_reason or "suspended by an operator"
        tenant = make_tenant(
            row.name,
            float(row.weight),
            json.loads(row.models),
            Admission.of_row(row),
            suspended,
        )
        return KeyMatch(tenant, int(row.key_id), expires_at)

    def get_by_key_hash(self, key_hash: str) -> Tenant | None:
        found = self.lookup_key(key_hash)
        return None if found is None else found.tenant

    def touch_keys(self, used: Mapping[int, datetime], *, interval_s: float = 60.0) -> None:
        """Record when keys were last used (``used``: key id -> time), skipping keys whose
        recorded time is less than ``interval_s`` older: gateways call this at most about
        once a minute, and together write each key about once a minute at most."""
        if not used:
            return
        with self.engine.begin() as conn:
            for key_id, at in sorted(used.items()):
                stale = at.timestamp() - interval_s
                conn.execute(
                    t_keys.update()
                    .where(
                        t_keys.c.id == key_id,
                        sa.or_(
                            t_keys.c.last_used_at.is_(None),
                            t_keys.c.last_used_at < datetime.fromtimestamp(stale, UTC),
                        ),
                    )
                    .values(last_used_at=at)
                )

    # -- changes -------------------------------------------------------------------

    def live_row(self, conn: sa.Connection, name: str) -> Any:
        """The tenant's row; TenantNotFoundError if there is none or it was deleted."""
        row = conn.execute(sa.select(t_tenants).where(t_tenants.c.name == name)).first()
        if row is None:
            raise TenantNotFoundError(f"no tenant {name!r}")
        if row.deleted_at is not None:
            raise TenantNotFoundError(
                f"no tenant {name!r}: it was deleted at {aware_ts(row.deleted_at).isoformat()}"
            )
        return row

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
        is unless given; a cap of None means the server's default); audited. The keys stay."""
        with audit.audited(self.engine) as tx:
            conn = tx.conn
            row = self.live_row(conn, name)
            if row.source == "config":
                # The next start would put the file's values back.
                raise config_managed(name, "change it there instead")
            old = described(row)
            new_models = validate(
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
            return tenant_row(row)

    def suspend(self, name: str, reason: str, *, actor: str = "system") -> TenantRow:
        """Refuse every request of the tenant (403, saying ``reason``) until it is resumed;
        its keys keep authenticating. Config tenants too: suspension is not the config
        file's, and a start leaves it. Audited; suspending again changes the reason."""
        reason = checked_reason(reason)
        with audit.audited(self.engine) as tx:
            row = self.live_row(tx.conn, name)
            if row.suspended_at is None or row.suspended_reason != reason:
                values: dict[str, Any] = {"suspended_reason": reason}
                if row.suspended_at is None:
                    values["suspended_at"] = self.now()
                tx.conn.execute(t_tenants.update().where(t_tenants.c.id == row.id).values(values))
                tx.append(
                    actor,
                    "tenant.suspend",
                    f"tenant:{name}",
                    before={"suspended": row.suspended_reason},
                    after={"suspended": reason},
                    reason=reason,
                )
            return tenant_row(
                tx.conn.execute(sa.select(t_tenants).where(t_tenants.c.id == row.id)).one()
            )

    def resume(self, name: str, *, actor: str = "system", reason: str = "") -> TenantRow:
        """Serve a suspended tenant again (nothing to do if it is not); audited."""
        with audit.audited(self.engine) as tx:
            row = self.live_row(tx.conn, name)
            if row.suspended_at is not None:
                tx.conn.execute(
                    t_tenants.update()
                    .where(t_tenants.c.id == row.id)
                    .values(suspended_at=None, suspended_reason=None)
                )
                tx.append(
                    actor,
                    "tenant.resume",
                    f"tenant:{name}",
                    before={"suspended": row.suspended_reason},
                    after={"suspended": None},
                    reason=reason,
                )
            return tenant_row(
                tx.conn.execute(sa.select(t_tenants).where(t_tenants.c.id == row.id)).one()
            )

    def rotate_key(self, name: str, *, actor: str = "system") -> str:
        """Replace a CLI tenant's key with a new one (returned) at once: the old key stops
        working. A tenant with several keys is refused (rotate one of them with
        ``tenants keys rotate``); one with none gets one. Audited."""
        now = self.now()
        with audit.audited(self.engine) as tx:
            conn = tx.conn
            row = self.live_row(conn, name)
            if row.source == "config":
                # Its key comes from the environment; a rotated key would be put back
                # by the next start.
                raise config_managed(name, "change the key in its api_key_env variable instead")
            live = live_keys(conn, row.id, now)
            if len(live) > 1:
                ids = ", ".join(f"{k.id} ({k.label})" for k in live)
                raise KeyStateError(
                    f"tenant {name!r} has {len(live)} keys: {ids}; rotate one of them with "
                    f"`gpugate tenants keys rotate {name} KEY_ID`"
                )
            label = live[0].label if live else DEFAULT_LABEL
            if live:
                conn.execute(
                    t_keys.update().where(t_keys.c.id == live[0].id).values(revoked_at=now)
                )
            key, key_id = insert_key(conn, row.id, label, now)
            after = {"key_id": key_id, "label": label}
            before = {"key_id": live[0].id} if live else None
            tx.append(actor, "tenant.rotate_key", f"tenant:{name}", before=before, after=after)
        return key

    def delete(self, name: str, *, actor: str = "system") -> None:
        """Delete a CLI tenant: every key is revoked, the row stays (its usage history
        keeps its name, which no new tenant gets). A config tenant is deleted by removing
        it from the config file. Audited."""
        now = self.now()
        with audit.audited(self.engine) as tx:
            row = self.live_row(tx.conn, name)
            if row.source == "config":
                raise config_managed(name, "remove it from the config file to delete it")
            tx.conn.execute(
                t_tenants.update().where(t_tenants.c.id == row.id).values(deleted_at=now)
            )
            revoke_keys(tx.conn, row.id, now)
            before = {**described(row), "source": row.source}
            tx.append(actor, "tenant.delete", f"tenant:{name}", before=before)

    def restore(self, name: str, *, actor: str = "system") -> str:
        """Bring a deleted CLI tenant back under its name, with a new key (returned; the
        old keys stay revoked). It stays suspended if it was. Audited."""
        now = self.now()
        with audit.audited(self.engine) as tx:
            row = tx.conn.execute(sa.select(t_tenants).where(t_tenants.c.name == name)).first()
            if row is None:
                raise TenantNotFoundError(f"no tenant {name!r}")
            if row.deleted_at is None:
                raise TenantExistsError(f"tenant {name!r} is not deleted")
            if row.source == "config":
                raise config_managed(name, "declare it there again to bring it back")
            tx.conn.execute(
                t_tenants.update().where(t_tenants.c.id == row.id).values(deleted_at=None)
            )
            key, key_id = insert_key(tx.conn, row.id, DEFAULT_LABEL, now)
            tx.append(
                actor,
                "tenant.restore",
                f"tenant:{name}",
                before={"deleted_at": when(aware(row.deleted_at))},
                after={"key_id": key_id, "label": DEFAULT_LABEL},
            )
        return key

    def get(self, name: str) -> TenantRow:
        """The tenant (deleted ones too); TenantNotFoundError if there is none."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t_tenants).where(t_tenants.c.name == name)).first()
        if row is None:
            raise TenantNotFoundError(f"no tenant {name!r}")
        return tenant_row(row)

    def list(self, *, include_deleted: bool = False) -> builtins.list[TenantRow]:
        query = sa.select(t_tenants).order_by(t_tenants.c.name)
        if not include_deleted:
            query = query.where(t_tenants.c.deleted_at.is_(None))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [tenant_row(r) for r in rows]


def ensure_demo_tenant(store: TenantStore, state_dir: Path) -> str:
    """Return a working key of the "demo" tenant, creating the tenant on first run.

    The key is kept in ``state_dir/demo_tenant.key`` (mode 0600) so it stays the
    same across restarts. If the file and the database disagree (tenant deleted,
    key rotated, file lost) the tenant is created, restored or rotated and the file
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
        except TenantDeletedError:
            key = store.restore(DEMO_TENANT)
            log.warning("the demo tenant was deleted; restored it with a new key in %s", path)
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
