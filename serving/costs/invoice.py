"""Finance's monthly invoice: one statement per tenant for a calendar month (UTC).

An invoice is the cost report grouped by tenant, model, version and device over the
month, regrouped as statements: a statement's lines are that tenant's report rows, its
totals their sum. Costs are the report's whole nano-units (``report._bill``), so the
lines add up to their statement, a statement equals the tenant's row of the report for
the month, and the invoice's totals equal the report's TOTAL, each to the nano-unit.

Idle capacity is the report's too: with ``share_idle`` each tenant's lines carry its
share of it; without, it is the invoice's ``idle`` section (no tenant's bill) beside
the statements, so statements + idle = the report's TOTAL either way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from serving.costs.ledger import Pricing
from serving.costs.report import IDLE, ReportError, Row, bound, build_report

LINE_KEYS = ("model", "version", "device")
# YYYY-MM, year 0001 to 9999: a month a datetime holds.
PERIOD = re.compile(r"(?!0000)([0-9]{4})-(0[1-9]|1[0-2])")


def month_bounds(period: str) -> tuple[datetime, datetime]:
    """``[start, end)`` of a calendar month ``YYYY-MM`` in UTC. Raises ReportError."""
    match = PERIOD.fullmatch(period)
    if match is None:
        raise ReportError(f"not a month (YYYY-MM, from 0001-01 to 9999-12): {period!r}")
    year, month = int(match[1]), int(match[2])
    start = datetime(year, month, 1, tzinfo=UTC)
    if month < 12:
        return start, datetime(year, month + 1, 1, tzinfo=UTC)
    if year < 9999:
        return start, datetime(year + 1, 1, 1, tzinfo=UTC)
    return start, bound(datetime.max.date(), end_of_day=True)  # the last instant held


@dataclass
class Statement:
    """One tenant's usage for the month, line by (model, version, device), and totals.

    A statement is an object with room beside ``totals``: sections that are not about
    usage (a budget and its overrun, once tenants have budgets) belong there, so the
    lines and totals never change shape."""

    tenant: str
    lines: list[Row] = field(default_factory=list)
    totals: Row = field(default_factory=lambda: Row(group={}))

    def add(self, line: Row) -> None:
        self.lines.append(line)
        self.totals.add(line)

    def as_dict(self, currency: str, *, named: bool = True) -> dict[str, Any]:
        return {
            **({"tenant": self.tenant} if named else {}),
            "lines": [_line(row, currency) for row in self.lines],
            "totals": self.totals.figures(currency),
        }


def _line(row: Row, currency: str) -> dict[str, Any]:
    return {**{k: row.group[k] for k in LINE_KEYS}, **row.figures(currency)}


@dataclass
class Invoice:
    period: str
    start: datetime
    end: datetime
    closed: bool  # the month is over: its figures no longer grow
    currency: str
    share_idle: bool
    tenant: str | None
    statements: list[Statement]
    idle: Statement | None  # idle capacity no tenant is billed for
    totals: Row

    def as_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "closed": self.closed,
            "currency": self.currency,
            "share_idle": self.share_idle,
            "tenant": self.tenant,
            "statements": [s.as_dict(self.currency) for s in self.statements],
            "idle": self.idle.as_dict(self.currency, named=False) if self.idle else None,
            "totals": self.totals.figures(self.currency),
        }


def build_invoice(
    engine: sa.Engine,
    pricing: Pricing,
    period: str,
    *,
    tenant: str | None = None,
    share_idle: bool = False,
    now: datetime | None = None,
) -> Invoice:
    """The month's statements, from :func:`build_report`'s rows. ``tenant`` keeps that
    tenant's statement only (one with no lines when it used nothing), with its share of
    idle capacity under ``share_idle``, as in the invoice of every tenant."""
    start, end = month_bounds(period)
    now = now or datetime.now(UTC)
    # A tenant's cells, so its cost, are the same in its own report as in everyone's;
    # its share of idle capacity needs everyone's use.
    only = tenant if tenant is not None and not share_idle else None
    report = build_report(
        engine,
        pricing,
        start,
        end,
        ("tenant", *LINE_KEYS),
        share_idle=share_idle,
        tenant=only,
        now=now,
    )
    statements = _statements(report.rows)
    idle = statements.pop(IDLE, None)
    if tenant is not None:
        statements = {tenant: statements.get(tenant, Statement(tenant))}
        idle = None
    ordered = [statements[name] for name in sorted(statements)]
    totals = Row(group={})
    for part in [*ordered, *([idle] if idle else [])]:
        totals.add(part.totals)
    return Invoice(
        period=period,
        start=start,
        end=end,
        closed=end <= now,
        currency=report.currency,
        share_idle=share_idle,
        tenant=tenant,
        statements=ordered,
        idle=idle,
        totals=totals,
    )


def _statements(rows: Sequence[Row]) -> dict[str, Statement]:
    statements: dict[str, Statement] = {}
    for row in rows:
        name = row.group["tenant"]
        statements.setdefault(name, Statement(name)).add(row)
    return statements
