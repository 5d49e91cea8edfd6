"""Tenants' rate quotas in the state database (table ``tenant_quotas``).

A tenant has at most one quota over every model (model ``""``) and one per model; each
holds a token bucket of requests per second and one of rows per second, either unset.
The router enforces them (``router.quota``); the gateway's tenant directory reads them
with the tenant, so a change takes effect within its cache TTL. Quotas are set through
the admin API for tenants of either source: the config file does not state them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from router import NO_QUOTA, Quota, Rate
from serving.state import audit, utcnow
from serving.state import tenant_quotas as t_quotas
from serving.state import tenants as t_tenants
from serving.tenancy.tenants import TenantNotFoundError

# The range of a quota's rate (per second) and burst (a bucket of that many tokens): a
# rate below one request in about 17 minutes is a suspension, not a quota.
MIN_RATE = 1e-3
MAX_RATE = 1e9


@dataclass(frozen=True)
class QuotaRow:
    """One quota as stored: ``model`` "" is the tenant's quota over every model."""

    model: str
    requests_per_s: float | None = None
    requests_burst: float | None = None
    rows_per_s: float | None = None
    rows_burst: float | None = None

    def quota(self) -> Quota:
        return Quota(
            Rate.of(self.requests_per_s, self.requests_burst),
            Rate.of(self.rows_per_s, self.rows_burst),
        )

    @property
    def empty(self) -> bool:
        return self.requests_per_s is None and self.rows_per_s is None

    def described(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "requests_per_s": self.requests_per_s,
            "requests_burst": self.requests_burst,
            "rows_per_s": self.rows_per_s,
            "rows_burst": self.rows_burst,
        }

    def checked(self) -> QuotaRow:
        """Itself, or ValueError naming the first value out of range."""
        for kind in ("requests", "rows"):
            per_s = getattr(self, f"{kind}_per_s")
            burst = getattr(self, f"{kind}_burst")
            if per_s is not None and not MIN_RATE <= per_s <= MAX_RATE:
                raise ValueError(
                    f"{kind}_per_s must be in [{MIN_RATE:g}, {MAX_RATE:g}], got {per_s!r}"
                )
            if burst is not None:
                if per_s is None:
                    raise ValueError(f"{kind}_burst needs {kind}_per_s")
                if not 1 <= burst <= MAX_RATE or not math.isfinite(burst):
                    raise ValueError(f"{kind}_burst must be in [1, {MAX_RATE:g}], got {burst!r}")
        return self


@dataclass(frozen=True)
class TenantQuotas:
    """A tenant's quotas, as the router's Tenant carries them."""

    quota: Quota = NO_QUOTA
    model_quotas: tuple[tuple[str, Quota], ...] = ()


NONE = TenantQuotas()


class QuotaStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def list(self, tenant: str) -> list[QuotaRow]:
        """The tenant's quotas, the one over every model first."""
        with self.engine.connect() as conn:
            tenant_id = _tenant_id(conn, tenant)
            rows = conn.execute(
                sa.select(t_quotas)
                .where(t_quotas.c.tenant_id == tenant_id)
                .order_by(t_quotas.c.model)
            ).all()
        return [_row(r) for r in rows]

    def of(self, tenant: str) -> TenantQuotas:
        """The tenant's quotas for the router (none when it has none, or is unknown)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t_quotas)
                .join(t_tenants, t_tenants.c.id == t_quotas.c.tenant_id)
                .where(t_tenants.c.name == tenant)
            ).all()
        if not rows:
            return NONE
        quota, per_model = NO_QUOTA, []
        for r in rows:
            row = _row(r)
            if row.model:
                per_model.append((row.model, row.quota()))
            else:
                quota = row.quota()
        return TenantQuotas(quota, tuple(sorted(per_model, key=lambda m: m[0])))

    def set(self, tenant: str, row: QuotaRow, *, actor: str = "system") -> QuotaRow:
        """Replace the tenant's quota for ``row.model`` ("" over every model) with ``row``;
        a row with no rate removes it. Audited; returns what is stored now."""
        row = row.checked()
        with audit.audited(self.engine) as tx:
            conn = tx.conn
            tenant_id = _tenant_id(conn, tenant)
            where = (t_quotas.c.tenant_id == tenant_id) & (t_quotas.c.model == row.model)
            old = conn.execute(sa.select(t_quotas).where(where)).first()
            before = _row(old).described() if old is not None else None
            after = None if row.empty else row.described()
            if before == after:
                return row
            values = {k: v for k, v in row.described().items() if k != "model"}
            if after is None:
                conn.execute(t_quotas.delete().where(where))
            elif old is None:
                conn.execute(
                    t_quotas.insert().values(
                        tenant_id=tenant_id, model=row.model, updated_at=utcnow(), **values
                    )
                )
            else:
                conn.execute(t_quotas.update().where(where).values(updated_at=utcnow(), **values))
            tx.append(actor, "tenant.quota", f"tenant:{tenant}", before=before, after=after)
        return row


def _tenant_id(conn: sa.Connection, tenant: str) -> int:
    tenant_id = conn.execute(
        sa.select(t_tenants.c.id).where(
            (t_tenants.c.name == tenant) & t_tenants.c.deleted_at.is_(None)
        )
    ).scalar()
    if tenant_id is None:
        raise TenantNotFoundError(f"no tenant {tenant!r}")
    return int(tenant_id)


def _row(r: Any) -> QuotaRow:
    return QuotaRow(r.model, r.requests_per_s, r.requests_burst, r.rows_per_s, r.rows_burst)
