"""Watches every tenant's budget: records each threshold crossing once, and delivers it
to the tenant's webhook.

One monitor runs per deployment, in the control loop's replica (serving.cluster.control).
Each pass computes every budgeted tenant's spend from the ledger and records the
thresholds it reached (:meth:`BudgetStore.record_crossings`: once per tenant, period and
threshold, audited); a crossing with a webhook is then POSTed there, off the pass:

* body: JSON ``{"event": "budget.threshold", "alert_id", "tenant", "threshold", "unit",
  "amount", "spent", "period": {"from", "to"}, "crossed_at"}``;
* ``X-Gpugate-Timestamp``: Unix seconds; ``X-Gpugate-Signature``: ``sha256=`` and the hex
  HMAC-SHA256 of ``"<timestamp>.<body>"`` under the budget's webhook secret;
* a 2xx answer delivers it; otherwise it is tried again after 1, 2, 4 and 8 s (5 attempts
  in all), each attempt recorded in ``budget_deliveries``.

What the gateways do at 100% (reject, best effort) follows from the recorded crossing:
they read it with the tenant (serving.tenancy.directory).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from router.metrics import RouterMetrics
from serving.budgets.store import Alert, Budget, BudgetStore

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 5.0
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0)
DELIVERY_TIMEOUT_S = 10.0
SIGNATURE_HEADER = "X-Gpugate-Signature"
TIMESTAMP_HEADER = "X-Gpugate-Timestamp"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """What a webhook receiver recomputes to check a delivery came from this gateway."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def alert_body(alert: Alert, budget: Budget) -> bytes:
    start, end = budget.period(alert.period_start)
    return json.dumps(
        {
            "event": "budget.threshold",
            "alert_id": alert.id,
            "tenant": alert.tenant,
            "threshold": alert.threshold,
            "unit": budget.unit,
            "amount": alert.shown(budget)[1],
            "spent": alert.shown(budget)[0],
            "period": {"from": start.isoformat(), "to": end.isoformat()},
            "crossed_at": alert.crossed_at.isoformat(),
        },
        separators=(",", ":"),
    ).encode()


def publish(
    store: BudgetStore, metrics: RouterMetrics, spend_too: bool, now: datetime | None = None
) -> None:
    """Set the budget gauges from the state (blocking): the thresholds each tenant crossed
    this period and, with ``spend_too``, every budget's amount, spend and forecast."""
    now = now or datetime.now(UTC)
    crossed = store.crossings(now)
    metrics.budget_alerts.clear()
    for tenant, threshold in crossed:
        metrics.budget_alerts.labels(tenant, str(threshold)).set(1)
    if not spend_too:
        return
    figures = []
    for tenant, budget in store.all():
        spend = store.spend(tenant, budget, now)
        unit = store.pricing.currency if budget.unit == "currency" else "device_hours"
        shown = (budget.display(budget.amount), budget.display(spend.spent))
        figures.append((tenant, unit, *shown, budget.display(spend.forecast())))
    for gauge in (metrics.budget_amount, metrics.budget_spent, metrics.budget_forecast):
        gauge.clear()
    for tenant, unit, amount, spent, forecast in figures:
        metrics.budget_amount.labels(tenant, unit).set(float(amount))
        metrics.budget_spent.labels(tenant, unit).set(float(spent))
        metrics.budget_forecast.labels(tenant, unit).set(float(forecast))


class BudgetMonitor:
    def __init__(
        self,
        store: BudgetStore,
        *,
        retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self._retry_delays_s = retry_delays_s
        self._clock = clock
        self._deliveries: set[asyncio.Task[bool]] = set()

    def check(self) -> list[tuple[Alert, Budget]]:
        """One pass (blocking): every budget's new crossings."""
        now = self._clock()
        new: list[tuple[Alert, Budget]] = []
        for tenant, budget in self.store.all():
            try:
                spend = self.store.spend(tenant, budget, now)
                new += [(a, budget) for a in self.store.record_crossings(tenant, spend)]
            except Exception:  # one tenant's failure must not stop the others' alerts
                log.exception("budget check of tenant %s failed", tenant)
        for alert, _ in new:
            log.warning(
                "tenant %s crossed %d%% of its budget (period from %s)",
                alert.tenant,
                alert.threshold,
                alert.period_start.date(),
            )
        return new

    async def run(self, interval_s: float = CHECK_INTERVAL_S) -> None:
        """Check every ``interval_s`` until cancelled; deliver the new crossings."""
        while True:
            try:
                for alert, budget in await asyncio.to_thread(self.check):
                    if budget.webhook_url is not None:
                        task = asyncio.create_task(self.deliver(alert, budget))
                        self._deliveries.add(task)
                        task.add_done_callback(self._deliveries.discard)
            except Exception:
                log.exception("budget check failed; trying again in %ss", interval_s)
            await asyncio.sleep(interval_s)

    async def deliver(self, alert: Alert, budget: Budget) -> bool:
        """POST the alert to the budget's webhook, retrying with back-off; True once a
        2xx answer came. Every attempt is recorded."""
        assert budget.webhook_url is not None and budget.webhook_secret is not None
        body = alert_body(alert, budget)
        delays = (0.0, *self._retry_delays_s)
        async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT_S) as client:
            for attempt, delay in enumerate(delays, start=1):
                await asyncio.sleep(delay)
                stamp = str(int(time.time()))
                headers = {
                    "Content-Type": "application/json",
                    TIMESTAMP_HEADER: stamp,
                    SIGNATURE_HEADER: signature(budget.webhook_secret, stamp, body),
                }
                status: int | None = None
                error: str | None = None
                try:
                    answer = await client.post(budget.webhook_url, content=body, headers=headers)
                    status = answer.status_code
                    if not 200 <= status < 300:
                        error = f"HTTP {status}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                ok = error is None
                await asyncio.to_thread(
                    self.store.record_delivery, alert.id, attempt, ok, status, error
                )
                if ok:
                    return True
                log.warning(
                    "budget alert %d to %s: attempt %d failed: %s",
                    alert.id,
                    budget.webhook_url,
                    attempt,
                    error,
                )
        return False

    async def close(self) -> None:
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
