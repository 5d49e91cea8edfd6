"""A budget against a real ``gpugate serve``, crossed by real traffic: each threshold is
recorded once (audit record, gauge, a signed webhook delivery to a real HTTP server),
the action at 100% applies (reject: 403 "budget exhausted"; best-effort and notify:
served), and all of it survives a restart."""

from __future__ import annotations

import hmac
import http.client
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from serving.budgets import signature
from tests.e2e.conftest import Gateway, admin, admin_token, configured_gateway, wait_for
from tests.integration.serving.budgets.test_budgets import Receiver

pytestmark = pytest.mark.timeout(900)

# One USD per device-second: a budget of a few hundredths of a dollar is a few
# centiseconds of the demo model's device time, and its micro-units are fine-grained.
CONFIG = (
    "costs:\n  currency: USD\n  budget_check_s: 0.5\n"
    "  prices:\n    - {device: cpu, per_hour: 3600}\n"
)
BODY = json.dumps(
    {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
)
SECRET = "webhook-signing-secret-0123"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with configured_gateway(tmp_path_factory, "budgets", CONFIG) as gw:
        yield gw


def _send(gw: Gateway, key: str, n: int) -> list[tuple[int, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    answers = []
    try:
        for _ in range(n):
            conn.request(
                "POST",
                "/v2/models/digits/infer",
                BODY,
                {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            answers.append((resp.status, resp.read().decode()))
    finally:
        conn.close()
    return answers


def _budget(gw: Gateway, tenant: str = "spender") -> dict[str, Any]:
    shown = gw.cli("tenants", "budget", tenant, "--json")
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout))


def _spend_until(gw: Gateway, key: str, percent: float) -> dict[str, Any]:
    """Real traffic until the tenant's spend reaches ``percent`` of its budget."""
    while True:
        budget = _budget(gw)
        if budget["spend"]["percent"] >= percent:
            return budget
        assert {s for s, _ in _send(gw, key, 5)} == {200}


def _set(gw: Gateway, amount: float, action: str, webhook: str) -> None:
    made = gw.cli(
        "tenants", "budget", "spender", "--amount", repr(amount), "--unit", "currency",
        "--action", action, "--webhook", webhook, "--webhook-secret-env", "BUDGET_HOOK_SECRET",
        "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr


def test_thresholds_are_crossed_once_and_the_action_applies(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUDGET_HOOK_SECRET", SECRET)  # the CLI's subprocesses read it
    made = gateway.cli("tenants", "create", "spender", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["api_key"]
    receiver = Receiver(failures=1)  # the first delivery fails: retried
    try:
        assert {s for s, _ in _send(gateway, key, 100)} == {200}
        time.sleep(1)  # the ledger's commits
        # A budget of the device time spent so far / 0.6: 60% used, past 50%.
        _set(gateway, 1.0, "reject", receiver.url)
        spent = float(_budget(gateway)["spend"]["spent"])
        assert spent > 0
        _set(gateway, spent / 0.6, "reject", receiver.url)
        wait_for("the 50% alert", lambda: [a["threshold"] for a in _budget(gateway)["alerts"]])
        _spend_until(gateway, key, 80)
        wait_for(
            "the 80% alert",
            lambda: len(_budget(gateway)["alerts"]) >= 2,
            explain=lambda: json.dumps(_budget(gateway)),
        )
        _spend_until(gateway, key, 100)
        wait_for("the 100% alert", lambda: len(_budget(gateway)["alerts"]) == 3)
        # reject: within the check interval and the key cache's TTL, every request 403.
        refused = wait_for(
            "requests refused for the budget",
            lambda: [(s, b) for s, b in _send(gateway, key, 1) if s == 403],
            timeout_s=30,
        )
        assert "budget exhausted" in refused[0][1]
        wait_for(
            "every delivery",
            lambda: len({json.loads(b)["threshold"] for _, b in receiver.received}) == 3,
        )
        time.sleep(2)  # a few more checks: nothing is recorded or sent twice
        budget = _budget(gateway)
    finally:
        receiver.close()
    assert [a["threshold"] for a in budget["alerts"]] == [50, 80, 100]
    assert budget["spend"]["exhausted"] is True
    # Each crossing delivered once, signed; the first attempt failed and was retried.
    thresholds = [json.loads(body)["threshold"] for _, body in receiver.received]
    assert sorted(thresholds) == [50, 50, 80, 100]
    for headers, body in receiver.received:
        expected = signature(SECRET, headers["X-Gpugate-Timestamp"], body)
        assert hmac.compare_digest(headers["X-Gpugate-Signature"], expected)
    first = budget["alerts"][0]["deliveries"]
    assert [(d["attempt"], d["ok"]) for d in first] == [(1, False), (2, True)]
    # Audited once each; shown as gauges.
    status, records = admin(gateway, "GET", "/audit", admin_token(gateway))
    assert status == 200
    crossed = [r["after"]["threshold"] for r in records if r["action"] == "tenant.budget_alert"]
    assert crossed == [50, 80, 100]
    wait_for(
        "the alert gauges",
        lambda: all(
            gateway.metric("gpugate_tenant_budget_alert", tenant="spender", threshold=t) == 1
            for t in ("50", "80", "100")
        ),
        timeout_s=30,
    )
    # The state survives a restart: still refused, nothing crossed again.
    gateway.restart()
    assert _send(gateway, key, 1)[0][0] == 403
    time.sleep(2)
    assert [a["threshold"] for a in _budget(gateway)["alerts"]] == [50, 80, 100]
    # best-effort: served again (at the least urgent level, with a minimal weight).
    _set(gateway, spent / 0.6, "best-effort", "http://127.0.0.1:9/unused")
    wait_for("best-effort service", lambda: _send(gateway, key, 1)[0][0] == 200, timeout_s=30)
    assert {s for s, _ in _send(gateway, key, 20)} == {200}
    # The tenant sees its budget in its own view, with its own key.
    req = urllib.request.Request(f"http://{gateway.http_url}/tenant")
    req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        seen = json.loads(resp.read())["budget"]
    assert seen["unit"] == "USD" and seen["action"] == "best-effort"
    assert seen["crossed"] == [50, 80, 100] and seen["exhausted"] is True
    assert float(seen["forecast"]) >= float(seen["spent"]) >= float(seen["amount"])
    assert "secret" not in json.dumps(seen)


def test_a_budget_is_set_with_the_tenant_in_one_call(gateway: Gateway) -> None:
    made = gateway.cli(
        "tenants", "create", "budgeted", "--requests-per-s", "10", "--budget", "2.5",
        "--budget-action", "reject", "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    budget = _budget(gateway, "budgeted")
    assert budget["budget"]["amount"] == "2.5" and budget["budget"]["action"] == "reject"
    assert budget["budget"]["unit"] == "currency" and budget["budget"]["period"] == "month"
    assert budget["spend"]["spent"] == "0" and budget["alerts"] == []
    # Checked before anything is written: a bad budget creates no tenant.
    refused = gateway.cli("tenants", "create", "unbudgeted", "--budget", "2e12")
    assert refused.returncode == 1 and "amount" in refused.stderr, refused.stderr
    names = [t["tenant"] for t in json.loads(gateway.cli("tenants", "list", "--json").stdout)]
    assert "unbudgeted" not in names
