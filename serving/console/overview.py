"""The console's overview, for leadership: adoption (tenants, requests and device-hours
per day, production models, promotions and rollbacks per week) and risk (approvals
waiting, guardrail refusals, failed rollouts, budgets near their end, the audit chain),
each figure linking to the page that explains it. The figures are ``GET /admin/overview``'s."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup
from starlette.responses import RedirectResponse, Response

from serving.console.charts import bars, stacked_bars
from serving.console.web import Page, page

DAYS = 30


def _charts(adoption: dict[str, Any]) -> dict[str, Markup]:
    per_day = adoption["per_day"]
    days = [d["day"] for d in per_day]
    weeks = [w["week"] for w in adoption["per_week"]]
    return {
        "requests": Markup(
            bars(days, [d["requests"] for d in per_day], title="Requests per day", unit="requests")
        ),
        "hours": Markup(
            bars(
                days,
                [d["device_hours"] for d in per_day],
                title="Device-hours per day",
                unit="device-hours",
            )
        ),
        "changes": Markup(
            stacked_bars(
                weeks,
                {
                    "promotions": [w["promotions"] for w in adoption["per_week"]],
                    "rollbacks": [w["rollbacks"] for w in adoption["per_week"]],
                },
                title="Promotions and rollbacks per week",
                unit="changes",
            )
        ),
    }


@page("/")
async def overview(page: Page) -> Response:
    figures = await page.get("/overview", {"days": DAYS})
    return page.render("overview.html", o=figures, charts=_charts(figures["adoption"]))


@page("/overview")
async def overview_alias(page: Page) -> Response:
    return RedirectResponse(f"{page.root}/", 303)


ROUTES = [overview, overview_alias]
