"""Finance's monthly invoice against real databases (SQLite file, PostgreSQL): rows
written by the ledger's own writer, statements checked against the cost report of the
same month and against sums computed here from the records, to the nano-unit."""

from __future__ import annotations

import csv
import io
import json
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.routing import Mount

from scheduler import BatchRecord
from serving.admin import build_admin_app
from serving.budgets import Budget, BudgetStore
from serving.cli import main
from serving.cli.costs import render_invoice
from serving.config import GatewayConfig
from serving.costs import (
    IDLE,
    NS_PER_HOUR,
    Ledger,
    LedgerReports,
    Pricing,
    ReportError,
    build_invoice,
    build_report,
    month_bounds,
)
from serving.costs.report import apportion
from serving.tenancy import TenantStore, UserStore
from tests.integration.serving.admin.server import AdminServer, admin_token
from tests.integration.serving.costs.test_ledger import PRICES, record, reserve

NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)
DECEMBER = datetime(2026, 12, 1, tzinfo=UTC)
NOW = datetime(2026, 12, 5, tzinfo=UTC)  # November is closed
TENANTS = ("acme", "globex", "initech", "umbrella")
FIGURES = ("requests", "rows", "used_ns", "idle_ns", "cost", "currency")
TICK = timedelta(microseconds=1)


def _write_month(engine: sa.Engine) -> list[BatchRecord]:
    """November's traffic, and batches just outside it that no invoice may count: every
    device time odd, so nearly every charge is a fraction of a nano-unit."""
    rng = random.Random(11)
    written: list[BatchRecord] = []
    for i in range(300):
        finished = NOVEMBER + timedelta(seconds=rng.randrange(30 * 86_400), microseconds=i)
        tenants = [(rng.choice(TENANTS), rng.randint(1, 7)) for _ in range(rng.randint(1, 4))]
        gpu = rng.random() < 0.3
        written.append(
            record(
                "bert" if gpu else rng.choice(("digits", "mnist")),
                tenants,
                rng.randrange(10**6, 9 * 10**8) | 1,
                finished,
                share=rng.choice((1.0, 0.5, 0.25)) if gpu else 1.0,
                device="NVIDIA L4" if gpu else "cpu",
            )
        )
    edges = [
        record("digits", [("acme", 2), ("globex", 1)], 123_456_789, NOVEMBER),  # first instant
        record("digits", [("globex", 3)], 987_654_321, DECEMBER - TICK),  # last instant
        record("digits", [("acme", 5), ("outsider", 1)], 555_555_555, NOVEMBER - TICK),
        record("digits", [("acme", 1), ("outsider", 2)], 777_777_777, DECEMBER),  # December
    ]
    ledger = Ledger(engine, Pricing(PRICES))
    ledger.write(written + edges)
    # Replicas up across both edges of the month, and one through the middle.
    reserve(engine, "r1", "digits", NOVEMBER - timedelta(hours=2), NOVEMBER + timedelta(hours=3))
    reserve(engine, "r2", "digits", DECEMBER - timedelta(hours=1), DECEMBER + timedelta(hours=4))
    reserve(engine, "r3", "mnist", NOVEMBER + timedelta(days=3), NOVEMBER + timedelta(days=4), 0.5)
    reserve(engine, "r4", "quiet", NOVEMBER + timedelta(days=9), NOVEMBER + timedelta(days=10))
    return written + edges[:2]  # what November holds


def _expected_by_tenant(records: list[BatchRecord]) -> dict[str, dict[str, Any]]:
    """Each tenant's figures from the records themselves: its cost rounded once (half to
    even) from the exact sum of charge x the price in force on the batch's day."""
    pricing = Pricing(PRICES)
    out: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "rows": 0, "used_ns": 0, "exact": Fraction(0)}
    )
    for r in records:
        assert r.result is not None
        finished = datetime.fromtimestamp(r.finished_at_ns / 1e9, UTC)
        price = pricing.price(r.result.device, finished.date()).nanos_per_hour
        for (tenant, rows), charge in zip(r.tenants, r.charges_ns, strict=True):
            figures = out[tenant]
            figures["requests"] += 1
            figures["rows"] += rows
            figures["used_ns"] += charge
            figures["exact"] += Fraction(charge * price, NS_PER_HOUR)
    return dict(out)


