"""The console's cost page: device-hours and cost per tenant over time, by model and
version, idle capacity apart, for a date range; and the report as CSV, the same bytes
``gpugate costs report --format csv`` prints for the same range."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from markupsafe import Markup
from starlette.responses import Response

from serving.console.charts import stacked_bars
from serving.console.web import Page, page
from serving.costs import IDLE, render_report

# What the CSV download may be grouped by (the report's own group_by lists).
GROUPINGS = ("tenant", "tenant,model,version", "tenant,day", "model,version", "tenant,device")


def _range(page: Page) -> dict[str, str]:
    """The page's date range as the report's ``from``/``to`` (empty: the report's default,
    this month until now)."""
    return {"from": page.query("from"), "to": page.query("to")}


def _per_day(report: dict[str, Any], figure: str) -> tuple[list[str], dict[str, list[float]]]:
    """One figure per day and tenant (idle as its own series) from a tenant,day report."""
    days = sorted({r["day"] for r in report["rows"]})
    at = {d: i for i, d in enumerate(days)}
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(days))
    for r in report["rows"]:
        series[r["tenant"]][at[r["day"]]] += float(r[figure])
    ordered = dict(sorted(series.items(), key=lambda kv: (kv[0] == IDLE, -sum(kv[1]))))
    return days, ordered


@page("/costs")
async def costs(page: Page) -> Response:
    window = _range(page)
    by_day = await page.get("/costs", {**window, "group_by": "tenant,day"})
    by_version = await page.get("/costs", {**window, "group_by": "tenant,model,version"})
    days, series = _per_day(by_day, "gpu_hours")
    _, costs_series = _per_day(by_day, "cost")
    hours_chart = stacked_bars(
        days, series, title="Device-hours per day and tenant", unit="device-hours", muted=(IDLE,)
    )
    cost_chart = stacked_bars(
        days,
        costs_series,
        title=f"Cost per day and tenant ({by_day['currency']})",
        unit=by_day["currency"],
        muted=(IDLE,),
    )
    tenants = [r for r in by_version["rows"] if r["tenant"] != IDLE]
    idle = [r for r in by_version["rows"] if r["tenant"] == IDLE]
    return page.render(
        "costs.html",
        window=window,
        report=by_version,
        charts=(Markup(hours_chart), Markup(cost_chart)),
        days=days,
        series=series,
        tenants=tenants,
        idle=idle,
        groupings=GROUPINGS,
        idle_name=IDLE,
    )


@page("/costs.csv")
async def costs_csv(page: Page) -> Response:
    group_by = page.query("group_by", "tenant")
    report = await page.get("/costs", {**_range(page), "group_by": group_by})
    name = f"gpugate-costs-{report['from'][:10]}-{report['to'][:10]}.csv"
    return Response(
        render_report(report, "csv"),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


ROUTES = [costs, costs_csv]
