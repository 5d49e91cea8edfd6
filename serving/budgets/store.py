"""Tenants' budgets in the state database, and their spend from the cost ledger.

A budget is an amount of currency (the configured prices' currency) or of device-hours,
per calendar month (UTC) or over a fixed period. Spend is the tenant's own usage in the
period as the cost report computes it (``serving.costs.build_report`` with ``tenant``:
shadow traffic is billed to ``shadow``, idle capacity to nobody), in integers: currency
in nano-units, device time in ns, so a budget and the report agree exactly. Alert
thresholds are percentages; each is crossed at most once per tenant and period
(``budget_alerts``' unique constraint).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import sqlalchemy as sa

from router import Tenant
from serving.costs import Pricing, as_utc, build_report, month_bounds
from serving.costs.ledger import NANOS, NS_PER_HOUR
from serving.state import audit, utcnow
from serving.state import budget_alerts as t_alerts
from serving.state import budget_deliveries as t_deliveries
from serving.state import tenant_budgets as t_budgets
from serving.state import tenants as t_tenants
from serving.tenancy import TenantNotFoundError

Unit = Literal["currency", "device_hours"]
Action = Literal["notify", "reject", "best-effort"]
UNITS: tuple[Unit, ...] = ("currency", "device_hours")
ACTIONS: tuple[Action, ...] = ("notify", "reject", "best-effort")
DEFAULT_THRESHOLDS = (50, 80, 100)
_TS = sa.DateTime(timezone=True)
MAX_AMOUNT = Decimal(10) ** 9  # of currency or device-hours
# Spend units (currency nano-units, device ns) per micro-unit of a budget's amount: the
# database keeps amounts in micro-units, so a billion device-hours fits its 64 bits.
PER_MICRO = {"currency": 1000, "device_hours": NS_PER_HOUR // 10**6}
# A best-effort tenant's weight once its budget is exhausted.
BEST_EFFORT_WEIGHT = 0.01


@dataclass(frozen=True)
class Budget:
    """``amount`` in the spend's integer form (currency nano-units, or device ns), a whole
    number of micro-units (what the database keeps: :data:`PER_MICRO`)."""

    unit: Unit
    amount: int
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
    action: Action = "notify"
    period_start: datetime | None = None  # None: each calendar month (UTC)
    period_end: datetime | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None

    @classmethod
    def of(
        cls,
        unit: str,
        amount: Decimal | float | str,
        *,
        thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS,
        action: str = "notify",
        period: tuple[datetime, datetime] | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
    ) -> Budget:
        """A checked budget (ValueError names the problem); ``amount`` in currency or
        device-hours."""
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, not {unit!r}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
        value = Decimal(str(amount))
        if not value.is_finite() or not 0 < value <= MAX_AMOUNT:
            raise ValueError(f"amount must be more than 0 and at most {MAX_AMOUNT}")
        micro = max(1, int(value * 10**6))
        levels = tuple(sorted(set(thresholds)))
        if not levels or any(not 1 <= t <= 1000 for t in levels):
            raise ValueError("thresholds are percentages in 1..1000")
        if action != "notify" and 100 not in levels:
            levels = tuple(sorted({*levels, 100}))  # the action happens at the 100% crossing
        start = end = None
        if period is not None:
            start, end = (as_utc(t) for t in period)
            if end <= start:
                raise ValueError("the period must end after it starts")
        if (webhook_url is None) != (webhook_secret is None):
            raise ValueError("a webhook needs its URL and its signing secret")
        if webhook_url is not None and not webhook_url.startswith(("http://", "https://")):
            raise ValueError("the webhook URL must be http:// or https://")
        return cls(
            unit,
            micro * PER_MICRO[unit],
            levels,
            action,
            start,
            end,
            webhook_url,
            webhook_secret,
        )

    def period(self, now: datetime) -> tuple[datetime, datetime]:
        """The period ``now`` falls in (a fixed one: itself, whenever now is)."""
        if self.period_start is not None and self.period_end is not None:
            return self.period_start, self.period_end
        return month_bounds(f"{now.astimezone(UTC):%Y-%m}")

    def display(self, value: int) -> str:
        """A unit-integer in currency or device-hours, exactly."""
        scale = NANOS if self.unit == "currency" else NS_PER_HOUR
        return format((Decimal(value) / scale).normalize(), "f")

    def described(self) -> dict[str, Any]:
        """The API's and the audit record's form (never the webhook secret)."""
        return {
            "unit": self.unit,
            "amount": self.display(self.amount),
            "thresholds": list(self.thresholds),
            "action": self.action,
            "period": "month"
            if self.period_start is None
            else {"from": _iso(self.period_start), "to": _iso(self.period_end)},
            "webhook_url": self.webhook_url,
        }


@dataclass(frozen=True)
class Spend:
    """A tenant's spend in a budget's period: ``spent`` in the budget's unit-integer."""

    budget: Budget
    start: datetime
    end: datetime
    spent: int
    at: datetime

    @property
    def percent(self) -> float:
        return 100 * self.spent / self.budget.amount

    def crossed(self) -> list[int]:
        """The thresholds at or under the spend (exact integer comparison)."""
        return [t for t in self.budget.thresholds if self.spent * 100 >= self.budget.amount * t]

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.budget.amount

    def forecast(self) -> int:
        """The spend at the period's end at the rate so far (linear)."""
        elapsed = (min(self.at, self.end) - self.start).total_seconds()
        total = (self.end - self.start).total_seconds()
        if elapsed <= 0:
            return self.spent
        return math.floor(self.spent * total / elapsed)

    def described(self) -> dict[str, Any]:
        budget = self.budget
        return {
            "from": _iso(self.start),
            "to": _iso(self.end),
            "spent": budget.display(self.spent),
            "percent": round(self.percent, 3),
            "forecast": budget.display(self.forecast()),
            "exhausted": self.exhausted,
        }


