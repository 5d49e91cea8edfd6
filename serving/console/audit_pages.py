"""The console's audit page: the log, newest first, filtered by actor, action, target and
time, each record with its before and after; and the chain's verify result."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response

from serving.console.api import Refused
from serving.console.web import Page, page

PAGE_SIZE = 100
FILTERS = ("actor", "action", "target")


def _instant(text: str, what: str) -> str | None:
    """A ``datetime-local`` field (UTC) as the API's RFC 3339 time."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise Refused(400, f"{what} must be a time like 2026-12-01T09:30, not {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def _values(page: Page, name: str) -> list[str]:
    """A filter's values: the parameter may be repeated, and each may hold several values
    apart by spaces or commas (a record matches any of them)."""
    given = " ".join(page.request.query_params.getlist(name)).replace(",", " ")
    return list(dict.fromkeys(given.split()))  # each once, in the order given


@page("/audit")
async def audit_log(page: Page) -> Response:
    values = {f: _values(page, f) for f in FILTERS}
    chosen = {f: " ".join(v) for f, v in values.items()}
    since, until = page.query("since"), page.query("until")
    params: dict[str, Any] = {
        **{f: v for f, v in values.items() if v},
        "since": _instant(since, "since"),
        "until": _instant(until, "until"),
        "order": "desc",
        "limit": PAGE_SIZE,
        "before_seq": page.query("before") or None,
    }
    records = await page.get("/audit", params)
    check = await page.get("/audit/verify")
    older = records[-1]["seq"] if len(records) == PAGE_SIZE else None
    return page.render(
        "audit.html",
        records=records,
        check=check,
        chosen=chosen,
        since=since,
        until=until,
        older=older,
        pretty=_pretty,
    )


ROUTES = [audit_log]
