"""The monthly invoice end to end: a real `gpugate serve`, real inference, and the CLI's
invoice checked against the CLI's cost report of the same month.

Tenants' usage is fixed once the traffic stops, so it must match to the nanosecond and
the nano-unit. Idle capacity grows while the replica is up, so each idle figure is
checked between a report read before it and one read after it; the integration tests
(tests/integration/serving/costs/test_invoice.py) check idle exactly at a fixed time.
"""

from __future__ import annotations

import calendar
import csv
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as thttp

from tests.e2e.conftest import Gateway, configured_gateway

pytestmark = pytest.mark.timeout(400)

# An odd price, so the tenants' costs are fractions of a nano-unit before rounding.
CONFIG = """
costs:
  currency: EUR
  reservation_heartbeat_s: 0.5
  prices:
    - {device: cpu, per_hour: 1.7}
"""
X = np.random.default_rng(1).random((8, 64), dtype=np.float32) * 16
OTHER = "invoice-e2e"


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with configured_gateway(tmp_path_factory, "invoice", CONFIG) as gw:
        yield gw


def _infer(gw: Gateway, key: str, rows: int) -> None:
    client = thttp.InferenceServerClient(gw.http_url)
    inp = thttp.InferInput("pixels", [rows, 64], "FP32")
    inp.set_data_from_numpy(X[:rows])
    client.infer("digits", [inp], headers={"Authorization": f"Bearer {key}"})


def _ok(done: Any) -> str:
    assert done.returncode == 0, done.stderr
    return str(done.stdout)


def _nanos(cost: str) -> int:
    return int(Decimal(cost).scaleb(9))


def _usage(figures: dict[str, Any]) -> tuple[object, ...]:
    return tuple(figures[k] for k in ("requests", "rows", "used_ns", "cost", "currency"))


