"""Finance's view of the ledger: device time and cost per group, with idle capacity.

Every figure comes from integer nanoseconds and integer nano-unit prices, summed
in SQL per (tenant, model, version, device, day, price) cell and combined here
with exact fractions, so totals reconcile: the groups' device time adds up to the
ledger's to the nanosecond, and used + idle = reserved for every model version.
Each tenant's cost is rounded once to the nano-unit and spread over its cells, so
costs reconcile too: every grouping, and the monthly invoice
(``serving.costs.invoice``), adds up the same whole nano-units.

Idle capacity follows OpenCost: a replica reserves ``uptime x device_share``;
what its batches did not use is idle, reported as the pseudo-tenant ``(idle)``,
or spread over the tenants in proportion to their use with ``share_idle``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import sqlalchemy as sa

from scheduler import split_by_rows
from serving.costs.ledger import NANOS, NS_PER_HOUR, Pricing, as_utc
from serving.state import ledger_allocations, ledger_batches, ledger_reservations

GROUP_KEYS = ("tenant", "model", "version", "device", "day")
IDLE = "(idle)"
# A replica whose heartbeat is older than this (and that never said it ended) is
# presumed dead since its last heartbeat; a fresher one is up until now.
LIVE_GRACE_S = 60.0


class ReportError(ValueError):
    """A report request that cannot be answered (bad dates, unknown group)."""


@dataclass
class Row:
    group: dict[str, str]
    requests: int = 0
    rows: int = 0
    used_ns: int = 0
    idle_ns: int = 0
    cost_exact: Fraction = field(default_factory=Fraction)  # in nano-units
    cost_nanos: int = 0  # what is billed, in whole nano-units: see _bill

    @property
    def total_ns(self) -> int:
        return self.used_ns + self.idle_ns

    def add(self, other: Row) -> None:
        self.requests += other.requests
        self.rows += other.rows
        self.used_ns += other.used_ns
        self.idle_ns += other.idle_ns
        self.cost_exact += other.cost_exact
        self.cost_nanos += other.cost_nanos

    def cost(self) -> Decimal:
        return (Decimal(self.cost_nanos) / NANOS).quantize(Decimal("0.000000001"))

    def as_dict(self, currency: str) -> dict[str, Any]:
        return {**self.group, **self.figures(currency)}

    def figures(self, currency: str) -> dict[str, Any]:
        """The row's figures without its group: what every report and invoice line shows."""
        return {
            "requests": self.requests,
            "rows": self.rows,
            "used_ns": self.used_ns,
            "idle_ns": self.idle_ns,
            "gpu_seconds": _seconds(self.total_ns),
            "gpu_hours": _hours(self.total_ns),
            "cost": format(self.cost(), "f"),
            "currency": currency,
        }


@dataclass
class Report:
    start: datetime
    end: datetime
    group_by: tuple[str, ...]
    currency: str
    rows: list[Row]
    total: Row
    reserved_ns: int  # what the replicas held in the window

    def as_dict(self) -> dict[str, Any]:
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "group_by": list(self.group_by),
            "currency": self.currency,
            "rows": [r.as_dict(self.currency) for r in self.rows],
            "totals": {
                **self.total.as_dict(self.currency),
                "reserved_ns": self.reserved_ns,
                "reserved_gpu_seconds": _seconds(self.reserved_ns),
            },
        }


def _seconds(ns: int) -> float:
    return ns / 1e9


def _hours(ns: int) -> float:
    return ns / NS_PER_HOUR


# A tenant's ``GET /usage`` spans at most a year (and a leap day) per call, so no key can
# make the gateway scan the whole ledger; finance's report has no such bound.
USAGE_MAX_DAYS = 366

_FIRST = datetime.min.replace(tzinfo=UTC)
_LAST = datetime.max.replace(tzinfo=UTC)


