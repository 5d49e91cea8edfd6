"""Adoption: who uses the gateway and how much, what serves, and how often production
changes.

Requests and device-hours per day come from the cost report grouped by day and tenant
over the same bounds as ``GET /admin/costs?group_by=day&from=FIRST&to=LAST``, so each
day's figures are that report's (device-hours: the tenants' use plus idle reserved
capacity, the report's ``gpu_hours``). Promotions and rollbacks are counted from the
audit log's actions (:data:`PROMOTIONS`, :data:`ROLLBACKS`).
"""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from serving.costs import IDLE, NS_PER_HOUR, Pricing, Row, build_report
from serving.registry import Registry
from serving.state import audit
from serving.tenancy import TenantStore

# A version made production: by a promotion, a rollout's last step, or the config file
# at a gateway's first start (a rollout's promotion is one record of this action).
PROMOTIONS = ("model.promote.production",)
# Production taken back: an operator's rollback to the previous production version, and
# a canary sent back by the rollout controller's analysis or an operator's abort.
ROLLBACKS = ("model.rollback", "rollout.rollback", "rollout.abort")


def usage(
    engine: sa.Engine, pricing: Pricing, start: datetime, end: datetime, now: datetime
) -> dict[str, Any]:
    """Each UTC day of ``[start, end)`` (whole days) with its requests, rows and device
    time, zeros included, and the tenants with a request in the window."""
    report = build_report(engine, pricing, start, end, ("day", "tenant"), now=now)
    days: dict[str, Row] = {}
    day = start.date()
    while day < end.date():
        days[day.isoformat()] = Row(group={"day": day.isoformat()})
        day += timedelta(days=1)
    active: set[str] = set()
    for row in report.rows:
        days[row.group["day"]].add(row)
        if row.group["tenant"] != IDLE and row.requests > 0:
            active.add(row.group["tenant"])
    return {
        "per_day": [_day(row) for row in days.values()],
        "active_tenants": sorted(active),
        "totals": _day(report.total),
    }


def _day(row: Row) -> dict[str, Any]:
    return {
        **row.group,
        "requests": row.requests,
        "rows": row.rows,
        "used_ns": row.used_ns,
        "idle_ns": row.idle_ns,
        "device_hours": row.total_ns / NS_PER_HOUR,
    }


def enabled_tenants(tenants: TenantStore) -> int:
    """Tenants whose requests are served now (neither suspended nor deleted)."""
    return sum(1 for t in tenants.list() if t.status == "active")


def in_production(registry: Registry) -> list[str]:
    """``name:version`` of every version in production, by model name."""
    return [f"{v.name}:{v.version}" for v in registry.list(stage="production")]


def iso_week(day: date) -> str:
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"


def changes_per_week(engine: sa.Engine, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Each ISO week that meets ``[start, end)``, with the promotions and rollbacks
    recorded in the window during it (the first and last weeks only within it)."""
    records = audit.read(engine, actions=(*PROMOTIONS, *ROLLBACKS), since=start, until=end)
    counts: Counter[tuple[str, str]] = Counter()
    for r in records:
        kind = "promotions" if r.action in PROMOTIONS else "rollbacks"
        counts[(iso_week(r.at.date()), kind)] += 1
    weeks = []
    monday = start.date() - timedelta(days=start.date().weekday())
    while monday < end.date():
        week = iso_week(monday)
        weeks.append(
            {
                "week": week,
                "starts": monday.isoformat(),
                "promotions": counts[(week, "promotions")],
                "rollbacks": counts[(week, "rollbacks")],
            }
        )
        monday += timedelta(days=7)
    return weeks