def _nanos(cost: str) -> int:
    return int(Decimal(cost).scaleb(9))


def _pick(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: figures[k] for k in FIGURES}


@pytest.mark.parametrize("share_idle", [False, True], ids=["idle-apart", "idle-shared"])
def test_statements_equal_the_months_report_by_tenant_to_the_nano_unit(
    engine: sa.Engine, share_idle: bool
) -> None:
    november = _write_month(engine)
    expected = _expected_by_tenant(november)
    pricing = Pricing(PRICES)
    invoice = build_invoice(engine, pricing, "2026-11", share_idle=share_idle, now=NOW).as_dict()
    # The report as finance asks for it: the month's first and last days, by tenant.
    report = LedgerReports(engine, pricing).report(
        datetime(2026, 11, 1).date(), datetime(2026, 11, 30).date(), "tenant",
        share_idle=share_idle,
    )  # fmt: skip
    assert (invoice["from"], invoice["to"]) == (report["from"], report["to"])
    assert invoice["closed"] and invoice["currency"] == "USD"

    statements = {s["tenant"]: s for s in invoice["statements"]}
    by_tenant = {r["tenant"]: r for r in report["rows"]}
    assert set(statements) == set(TENANTS) == set(expected)  # "outsider" used only Oct/Dec
    for name, statement in statements.items():
        assert _pick(statement["totals"]) == _pick(by_tenant[name]), name
        lines = statement["lines"]
        for key in ("requests", "rows", "used_ns", "idle_ns"):
            assert sum(line[key] for line in lines) == statement["totals"][key]
        assert sum(_nanos(line["cost"]) for line in lines) == _nanos(statement["totals"]["cost"])
        # And the records themselves agree: device time, and (idle apart) the cost.
        want = expected[name]
        assert (statement["totals"]["requests"], statement["totals"]["rows"]) == (
            want["requests"],
            want["rows"],
        )
        assert statement["totals"]["used_ns"] == want["used_ns"]
        if not share_idle:
            assert _nanos(statement["totals"]["cost"]) == round(want["exact"])
            assert statement["totals"]["idle_ns"] == 0
        else:
            assert statement["totals"]["idle_ns"] > 0  # everyone used digits on Nov 1
    if share_idle:
        # Only "quiet", which no tenant used, is left unbilled.
        assert {line["model"] for line in invoice["idle"]["lines"]} == {"quiet"}
    else:
        assert _pick(invoice["idle"]["totals"]) == _pick(by_tenant[IDLE])
        assert {line["model"] for line in invoice["idle"]["lines"]} == {"digits", "mnist", "quiet"}
    totals = report["totals"]
    assert _pick(invoice["totals"]) == _pick(totals)
    # Reservations count inside the month only: r1 3 h, r2 1 h, r3 24 h x 0.5, r4 24 h.
    assert totals["reserved_ns"] == 40 * 3_600 * 10**9
    # Tenants' statements + idle = the report's TOTAL, cost included, to the nano-unit.
    parts = [s["totals"] for s in invoice["statements"]] + [invoice["idle"]["totals"]]
    assert sum(_nanos(p["cost"]) for p in parts) == _nanos(totals["cost"])
    assert sum(p["used_ns"] + p["idle_ns"] for p in parts) == (
        totals["used_ns"] + totals["idle_ns"]
    )

    # A line is the report's row for that tenant, model, version and device.
    fine = build_report(
        engine, pricing, NOVEMBER, DECEMBER, ["tenant", "model", "version", "device"],
        share_idle=share_idle, now=NOW,
    )  # fmt: skip
    rows = {tuple(r.group.values()): r.as_dict("USD") for r in fine.rows}
    for name, statement in statements.items():
        for line in statement["lines"]:
            row = rows[(name, line["model"], line["version"], line["device"])]
            assert _pick(line) == _pick(row)

    # One tenant's statement is the same as in everyone's invoice, idle share included.
    for name in ("acme", "umbrella"):
        alone = build_invoice(
            engine, pricing, "2026-11", tenant=name, share_idle=share_idle, now=NOW
        ).as_dict()
        assert alone["statements"] == [statements[name]] and alone["idle"] is None
        assert alone["totals"] == statements[name]["totals"]
        if not share_idle:  # and the report of its own usage says the same
            own = LedgerReports(engine, pricing).report(NOVEMBER, DECEMBER, "tenant", tenant=name)[
                "totals"
            ]
            assert _pick(own) == _pick(statements[name]["totals"])

    # CSV: the lines, each tenant's TOTAL, idle, and the invoice's TOTAL, adding up.
    parsed = list(csv.DictReader(io.StringIO(render_invoice(invoice, "csv"))))
    assert parsed[-1]["tenant"] == "TOTAL" and parsed[-1]["cost"] == totals["cost"]
    lines = [r for r in parsed[:-1] if r["model"] != "TOTAL"]
    tenant_totals = [r for r in parsed[:-1] if r["model"] == "TOTAL"]
    assert [r["tenant"] for r in tenant_totals] == [*sorted(TENANTS), IDLE]
    assert {r["period"] for r in parsed} == {"2026-11"}
    for column in ("used_ns", "idle_ns", "requests"):
        assert sum(int(r[column]) for r in lines) == int(parsed[-1][column])
    assert sum(_nanos(r["cost"]) for r in lines) == _nanos(parsed[-1]["cost"])
    assert sum(_nanos(r["cost"]) for r in tenant_totals) == _nanos(parsed[-1]["cost"])
    assert json.loads(render_invoice(invoice, "json")) == invoice
    assert "TOTAL" in render_invoice(invoice, "table")