def bound(when: date | datetime, *, end_of_day: bool = False) -> datetime:
    """A report's bound in UTC: a day starts at its UTC midnight and, as an end
    (``end_of_day``), includes that whole day; a time without a zone is UTC. Bounds past
    what a datetime holds are clamped to its range."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            return when.replace(tzinfo=UTC)
        try:
            return when.astimezone(UTC)
        except OverflowError:
            return _LAST if when.year > 1 else _FIRST
    start = datetime.combine(when, time(), UTC)
    if not end_of_day:
        return start
    return start + timedelta(days=1) if when < date.max else _LAST


def parse_when(text: str, *, end_of_day: bool = False) -> datetime:
    """A day (``2026-11-22``; as ``--to`` it includes that whole day) or an ISO time."""
    try:
        when = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"not a date or ISO time: {text!r}") from None
    return bound(when, end_of_day=end_of_day)


def build_report(
    engine: sa.Engine,
    pricing: Pricing,
    start: datetime,
    end: datetime,
    group_by: Sequence[str] = ("tenant",),
    *,
    share_idle: bool = False,
    tenant: str | None = None,
    now: datetime | None = None,
) -> Report:
    """Device time and cost in ``[start, end)`` per group. ``tenant`` limits the report
    to that tenant's own usage (no idle capacity, which belongs to nobody)."""
    unknown = [g for g in group_by if g not in GROUP_KEYS]
    if unknown:
        raise ReportError(f"cannot group by {', '.join(unknown)}; choose from {GROUP_KEYS}")
    if end <= start:
        raise ReportError("the end (to) must be after the start (from)")
    cells, currencies = _usage_cells(engine, start, end, tenant)
    reserved: dict[tuple[str, str, str, str], int] = {}
    if tenant is None:
        reserved = _reserved(engine, start, end, now or datetime.now(UTC))
        _add_idle(cells, reserved, pricing, share_idle)
        currencies.add(pricing.currency)
    if len(currencies) > 1:
        raise ReportError(
            f"the window holds several currencies ({', '.join(sorted(currencies))}); "
            "report the ranges before and after the change separately"
        )
    _bill(cells)
    grouped: dict[tuple[str, ...], Row] = {}
    total = Row(group={})
    for key, row in cells.items():
        labels = dict(zip(("tenant", "model", "version", "device", "day"), key, strict=True))
        group = {g: labels[g] for g in group_by}
        gkey = tuple(group.values())
        grouped.setdefault(gkey, Row(group=group)).add(row)
        total.add(row)
    ordered = [grouped[k] for k in sorted(grouped)]
    return Report(
        start=start,
        end=end,
        group_by=tuple(group_by),
        currency=currencies.pop() if currencies else pricing.currency,
        rows=ordered,
        total=total,
        reserved_ns=sum(reserved.values()),
    )


Cell = tuple[str, str, str, str, str]  # tenant, model, version, device, day


def _day_of(engine: sa.Engine, column: Any) -> Any:
    if engine.dialect.name == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", column), "YYYY-MM-DD")
    return sa.func.date(column)  # SQLite stores UTC text


def _usage_cells(
    engine: sa.Engine, start: datetime, end: datetime, tenant: str | None
) -> tuple[dict[Cell, Row], set[str]]:
    b, a = ledger_batches.c, ledger_allocations.c
    day = _day_of(engine, b.finished_at).label("day")
    keys = (a.tenant, b.model, b.version, b.device, day, b.currency, b.price_nanos_per_hour)
    query = (
        sa.select(
            *keys,
            sa.func.sum(a.requests),
            sa.func.sum(a.rows),
            sa.func.sum(a.charge_ns),
        )
        .select_from(ledger_allocations.join(ledger_batches))
        .where(b.finished_at >= start, b.finished_at < end)
        .group_by(*keys)
    )
    if tenant is not None:
        query = query.where(a.tenant == tenant)
    cells: dict[Cell, Row] = {}
    currencies: set[str] = set()
    with engine.connect() as conn:
        for t, model, version, device, d, currency, price, n, rows, ns in conn.execute(query):
            currencies.add(currency)
            key: Cell = (t, model, version, device, str(d))
            row = cells.setdefault(key, Row(group={}))
            row.requests += int(n)
            row.rows += int(rows)
            row.used_ns += int(ns)
            row.cost_exact += Fraction(int(ns) * int(price), NS_PER_HOUR)
    return cells, currencies


def _reserved(
    engine: sa.Engine, start: datetime, end: datetime, now: datetime
) -> dict[tuple[str, str, str, str], int]:
    """Reserved ns per (model, version, device, day) from the replicas' rows."""
    r = ledger_reservations.c
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(
                r.model,
                r.version,
                r.device,
                r.device_share,
                r.started_at,
                r.last_seen_at,
                r.ended_at,
            ).where(r.started_at < end, sa.func.coalesce(r.ended_at, r.last_seen_at) > start)
        ).all()
    out: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for model, version, device, share, started, last_seen, ended in found:
        started, last_seen = as_utc(started), as_utc(last_seen)
        if ended is not None:
            until = as_utc(ended)
        elif last_seen > now - timedelta(seconds=LIVE_GRACE_S):
            until = now
        else:  # presumed dead since its last heartbeat (killed without warning)
            until = last_seen
        lo, hi = max(started, start), min(until, end)
        for day, seconds_ns in _split_days(lo, hi):
            out[(model, version, device, day)] += round(Fraction(seconds_ns) * Fraction(share))
    return dict(out)


def _split_days(lo: datetime, hi: datetime) -> Iterable[tuple[str, int]]:
    while lo < hi:
        midnight = datetime.combine(lo.date() + timedelta(days=1), time(), UTC)
        upto = min(midnight, hi)
        yield lo.date().isoformat(), _ns_between(lo, upto)
        lo = upto


