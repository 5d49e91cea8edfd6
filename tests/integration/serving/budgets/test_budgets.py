"""Budgets against real databases (SQLite and PostgreSQL: the ``engine`` fixture): spend
from the ledger agrees with the cost report exactly, each threshold is crossed once per
period, and alerts reach a real HTTP webhook signed, with retries recorded."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from router import Tenant
from router.metrics import RouterMetrics
from serving.budgets import Budget, BudgetMonitor, BudgetStore, publish, signature
from serving.costs import build_report
from serving.costs.ledger import Ledger, Pricing
from serving.state import audit
from serving.tenancy import TenantStore
from tests.integration.serving.costs.test_ledger import PRICES, record

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
MONTH = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def store(engine: sa.Engine) -> BudgetStore:
    TenantStore(engine).create("acme")
    TenantStore(engine).create("globex")
    return BudgetStore(engine, Pricing(PRICES))


def _spend(engine: sa.Engine) -> None:
    """acme: 4 s + 1 s of a CPU this month, 1 s last month; globex: 1 s this month."""
    Ledger(engine, Pricing(PRICES)).write(
        [
            record("digits", [("acme", 3), ("globex", 1)], 4 * 10**9, NOW - timedelta(hours=2)),
            record("digits", [("acme", 1)], 10**9, NOW - timedelta(hours=1)),
            record("digits", [("acme", 1)], 10**9, MONTH - timedelta(minutes=1)),
        ]
    )


def test_a_budget_is_checked_set_and_audited(store: BudgetStore) -> None:
    for bad, message in [
        (dict(unit="euros", amount=1), "unit"),
        (dict(unit="currency", amount=0), "amount"),
        (dict(unit="currency", amount="NaN"), "amount"),
        (dict(unit="currency", amount=1, thresholds=(0,)), "thresholds"),
        (dict(unit="currency", amount=1, action="shout"), "action"),
        (dict(unit="currency", amount=1, webhook_url="http://x"), "secret"),
        (dict(unit="currency", amount=1, webhook_url="ftp://x", webhook_secret="s"), "http"),
    ]:
        with pytest.raises(ValueError, match=message):
            Budget.of(**bad)  # type: ignore[arg-type]
    budget = Budget.of("device_hours", "0.5", thresholds=(80,), action="reject")
    assert budget.thresholds == (80, 100) and budget.amount == 1800 * 10**9  # 100% added
    store.set("acme", budget, actor="finance")
    assert store.get("acme") == budget and store.get("globex") is None
    assert store.all() == [("acme", budget)]
    records = [r for r in audit.read(store.engine) if r.action == "tenant.budget"]
    assert [(r.actor, r.after["amount"], r.after["unit"]) for r in records] == [
        ("finance", "0.5", "device_hours")
    ]
    assert store.clear("acme") and store.get("acme") is None and not store.clear("acme")


def test_spend_is_the_cost_reports_to_the_nano_unit(engine: sa.Engine, store: BudgetStore) -> None:
    _spend(engine)
    pricing = Pricing(PRICES)
    report = build_report(engine, pricing, MONTH, NOW, ("tenant",), tenant="acme", now=NOW)
    money = store.spend("acme", Budget.of("currency", 1), NOW)
    time_ = store.spend("acme", Budget.of("device_hours", 1), NOW)
    assert money.spent == report.total.cost_nanos > 0
    assert time_.spent == report.total.used_ns == 4 * 10**9 * 3 // 4 + 10**9  # last month out
    assert (money.start, money.end) == (MONTH, datetime(2026, 12, 1, tzinfo=UTC))
    # A fixed period: only its own usage.
    fixed = Budget.of("device_hours", 1, period=(MONTH - timedelta(hours=1), MONTH))
    assert store.spend("acme", fixed, NOW).spent == 10**9


def test_each_threshold_is_crossed_once_per_period(engine: sa.Engine, store: BudgetStore) -> None:
    _spend(engine)
    # acme used 4 device-seconds this month: 4 / 5 = 80% of a 5 s budget.
    budget = Budget.of("device_hours", Decimal(5) / 3600, thresholds=(50, 80, 100))
    store.set("acme", budget)
    spend = store.spend("acme", budget, NOW)
    assert spend.crossed() == [50, 80] and not spend.exhausted
    first = store.record_crossings("acme", spend)
    assert [a.threshold for a in first] == [50, 80]
    assert store.record_crossings("acme", spend) == []  # once
    Ledger(engine, Pricing(PRICES)).write([record("digits", [("acme", 1)], 10**9, NOW)])
    later = store.spend("acme", budget, NOW + timedelta(minutes=1))
    assert later.exhausted and [a.threshold for a in store.record_crossings("acme", later)] == [100]
    # The next month starts again.
    december = store.spend("acme", budget, datetime(2026, 12, 2, tzinfo=UTC))
    assert december.spent == 0 and december.crossed() == []
    alerts = [r for r in audit.read(engine) if r.action == "tenant.budget_alert"]
    assert [r.after["threshold"] for r in alerts] == [50, 80, 100]


class Receiver:
    """A real HTTP server that fails its first ``failures`` deliveries."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                status = 503 if len(receiver.received) <= receiver.failures else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_alert_reaches_the_webhook_signed_after_retries(
    engine: sa.Engine, store: BudgetStore
) -> None:
    _spend(engine)
    receiver = Receiver(failures=2)
    try:
        budget = Budget.of(
            "device_hours",
            Decimal(8) / 3600,
            thresholds=(50,),
            webhook_url=receiver.url,
            webhook_secret="s3cret",
        )
        store.set("acme", budget)
        monitor = BudgetMonitor(store, retry_delays_s=(0.05, 0.05, 0.05), clock=lambda: NOW)
        ((alert, got_budget),) = monitor.check()
        assert monitor.check() == []  # nothing new the second time
        assert asyncio.run(monitor.deliver(alert, got_budget))
    finally:
        receiver.close()
    assert len(receiver.received) == 3  # two 503s, then delivered
    for headers, body in receiver.received:
        expected = signature("s3cret", headers["X-Gpugate-Timestamp"], body)
        assert hmac.compare_digest(headers["X-Gpugate-Signature"], expected)
        mac = hmac.new(
            b"s3cret", headers["X-Gpugate-Timestamp"].encode() + b"." + body, hashlib.sha256
        )
        assert expected == "sha256=" + mac.hexdigest()
    sent = json.loads(receiver.received[-1][1])
    assert sent == {
        "event": "budget.threshold",
        "alert_id": alert.id,
        "tenant": "acme",
        "threshold": 50,
        "unit": "device_hours",
        "amount": Budget.of("device_hours", Decimal(8) / 3600).display(budget.amount),
        "spent": budget.display(4 * 10**9),
        "period": {"from": MONTH.isoformat(), "to": "2026-12-01T00:00:00+00:00"},
        "crossed_at": alert.crossed_at.isoformat(),
    }
    attempts = store.deliveries(alert.id)
    assert [(d["attempt"], d["ok"], d["http_status"]) for d in attempts] == [
        (1, False, 503),
        (2, False, 503),
        (3, True, 204),
    ]


