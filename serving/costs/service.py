"""The ledger's reports for HTTP callers: finance's report and invoice (the admin API's
``/costs`` and ``/costs/invoice``) and a tenant's own usage (``GET /usage``)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa

from router import InvalidArgument
from serving.costs.invoice import build_invoice
from serving.costs.ledger import Pricing
from serving.costs.report import USAGE_MAX_DAYS, ReportError, report_between, report_for_query


class LedgerReports:
    """Reports on one ledger, priced by one config. A tenant's usage spans at most
    :data:`USAGE_MAX_DAYS` days per call and runs in a thread; finance's calls block
    (the admin API runs them in its thread pool)."""

    def __init__(self, engine: sa.Engine, pricing: Pricing) -> None:
        self._engine = engine
        self._pricing = pricing

    async def usage(self, tenant: str, query: Mapping[str, str]) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(
                report_for_query,
                self._engine,
                self._pricing,
                query,
                tenant=tenant,
                default_group_by="model,day",
                max_days=USAGE_MAX_DAYS,
            )
        except ReportError as exc:
            raise InvalidArgument(str(exc)) from None

    def report(
        self,
        start: date | datetime | None,
        end: date | datetime | None,
        group_by: str,
        *,
        share_idle: bool = False,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """:func:`report_between` on this ledger."""
        return report_between(
            self._engine,
            self._pricing,
            start,
            end,
            group_by,
            share_idle=share_idle,
            tenant=tenant,
        )

    def invoice(
        self, period: str, *, tenant: str | None = None, share_idle: bool = False
    ) -> dict[str, Any]:
        """:func:`build_invoice` on this ledger, as JSON data."""
        return build_invoice(
            self._engine, self._pricing, period, tenant=tenant, share_idle=share_idle
        ).as_dict()