def _ns_between(a: datetime, b: datetime) -> int:
    delta = b - a
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1_000


def _add_idle(
    cells: dict[Cell, Row],
    reserved: dict[tuple[str, str, str, str], int],
    pricing: Pricing,
    share_idle: bool,
) -> None:
    used: dict[tuple[str, str, str, str], list[Cell]] = defaultdict(list)
    for key in cells:
        used[key[1:]].append(key)
    for where, reserved_ns in reserved.items():
        model, version, device, day = where
        tenants = sorted(used.get(where, []))
        # Never below zero: a batch counts on the day it ends, so one that ran across
        # midnight on a replica stopped just after it can outweigh that day's reservation.
        idle_ns = max(0, reserved_ns - sum(cells[k].used_ns for k in tenants))
        price = pricing.price(device, date.fromisoformat(day)).nanos_per_hour
        if share_idle and tenants and idle_ns > 0:
            parts = split_by_rows(idle_ns, [max(cells[k].used_ns, 1) for k in tenants])
            for k, part in zip(tenants, parts, strict=True):
                cells[k].idle_ns += part
                cells[k].cost_exact += Fraction(part * price, NS_PER_HOUR)
            continue
        idle = cells.setdefault((IDLE, model, version, device, day), Row(group={}))
        idle.idle_ns += idle_ns
        idle.cost_exact += Fraction(idle_ns * price, NS_PER_HOUR)


def _bill(cells: dict[Cell, Row]) -> None:
    """Round each tenant's cost (and the idle row's) once, to the nano-unit, and spread
    it over the tenant's cells by largest remainder. Every grouping then sums the same
    integers: its rows add up to its TOTAL exactly, a tenant's cost is the same in every
    grouping and in its invoice, and a tenant's own view (``tenant=``) holds the same
    cells, so it shows the same cost too."""
    by_tenant: dict[str, list[Cell]] = defaultdict(list)
    for key in cells:
        by_tenant[key[0]].append(key)
    for keys in by_tenant.values():
        keys.sort()
        parts = apportion([cells[k].cost_exact for k in keys])
        for k, part in zip(keys, parts, strict=True):
            cells[k].cost_nanos = part


def apportion(exact: Sequence[Fraction]) -> list[int]:
    """Whole numbers, one per part, within 1 of each exact part, adding up to the exact
    sum rounded half to even: each part's floor, plus one for the parts with the largest
    remainders (earlier parts first among equal remainders)."""
    floors = [math.floor(x) for x in exact]
    short = round(sum(exact, Fraction(0))) - sum(floors)
    by_remainder = sorted(range(len(exact)), key=lambda i: (floors[i] - exact[i], i))
    for i in by_remainder[:short]:
        floors[i] += 1
    return floors


def report_for_query(
    engine: sa.Engine,
    pricing: Pricing,
    query: Mapping[str, str],
    *,
    tenant: str | None = None,
    default_group_by: str = "tenant",
    now: datetime | None = None,
    max_days: int | None = None,
) -> dict[str, Any]:
    """The HTTP form of a report: ``from``/``to`` (default: this UTC month so far),
    ``group_by`` (comma list), ``share_idle`` (true/false). A window longer than
    ``max_days`` days is refused. Raises ReportError."""
    unknown = sorted(set(query) - {"from", "to", "group_by", "share_idle"})
    if unknown:
        raise ReportError(f"unknown parameter(s): {', '.join(unknown)}")
    share = query.get("share_idle", "false").lower()
    if share not in {"true", "false", "1", "0"}:
        raise ReportError("share_idle must be true or false")
    now = now or datetime.now(UTC)
    start = parse_when(query["from"]) if "from" in query else _month_start(now)
    end = parse_when(query["to"], end_of_day=True) if "to" in query else now
    if max_days is not None and end - start > timedelta(days=max_days):
        raise ReportError(f"the window (from .. to) spans more than {max_days} days")
    return report_between(
        engine,
        pricing,
        start,
        end,
        query.get("group_by", default_group_by),
        share_idle=share in {"true", "1"},
        tenant=tenant,
        now=now,
    )


def _month_start(now: datetime) -> datetime:
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def report_between(
    engine: sa.Engine,
    pricing: Pricing,
    start: date | datetime | None,
    end: date | datetime | None,
    group_by: str,
    *,
    share_idle: bool = False,
    tenant: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A report as JSON data, from :func:`bound`'s bounds (``None``: from the first of
    this UTC month, until now) and comma-separated ``group_by``. Raises ReportError."""
    now = now or datetime.now(UTC)
    report = build_report(
        engine,
        pricing,
        bound(start) if start is not None else _month_start(now),
        bound(end, end_of_day=True) if end is not None else now,
        [g for g in group_by.split(",") if g],
        share_idle=share_idle,
        tenant=tenant,
        now=now,
    )
    return report.as_dict()