def test_the_gauges_show_budgets_spend_and_crossings(engine: sa.Engine, store: BudgetStore) -> None:
    _spend(engine)  # acme: 4 device-seconds this month
    budget = Budget.of("device_hours", Decimal(5) / 3600)
    store.set("acme", budget)
    store.set("globex", Budget.of("currency", "12.5"))
    store.record_crossings("acme", store.spend("acme", budget, NOW))
    metrics = RouterMetrics(CollectorRegistry())
    publish(store, metrics, spend_too=True, now=NOW)
    sample = metrics.registry.get_sample_value
    assert sample("gpugate_tenant_budget_alert", {"tenant": "acme", "threshold": "50"}) == 1
    assert sample("gpugate_tenant_budget_alert", {"tenant": "acme", "threshold": "100"}) is None
    acme = {"tenant": "acme", "unit": "device_hours"}
    assert sample("gpugate_tenant_budget_amount", acme) == pytest.approx(5 / 3600, rel=1e-3)
    spent = store.spend("acme", budget, NOW).spent / 3600e9
    assert sample("gpugate_tenant_budget_spent", acme) == pytest.approx(spent, rel=1e-12)
    assert sample("gpugate_tenant_budget_forecast", acme) >= spent
    globex = {"tenant": "globex", "unit": "USD"}
    assert sample("gpugate_tenant_budget_amount", globex) == 12.5
    store.clear("globex")  # a budget removed leaves no series behind
    publish(store, metrics, spend_too=True, now=NOW)
    assert sample("gpugate_tenant_budget_amount", globex) is None


def test_a_raised_budget_withdraws_the_crossings_it_is_not_past(
    engine: sa.Engine, store: BudgetStore
) -> None:
    """Finance raises an exhausted tenant's budget: it is served again, and the
    thresholds the new amount is not past can be crossed (and alerted) again."""
    now = datetime.now(UTC)
    Ledger(engine, Pricing(PRICES)).write([record("digits", [("acme", 1)], 4 * 10**9, now)])
    tenant = Tenant("acme", 1.0, frozenset({"*"}))
    tight = Budget.of("device_hours", Decimal(2) / 3600, action="reject")  # 4 s of 2 s
    store.set("acme", tight)
    spend = store.spend("acme", tight)
    assert [a.threshold for a in store.record_crossings("acme", spend)] == [50, 80, 100]
    assert store.guard(tenant).over_budget is not None  # refused
    raised = Budget.of("device_hours", Decimal(6) / 3600, action="reject")  # 4 s of 6 s
    store.set("acme", raised, actor="finance")
    assert [a.threshold for a in store.alerts("acme", spend.start)] == [50]
    assert store.guard(tenant) == tenant  # served again
    changed = [r for r in audit.read(engine) if r.action == "tenant.budget"][-1]
    assert changed.after["withdrawn"] == [80, 100] and changed.actor == "finance"
    # best-effort at 100%: the least urgent level and a minimal weight.
    store.set("acme", Budget.of("device_hours", Decimal(2) / 3600, action="best-effort"))
    store.record_crossings("acme", store.spend("acme", tight))
    demoted = store.guard(tenant)
    assert demoted.demoted and demoted.weight == 0.01 and demoted.over_budget is None
