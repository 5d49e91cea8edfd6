"""The config file's tenants: reconciled with the ``tenants`` table at every start
(:meth:`ConfigTenants.upsert_from_config`, part of :class:`serving.tenancy.TenantStore`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa

from serving.config import TenantConfig
from serving.state import audit
from serving.state import tenant_keys as t_keys
from serving.state import tenants as t_tenants
from serving.tenancy.admission import Admission
from serving.tenancy.records import (
    DEFAULT_LABEL,
    MAX_KEY_LENGTH,
    MIN_CONFIG_KEY_LENGTH,
    TenantDeletedError,
    TenantError,
    TenantExistsError,
    TenantKeyConflictError,
    TenantKeyMissingError,
    described,
    hash_key,
    inserted_id,
    revoke_keys,
    usable_key,
    validate,
)


class ConfigTenants:
    """The part of the tenant store that follows the config file."""

    engine: sa.Engine
    now: Callable[[], datetime]

    def upsert_from_config(
        self, tenants: Sequence[TenantConfig], environ: Mapping[str, str]
    ) -> None:
        """Make the config tenants in the database match the config, in one transaction.

        Keys are read from each tenant's ``api_key_env``; every variable is checked
        before anything is written. Existing config tenants get the configured weight,
        models and key; config tenants no longer in the config are deleted (their keys
        revoked), and come back if they return to it. A CLI tenant with a configured
        name is an error rather than being taken over, since that would silently
        replace the keys its clients use. Suspension is not the config's: a start
        leaves it as it is.
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
            wanted.append((tc, validate(tc.name, tc.weight, tc.models), hash_key(key)))
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
        now = self.now()
        with audit.audited(self.engine) as tx:
            conn = tx.conn
            before = {
                r.name: r
                for r in conn.execute(sa.select(t_tenants).where(t_tenants.c.source == "config"))
            }
            for name, gone in sorted(before.items()):
                if name not in names and gone.deleted_at is None:
                    conn.execute(
                        t_tenants.update().where(t_tenants.c.id == gone.id).values(deleted_at=now)
                    )
                    revoke_keys(conn, gone.id, now)
                    tx.append(
                        "config",
                        "tenant.delete",
                        f"tenant:{name}",
                        before=described(gone),
                        reason="removed from the config file",
                    )
            for tc, models, h in wanted:
                admission = Admission.of_config(tc)
                values = {
                    "weight": float(tc.weight),
                    "models": json.dumps(list(models)),
                    **admission.columns(),
                }
                old = before.get(tc.name)
                if old is None:
                    result = conn.execute(
                        t_tenants.insert().values(name=tc.name, source="config", **values)
                    )
                    tenant_id = inserted_id(result)
                else:
                    tenant_id = old.id
                    conn.execute(
                        t_tenants.update()
                        .where(t_tenants.c.id == old.id)
                        .values(deleted_at=None, **values)
                    )
                changed_key = self._config_key(conn, int(tenant_id), h, now)
                after = {
                    "name": tc.name,
                    "weight": float(tc.weight),
                    "models": list(models),
                    **admission.described(),
                }
                if old is None or old.deleted_at is not None:
                    tx.append(
                        "config",
                        "tenant.create",
                        f"tenant:{tc.name}",
                        after=after,
                        reason="declared in the config file",
                    )
                    continue
                if described(old) != after:
                    tx.append(
                        "config",
                        "tenant.update",
                        f"tenant:{tc.name}",
                        before=described(old),
                        after=after,
                        reason="config file changed",
                    )
                if changed_key:
                    tx.append(
                        "config",
                        "tenant.rotate_key",
                        f"tenant:{tc.name}",
                        reason=f"new key in {tc.api_key_env}",
                    )

    @staticmethod
    def _config_key(conn: sa.Connection, tenant_id: int, h: str, now: datetime) -> bool:
        """Make ``h`` the config tenant's one live key; whether its key changed."""
        rows = conn.execute(
            sa.select(t_keys.c.id, t_keys.c.key_hash, t_keys.c.revoked_at).where(
                t_keys.c.tenant_id == tenant_id
            )
        ).all()
        own = next((r for r in rows if r.key_hash.strip() == h), None)
        if own is not None and own.revoked_at is None and len(rows) == 1:
            return False
        if own is None:
            conn.execute(
                t_keys.insert().values(
                    tenant_id=tenant_id, label=DEFAULT_LABEL, key_hash=h, created_at=now
                )
            )
        elif own.revoked_at is not None:
            # The key this tenant had before (a key moved back, or the tenant re-declared).
            conn.execute(
                t_keys.update()
                .where(t_keys.c.id == own.id)
                .values(revoked_at=None, expires_at=None, created_at=now)
            )
        conn.execute(
            t_keys.update()
            .where(
                t_keys.c.tenant_id == tenant_id,
                t_keys.c.key_hash != h,
                t_keys.c.revoked_at.is_(None),
            )
            .values(revoked_at=now)
        )
        return own is None or own.revoked_at is not None

    def _explain_conflict(
        self, wanted: Sequence[tuple[TenantConfig, tuple[str, ...], str]]
    ) -> TenantError | None:
        names = [tc.name for tc, _, _ in wanted]
        hashes = [h for _, _, h in wanted]
        with self.engine.connect() as conn:
            named = conn.execute(
                sa.select(t_tenants.c.name, t_tenants.c.source, t_tenants.c.deleted_at).where(
                    t_tenants.c.name.in_(names)
                )
            ).all()
            keyed = conn.execute(
                sa.select(t_tenants.c.name, t_keys.c.key_hash)
                .join(t_keys, t_keys.c.tenant_id == t_tenants.c.id)
                .where(t_keys.c.key_hash.in_(hashes))
            ).all()
        for tc, _, h in wanted:
            for row in named:
                if row.name == tc.name and row.source != "config":
                    if row.deleted_at is not None:
                        return TenantDeletedError(
                            f"config tenant {tc.name!r}: a deleted tenant created with the CLI "
                            "had that name, and keeps it with its usage history; rename the "
                            "config tenant"
                        )
                    return TenantExistsError(
                        f"config tenant {tc.name!r} clashes with a tenant of that name created "
                        f"with the CLI; delete it (gpugate tenants delete {tc.name}) or rename "
                        "the config tenant"
                    )
            for owner in keyed:
                if owner.key_hash.strip() == h and owner.name != tc.name:
                    return TenantKeyConflictError(
                        f"tenant {tc.name!r}: the key in {tc.api_key_env} already belongs to "
                        f"tenant {owner.name!r}"
                    )
        return None