@dataclass(frozen=True)
class Alert:
    """A threshold crossed: ``spend`` in spend units, ``amount_micro`` the budget's amount
    then, in micro-units (:meth:`shown` gives both in the budget's unit)."""

    id: int
    tenant: str
    period_start: datetime
    threshold: int
    spend: int
    amount_micro: int
    crossed_at: datetime

    def shown(self, budget: Budget) -> tuple[str, str]:
        """The spend and the amount, in the budget's unit."""
        limit = self.amount_micro * PER_MICRO[budget.unit]
        return budget.display(self.spend), budget.display(limit)


class BudgetStore:
    def __init__(self, engine: sa.Engine, pricing: Pricing) -> None:
        self.engine = engine
        self.pricing = pricing

    # -- the budget ---------------------------------------------------------------

    def set(self, tenant: str, budget: Budget, *, actor: str = "system") -> Budget:
        """Give the tenant ``budget`` (replacing its budget); audited. This period's
        crossings that the new budget is not past (a raised amount) are withdrawn, so
        that they can be crossed again and an exhausted tenant is served again."""
        spend = self.spend(tenant, budget)  # the ledger, before the audit lock is taken
        with audit.audited(self.engine) as tx:
            conn = tx.conn
            tenant_id = _tenant_id(conn, tenant)
            reached = spend.crossed()
            withdrawn = sorted(
                conn.execute(
                    t_alerts.delete()
                    .where(
                        (t_alerts.c.tenant_id == tenant_id)
                        & (t_alerts.c.period_start == spend.start)
                        & t_alerts.c.threshold.not_in(reached or [-1])
                    )
                    .returning(t_alerts.c.threshold)
                ).scalars()
            )
            old = conn.execute(
                sa.select(t_budgets).where(t_budgets.c.tenant_id == tenant_id)
            ).first()
            values = _columns(budget)
            if old is None:
                conn.execute(t_budgets.insert().values(tenant_id=tenant_id, **values))
            else:
                conn.execute(
                    t_budgets.update().where(t_budgets.c.tenant_id == tenant_id).values(**values)
                )
            before = _budget(old).described() if old is not None else None
            after = {**budget.described(), "withdrawn": withdrawn}
            tx.append(actor, "tenant.budget", f"tenant:{tenant}", before=before, after=after)
        return budget

    def clear(self, tenant: str, *, actor: str = "system") -> bool:
        """Remove the tenant's budget (its alerts stay on record); audited."""
        with audit.audited(self.engine) as tx:
            conn = tx.conn
            tenant_id = _tenant_id(conn, tenant)
            old = conn.execute(
                sa.select(t_budgets).where(t_budgets.c.tenant_id == tenant_id)
            ).first()
            if old is None:
                return False
            conn.execute(t_budgets.delete().where(t_budgets.c.tenant_id == tenant_id))
            tx.append(actor, "tenant.budget", f"tenant:{tenant}", before=_budget(old).described())
        return True

    def get(self, tenant: str) -> Budget | None:
        with self.engine.connect() as conn:
            tenant_id = _tenant_id(conn, tenant)
            row = conn.execute(
                sa.select(t_budgets).where(t_budgets.c.tenant_id == tenant_id)
            ).first()
        return _budget(row) if row is not None else None

    def all(self) -> list[tuple[str, Budget]]:
        """Every live tenant's budget, by tenant name."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t_tenants.c.name, t_budgets)
                .join(t_tenants, t_tenants.c.id == t_budgets.c.tenant_id)
                .where(t_tenants.c.deleted_at.is_(None))
                .order_by(t_tenants.c.name)
            ).all()
        return [(r.name, _budget(r)) for r in rows]

    def guard(self, tenant: Tenant, now: datetime | None = None) -> Tenant:
        """``tenant`` as the router must treat it: unchanged unless its budget's 100% has
        been crossed this period (recorded by the monitor) and its action is ``reject``
        (every request refused 403) or ``best-effort`` (the least urgent level, weight
        :data:`BEST_EFFORT_WEIGHT`)."""
        now = now or datetime.now(UTC)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t_budgets, t_tenants.c.id.label("tid"))
                .join(t_tenants, t_tenants.c.id == t_budgets.c.tenant_id)
                .where(t_tenants.c.name == tenant.name)
            ).first()
            if row is None or row.action == "notify":
                return tenant
            budget = _budget(row)
            start, end = budget.period(now)
            exhausted = conn.execute(
                sa.select(t_alerts.c.id)
                .where(
                    (t_alerts.c.tenant_id == row.tid)
                    & (t_alerts.c.period_start == start)
                    & (t_alerts.c.threshold >= 100)
                )
                .limit(1)
            ).first()
        if exhausted is None:
            return tenant
        if budget.action == "reject":
            unit = self.pricing.currency if budget.unit == "currency" else "device-hours"
            reason = f"{budget.display(budget.amount)} {unit} spent; until {_iso(end)}"
            return dataclasses.replace(tenant, over_budget=reason)
        return dataclasses.replace(
            tenant, weight=min(tenant.weight, BEST_EFFORT_WEIGHT), demoted=True
        )

    def summary(self, tenant: str, now: datetime | None = None) -> dict[str, Any] | None:
        """The tenant's budget as the tenant may see it: its settings (the webhook's URL,
        never its secret), this period's spend and forecast, the thresholds crossed."""
        budget = self.get(tenant)
        if budget is None:
            return None
        spend = self.spend(tenant, budget, now)
        unit = self.pricing.currency if budget.unit == "currency" else "device_hours"
        crossed = [a.threshold for a in self.alerts(tenant, spend.start)]
        return {**budget.described(), "unit": unit, **spend.described(), "crossed": crossed}

    # -- spend and alerts ------------------------------------------------------------

    def spend(self, tenant: str, budget: Budget, now: datetime | None = None) -> Spend:
        """The tenant's spend in the budget's current period, from the cost ledger."""
        now = now or datetime.now(UTC)
        start, end = budget.period(now)
        until = min(now, end)
        spent = 0
        if until > start:
            total = build_report(
                self.engine, self.pricing, start, until, ("tenant",), tenant=tenant, now=now
            ).total
            spent = total.cost_nanos if budget.unit == "currency" else total.used_ns
        return Spend(budget, start, end, spent, now)

    def record_crossings(self, tenant: str, spend: Spend) -> list[Alert]:
        """Record each threshold the spend has reached and no one recorded before for the
        period: the alerts new now (none when another process recorded them first)."""
        crossed = spend.crossed()
        if not crossed:
            return []
        new: list[Alert] = []
        with audit.audited(self.engine) as tx:
            conn = tx.conn
            tenant_id = _tenant_id(conn, tenant)
            known = set(
                conn.execute(
                    sa.select(t_alerts.c.threshold).where(
                        (t_alerts.c.tenant_id == tenant_id)
                        & (t_alerts.c.period_start == spend.start)
                    )
                ).scalars()
            )
            for threshold in crossed:
                if threshold in known:
                    continue
                at = utcnow()
                alert_id = conn.execute(
                    t_alerts.insert()
                    .values(
                        tenant_id=tenant_id,
                        period_start=spend.start,
                        threshold=threshold,
                        spend=spend.spent,
                        amount=spend.budget.amount // PER_MICRO[spend.budget.unit],
                        crossed_at=at,
                    )
                    .returning(t_alerts.c.id)
                ).scalar_one()
                new.append(
                    Alert(
                        alert_id,
                        tenant,
                        spend.start,
                        threshold,
                        spend.spent,
                        spend.budget.amount // PER_MICRO[spend.budget.unit],
                        at,
                    )
                )
                tx.append(
                    "budget",
                    "tenant.budget_alert",
                    f"tenant:{tenant}",
                    after={"threshold": threshold, **spend.described(), "unit": spend.budget.unit},
                )
        return new

    def crossings(self, now: datetime | None = None) -> list[tuple[str, int]]:
        """Every live budgeted tenant's thresholds crossed in its current period."""
        month_start, _ = month_bounds(f"{(now or datetime.now(UTC)).astimezone(UTC):%Y-%m}")
        # The current period's start: the budget's own (fixed), else this month's.
        current = sa.func.coalesce(t_budgets.c.period_start, sa.literal(month_start, _TS))
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t_tenants.c.name, t_alerts.c.threshold)
                .join(t_budgets, t_budgets.c.tenant_id == t_alerts.c.tenant_id)
                .join(t_tenants, t_tenants.c.id == t_alerts.c.tenant_id)
                .where(t_tenants.c.deleted_at.is_(None) & (t_alerts.c.period_start == current))
                .order_by(t_tenants.c.name, t_alerts.c.threshold)
            ).all()
        return [(r.name, r.threshold) for r in rows]

    def alerts(self, tenant: str, period_start: datetime | None = None) -> list[Alert]:
        """The tenant's alerts, oldest first (of one period, if given)."""
        with self.engine.connect() as conn:
            tenant_id = _tenant_id(conn, tenant)
            query = sa.select(t_alerts).where(t_alerts.c.tenant_id == tenant_id)
            if period_start is not None:
                query = query.where(t_alerts.c.period_start == period_start)
            rows = conn.execute(query.order_by(t_alerts.c.id)).all()
        return [_alert(tenant, r) for r in rows]

    def record_delivery(
        self, alert_id: int, attempt: int, ok: bool, http_status: int | None, error: str | None
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                t_deliveries.insert().values(
                    alert_id=alert_id,
                    attempt=attempt,
                    at=utcnow(),
                    ok=ok,
                    http_status=http_status,
                    error=error[:2000] if error else None,
                )
            )

    def deliveries(self, alert_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t_deliveries)
                .where(t_deliveries.c.alert_id == alert_id)
                .order_by(t_deliveries.c.attempt)
            ).all()
        return [
            {
                "attempt": r.attempt,
                "at": _iso(as_utc(r.at)),
                "ok": r.ok,
                "http_status": r.http_status,
                "error": r.error,
            }
            for r in rows
        ]