def test_a_month_with_no_usage_and_a_tenant_that_used_nothing(engine: sa.Engine) -> None:
    _write_month(engine)
    pricing = Pricing(PRICES)
    october = build_invoice(engine, pricing, "2026-10", now=NOW).as_dict()
    # Only the batch a microsecond before November, and r1's two hours of October.
    assert [s["tenant"] for s in october["statements"]] == ["acme", "outsider"]
    assert october["idle"]["totals"]["idle_ns"] + october["totals"]["used_ns"] == 2 * 3_600 * 10**9
    nobody = build_invoice(engine, pricing, "2026-11", tenant="nobody", now=NOW).as_dict()
    assert nobody["statements"] == [{"tenant": "nobody", "lines": [], "totals": nobody["totals"]}]
    assert (nobody["totals"]["used_ns"], nobody["totals"]["cost"]) == (0, "0.000000000")
    # This month is open until its end; the edges of the calendar are months too.
    current = build_invoice(engine, pricing, "2026-12", now=NOW + timedelta(days=3))
    assert not current.closed and current.end == datetime(2027, 1, 1, tzinfo=UTC)
    for period in ("0001-01", "9999-12"):
        edge = build_invoice(engine, pricing, period, now=NOW).as_dict()
        assert edge["statements"] == [] and edge["totals"]["used_ns"] == 0


@pytest.mark.parametrize(
    "period",
    [
        "2026-13",
        "2026-00",
        "2026-1",
        "26-11",
        "0000-01",
        "\uff12\uff10\uff12\uff16-11",
        "2026-11-01",
        "",
    ],
)
def test_a_period_that_is_not_a_month_is_refused(period: str) -> None:
    with pytest.raises(ReportError, match="not a month"):
        month_bounds(period)


def test_month_bounds() -> None:
    assert month_bounds("2026-02") == (
        datetime(2026, 2, 1, tzinfo=UTC),
        datetime(2026, 3, 1, tzinfo=UTC),
    )
    assert month_bounds("2026-12")[1] == datetime(2027, 1, 1, tzinfo=UTC)
    assert month_bounds("9999-12")[1] == datetime.max.replace(tzinfo=UTC)


def test_apportion_rounds_the_sum_once_and_keeps_each_part_within_one() -> None:
    rng = random.Random(3)
    for _ in range(500):
        parts = [Fraction(rng.randint(-(10**6), 10**6), rng.randint(1, 10**4)) for _ in range(9)]
        whole = apportion(parts)
        assert sum(whole) == round(sum(parts))
        assert all(abs(w - p) < 1 for w, p in zip(whole, parts, strict=True))
    assert apportion([Fraction(1, 2)] * 4) == [1, 1, 0, 0]  # 2 = round(2); ties: first
    assert apportion([]) == []


