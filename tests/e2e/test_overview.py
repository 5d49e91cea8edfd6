"""The overview against a real `gpugate serve`, on SQLite and on PostgreSQL: tenants made
with the CLI send real inference requests, versions are registered, refused, approved
and rolled out through the CLI, a budget runs low, and then every figure of
``GET /admin/overview`` is held to what the cost report, the registry, the rollouts,
the budget and the audit log answer about the same state."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DATABASES, Gateway, admin, admin_token, gateway_on, train_digits

pytestmark = pytest.mark.timeout(900)

BODY = json.dumps(
    {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
)


@pytest.fixture(scope="module", params=DATABASES)
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with gateway_on(request, tmp_path_factory.mktemp("overview")) as gw:
        yield gw


def _cli(gw: Gateway, *args: str, token: str | None = None) -> Any:
    done = gw.admin_cli(*args, "--json", token=token)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _get(gw: Gateway, token: str, path: str, **params: Any) -> Any:
    query = urllib.parse.urlencode(params, doseq=True)
    status, body = admin(gw, "GET", f"{path}?{query}" if query else path, token)
    assert status == 200, body
    return body


def _send(gw: Gateway, key: str, n: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    try:
        for _ in range(n):
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            conn.request("POST", "/v2/models/digits/infer", BODY, headers)
            answer = conn.getresponse()
            assert answer.status == 200, answer.read()
            answer.read()
    finally:
        conn.close()


def _register(gw: Gateway, token: str, artifact: Path, *extra: str) -> Any:
    return gw.admin_cli(
        "models", "register", "digits", "--artifact", str(artifact), "--format", "safetensors",
        "--class", "serving.demo:DigitsMLP", "--model-kwargs", '{"hidden": 128}', "--json",
        *extra, token=token,
    )  # fmt: skip


def test_overview_figures_equal_the_other_endpoints(gateway: Gateway, tmp_path: Path) -> None:
    gw = gateway
    root = admin_token(gw)
    tokens = {
        role: _cli(gw, "users", "create", f"{role}-1", "--role", role)["token"]
        for role in ("deployer", "approver", "finance", "auditor")
    }
    acme = _cli(gw, "tenants", "create", "acme")["api_key"]
    _cli(gw, "tenants", "create", "quiet")
    _cli(gw, "tenants", "create", "gone")
    _cli(gw, "tenants", "suspend", "gone", "--reason", "contract ended")

    # A refusal by a guardrail, a version rolled out and aborted, one left waiting.
    accuracy = train_digits(tmp_path / "v.safetensors", seed=1)
    narrow = _register(
        gw, tokens["deployer"], tmp_path / "v.safetensors",
        "--input", "pixels:FP32:32", "--output", "logits:FP32:10",
    )  # fmt: skip
    assert narrow.returncode == 1 and "signature guardrail" in narrow.stderr
    made = _register(gw, tokens["deployer"], tmp_path / "v.safetensors")
    assert made.returncode == 0, made.stderr
    candidate = json.loads(made.stdout)["version"]
    _cli(gw, "models", "approve", "digits", candidate, "--reason", f"accuracy {accuracy:.3f}",
         token=tokens["approver"])  # fmt: skip
    _cli(gw, "rollout", "start", "digits", candidate, token=tokens["deployer"])
    _cli(gw, "rollout", "abort", "digits", "--reason", "drill", token=tokens["deployer"])
    train_digits(tmp_path / "w.safetensors", seed=2)
    waiting = _register(gw, tokens["deployer"], tmp_path / "w.safetensors")
    assert waiting.returncode == 0, waiting.stderr

    # Real traffic; acme's tiny budget (one micro-device-hour) runs past 80%.
    _cli(gw, "tenants", "budget", "acme", "--amount", "0.000001", "--unit", "device_hours",
         token=tokens["finance"])  # fmt: skip
    _send(gw, gw.demo_key, 3)
    for _ in range(200):
        if _get(gw, root, "/tenants/acme/budget")["spend"]["percent"] >= 80:
            break
        _send(gw, acme, 5)
    else:
        pytest.fail("acme's spend did not reach 80% of its budget")

    seen = _get(gw, tokens["deployer"], "/overview", days=7)
    first, last = seen["adoption"]["per_day"][0]["day"], seen["adoption"]["per_day"][-1]["day"]
    by_day = _get(gw, tokens["finance"], "/costs", group_by="day", **{"from": first, "to": last})
    by_tenant = _get(gw, tokens["finance"], "/costs", **{"from": first, "to": last})
    auditor = tokens["auditor"]
    tenants = _get(gw, auditor, "/tenants")
    verified = _get(gw, auditor, "/audit/verify")
    log = _get(gw, auditor, "/audit", since=seen["from"], limit=5000)
    production = _get(gw, auditor, "/models", stage="production")
    registered = _get(gw, auditor, "/models", stage="registered")
    aborted = _get(gw, auditor, "/rollouts", state="aborted")
    budget = _get(gw, root, "/tenants/acme/budget")
    adoption, risk = seen["adoption"], seen["risk"]

    today = datetime.now(UTC).date().isoformat()
    assert len(adoption["per_day"]) == 7 and last == today
    report = {r["day"]: r for r in by_day["rows"]}
    for day in adoption["per_day"]:
        row = report.get(day["day"], {"requests": 0, "rows": 0, "used_ns": 0, "idle_ns": 0})
        assert (day["requests"], day["rows"], day["used_ns"]) == (
            row["requests"],
            row["rows"],
            row["used_ns"],
        )
        # Replicas reserve device time while they run: today's idle grows between calls.
        assert day["idle_ns"] <= row["idle_ns"]
    served = {r["tenant"] for r in by_tenant["rows"] if r["requests"] > 0}
    assert served == {"acme", "demo"}
    assert adoption["tenants"] == {
        "active": len(served),
        "enabled": sum(1 for t in tenants if t["status"] == "active"),
    }
    assert adoption["totals"]["requests"] == by_day["totals"]["requests"]
    assert adoption["production"] == {
        "models": 1,
        "versions": [f"{v['name']}:{v['version']}" for v in production],
    }
    weeks = adoption["per_week"]
    counted = adoption["counted_actions"]
    for kind in ("promotions", "rollbacks"):
        expected = sum(1 for r in log if r["action"] in counted[kind])
        assert sum(w[kind] for w in weeks) == expected
    assert sum(w["rollbacks"] for w in weeks) == 1  # the abort

    queue = risk["approvals_waiting"]
    assert queue["count"] == len(registered) == 1
    assert [(v["name"], v["version"], v["author"]) for v in queue["versions"]] == [
        (v["name"], v["version"], v["author"]) for v in registered
    ]
    refusals = [r for r in log if r["action"] == "model.refused" and "check" in r["after"]]
    assert risk["guardrail_refusals"] == {
        "count": len(refusals),
        "by_check": {"signature": 1},
    }
    assert risk["failed_rollouts"]["count"] == len(aborted) == 1
    assert risk["failed_rollouts"]["rollouts"][0]["id"] == aborted[0]["id"]
    (watched,) = risk["budgets"]["tenants"]
    assert (watched["tenant"], watched["unit"]) == ("acme", "device_hours")
    assert watched["percent"] == budget["spend"]["percent"] >= 80
    chain = risk["audit"]
    assert chain["ok"] and chain["records"] == verified["records"]
    assert chain["last_anchor"]["seq"] == verified["anchored_seq"]

    # The CLI reads the same log with the same filters.
    aborts = _cli(gw, "audit", "log", "--action", "rollout.abort", token=auditor)
    assert [(r["actor"], r["reason"]) for r in aborts] == [("deployer-1", "drill")]
    newest = _cli(gw, "audit", "log", "--newest-first", "--limit", "1", token=auditor)
    assert newest[0]["seq"] == _get(gw, auditor, "/audit", order="desc", limit=1)[0]["seq"]