def _tenant_id(conn: sa.Connection, tenant: str) -> int:
    tenant_id = conn.execute(
        sa.select(t_tenants.c.id).where(
            (t_tenants.c.name == tenant) & t_tenants.c.deleted_at.is_(None)
        )
    ).scalar()
    if tenant_id is None:
        raise TenantNotFoundError(f"no tenant {tenant!r}")
    return int(tenant_id)


def _row_of(conn: sa.Connection, tenant_id: int) -> Any:
    return conn.execute(sa.select(t_budgets).where(t_budgets.c.tenant_id == tenant_id)).first()


def _columns(budget: Budget) -> dict[str, Any]:
    return {
        "unit": budget.unit,
        "amount": budget.amount // PER_MICRO[budget.unit],
        "period_start": budget.period_start,
        "period_end": budget.period_end,
        "thresholds": json.dumps(list(budget.thresholds)),
        "action": budget.action,
        "webhook_url": budget.webhook_url,
        "webhook_secret": budget.webhook_secret,
        "updated_at": utcnow(),
    }


def _budget(r: Any) -> Budget:
    return Budget(
        r.unit,
        int(r.amount) * PER_MICRO[r.unit],
        tuple(json.loads(r.thresholds)),
        r.action,
        as_utc(r.period_start) if r.period_start is not None else None,
        as_utc(r.period_end) if r.period_end is not None else None,
        r.webhook_url,
        r.webhook_secret,
    )


def _alert(tenant: str, r: Any) -> Alert:
    return Alert(
        r.id, tenant, as_utc(r.period_start), r.threshold, r.spend, r.amount, as_utc(r.crossed_at)
    )


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat()