def test_invoice_through_the_admin_api_and_the_cli(
    engine: sa.Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_month(engine)
    state = tmp_path / "state"
    # Mounted at /admin as the gateway serves it (the CLI's --url is the gateway's).
    admin = build_admin_app(engine, state, GatewayConfig(), Pricing(PRICES))
    app = Starlette(routes=[Mount("/admin", app=admin)])
    users = UserStore(engine)
    finance = users.create("fiona", "finance", actor="admin")
    deployer = users.create("dee", "deployer", actor="admin")
    root = admin_token(engine, state)
    pricing = Pricing(PRICES)
    with AdminServer(app) as server:

        def get(path: str, token: str) -> tuple[int, dict[str, Any]]:
            answer = httpx.get(
                server.url + "/admin" + path,
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            )
            return answer.status_code, answer.json()

        code, body = get("/costs/invoice?period=2026-11&share_idle=true", finance)
        assert code == 200, body
        want = build_invoice(engine, pricing, "2026-11", share_idle=True).as_dict()
        assert [s.pop("budget") for s in body["statements"]] == [None] * len(want["statements"])
        assert body["statements"] == want["statements"] and body["totals"] == want["totals"]
        # A monthly budget: the tenant's own usage in the month against it, idle apart.
        TenantStore(engine).create("acme")
        BudgetStore(engine, pricing).set("acme", Budget.of("device_hours", Decimal("0.001")))
        code, body = get("/costs/invoice?period=2026-11&tenant=acme&share_idle=true", finance)
        (statement,) = body["statements"]
        used = build_report(
            engine, pricing, *month_bounds("2026-11"), ("tenant",), tenant="acme"
        ).total.used_ns
        spent = Decimal(used) / (3600 * 10**9)
        assert statement["budget"] == {
            "unit": "device_hours",
            "amount": "0.001",
            "spent": format(spent.normalize(), "f"),
            "overrun": format(max(Decimal(0), spent - Decimal("0.001")).normalize(), "f"),
            "exhausted": spent >= Decimal("0.001"),
        }
        assert spent > Decimal("0.001")  # the month's usage is past it: an overrun
        code, body = get("/costs/invoice?period=2026-11&tenant=globex", root)
        assert code == 200 and [s["tenant"] for s in body["statements"]] == ["globex"]
        for bad in ("2026-13", "2026-1", "0000-12", "2026-11-01", "%00"):
            code, body = get(f"/costs/invoice?period={bad}", finance)
            assert code == 400 and list(body) == ["error"] and "period" in body["error"], bad
        code, body = get("/costs/invoice", finance)
        assert code == 400 and "query.period" in body["error"]
        code, body = get("/costs/invoice?period=2026-11&group_by=tenant", finance)
        assert code == 400 and "query.group_by" in body["error"]
        assert get("/costs/invoice?period=2026-11", deployer)[0] == 403

        # The CLI is a client of that route: CSV to a file, JSON on stdout.
        out = tmp_path / "november.csv"
        cli = ["--url", server.url, "--token", finance]
        assert (
            main(
                ["costs", "invoice", "--period", "2026-11", "--format", "csv", "-o", str(out), *cli]
            )
            == 0
        )
        parsed = list(csv.DictReader(io.StringIO(out.read_text())))
        assert parsed[-1]["tenant"] == "TOTAL"
        assert int(parsed[-1]["used_ns"]) == want["totals"]["used_ns"]
        assert main(["costs", "invoice", "--period", "2026-11", "--json", *cli]) == 0
        assert json.loads(capsys.readouterr().out)["share_idle"] is False
        args = ["costs", "invoice", "--period", "2026-11", "--tenant", "acme", "--share-idle"]
        assert main([*args, *cli]) == 0
        table = capsys.readouterr().out
        assert "tenant acme" in table and "globex" not in table and "closed" in table
        with pytest.raises(SystemExit) as usage:
            main(["costs", "invoice", "--period", "2026-13", *cli])
        assert usage.value.code == 2