def test_the_invoice_reconciles_with_the_cost_report_of_the_month(
    priced: Gateway, tmp_path: Path
) -> None:
    other = json.loads(_ok(priced.cli("tenants", "create", OTHER, "--json")))["api_key"]
    sent = {"demo": 0, OTHER: 0}
    for i in range(24):
        tenant = OTHER if i % 3 == 0 else "demo"
        _infer(priced, other if tenant == OTHER else priced.demo_key, 1 + i % 5)
        sent[tenant] += 1
    time.sleep(1.2)  # a heartbeat lands: the reservation covers the traffic

    now = time.gmtime()
    month = time.strftime("%Y-%m", now)
    last = calendar.monthrange(now.tm_year, now.tm_mon)[1]
    window = ("--from", f"{month}-01", "--to", f"{month}-{last:02d}")

    def report(fmt: str, *extra: str) -> str:
        return _ok(priced.cli("costs", "report", *window, "--format", fmt, *extra))

    def invoice(fmt: str, *extra: str) -> str:
        return _ok(priced.cli("costs", "invoice", "--period", month, "--format", fmt, *extra))

    before = json.loads(report("json"))
    inv = json.loads(invoice("json"))
    inv_csv = list(csv.DictReader(io.StringIO(invoice("csv"))))
    after = json.loads(report("json"))
    report_csv = list(csv.DictReader(io.StringIO(report("csv"))))

    assert inv["period"] == month and inv["currency"] == "EUR" and not inv["closed"]
    assert (inv["from"], inv["to"][:10]) == (before["from"], after["to"][:10])
    rows = {r["tenant"]: r for r in before["rows"]}
    statements = {s["tenant"]: s for s in inv["statements"]}
    assert set(statements) == {"demo", OTHER} and set(rows) == {"demo", OTHER, "(idle)"}
    assert statements[OTHER]["totals"]["requests"] == sent[OTHER] == 8
    assert statements["demo"]["totals"]["requests"] >= sent["demo"]
    for name, statement in statements.items():
        # The tenant's row of the report, to the nanosecond and the nano-unit.
        assert _usage(statement["totals"]) == _usage(rows[name]), name
        assert _usage(statement["totals"]) == _usage({r["tenant"]: r for r in after["rows"]}[name])
        assert statement["totals"]["idle_ns"] == 0
        assert _nanos(statement["totals"]["cost"]) > 0
        lines = statement["lines"]
        assert [(x["model"], x["version"], x["device"]) for x in lines] == [("digits", "1", "cpu")]
        assert sum(_nanos(x["cost"]) for x in lines) == _nanos(statement["totals"]["cost"])
    totals = inv["totals"]
    assert totals["used_ns"] == before["totals"]["used_ns"] == after["totals"]["used_ns"]
    assert totals["requests"] == before["totals"]["requests"]
    # Idle, read between the two reports; statements + idle = the invoice's TOTAL exactly.
    assert before["totals"]["idle_ns"] <= totals["idle_ns"] <= after["totals"]["idle_ns"]
    assert inv["idle"]["totals"]["idle_ns"] == totals["idle_ns"] > 0
    parts = [s["totals"] for s in inv["statements"]] + [inv["idle"]["totals"]]
    assert sum(_nanos(p["cost"]) for p in parts) == _nanos(totals["cost"])
    assert _nanos(before["totals"]["cost"]) <= _nanos(totals["cost"])
    assert _nanos(totals["cost"]) <= _nanos(after["totals"]["cost"])

    # The CSVs: each tenant's TOTAL row is its row of the report's CSV; the lines add up.
    by_tenant = {r["tenant"]: r for r in report_csv[:-1]}
    tenant_totals = {r["tenant"]: r for r in inv_csv if r["model"] == "TOTAL"}
    assert set(tenant_totals) == {"demo", OTHER, "(idle)"}
    for name in ("demo", OTHER):
        for column in ("requests", "rows", "used_ns", "idle_ns", "cost"):
            assert tenant_totals[name][column] == by_tenant[name][column], (name, column)
    grand = inv_csv[-1]
    assert grand["tenant"] == "TOTAL" and report_csv[-1]["tenant"] == "TOTAL"
    assert int(grand["used_ns"]) == int(report_csv[-1]["used_ns"]) == totals["used_ns"]
    lines = [r for r in inv_csv[:-1] if r["model"] != "TOTAL"]
    assert sum(int(r["used_ns"]) for r in lines) == int(grand["used_ns"])
    assert sum(int(r["idle_ns"]) for r in lines) == int(grand["idle_ns"])
    assert sum(_nanos(r["cost"]) for r in lines) == _nanos(grand["cost"])
    assert {r["period"] for r in inv_csv} == {month}

    # Idle shared by use: the tenants' usage is unchanged, and their idle share lies
    # between two shared reports'.
    shared_before = {r["tenant"]: r for r in json.loads(report("json", "--share-idle"))["rows"]}
    shared = json.loads(invoice("json", "--share-idle"))
    shared_after = {r["tenant"]: r for r in json.loads(report("json", "--share-idle"))["rows"]}
    assert shared["share_idle"] is True and shared["idle"] is None  # all of it shared today
    assert shared["totals"]["idle_ns"] == sum(s["totals"]["idle_ns"] for s in shared["statements"])
    for statement in shared["statements"]:
        name, figures = statement["tenant"], statement["totals"]
        assert figures["used_ns"] == shared_before[name]["used_ns"] == rows[name]["used_ns"]
        assert shared_before[name]["idle_ns"] <= figures["idle_ns"]
        assert figures["idle_ns"] <= shared_after[name]["idle_ns"]
        assert figures["idle_ns"] > 0

    # One tenant: the same statement, and the report of that tenant's usage agrees.
    alone = json.loads(invoice("json", "--tenant", OTHER))
    assert alone["statements"] == [statements[OTHER]] and alone["idle"] is None
    own = json.loads(report("json", "--tenant", OTHER))["totals"]
    assert _usage(own) == _usage(alone["totals"])

    # A file with -o; a period that is not a month: a usage error here, 400 over HTTP.
    out = tmp_path / "invoice.csv"
    assert (
        _ok(priced.cli("costs", "invoice", "--period", month, "--format", "csv", "-o", str(out)))
        == ""
    )
    assert list(csv.DictReader(io.StringIO(out.read_text())))[-1]["tenant"] == "TOTAL"
    bad = priced.cli("costs", "invoice", "--period", f"{now.tm_year}-13")
    assert bad.returncode == 2 and "not a month" in bad.stderr
    token = (priced.state_dir / "admin.token").read_text().strip()
    request = urllib.request.Request(
        f"{priced.url}/admin/costs/invoice?period={now.tm_year}-13",
        headers={"Authorization": f"Bearer {token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert list(json.loads(refused.value.read())) == ["error"]
