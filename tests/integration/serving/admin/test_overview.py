"""The overview and the views a console reads, against a SQLite file and PostgreSQL: real
tenants, ledger records, versions registered by upload, approvals, promotions, a
rollback, an aborted rollout and a budget, then every overview figure held to what the
other endpoints say about the same data."""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from serving.config import CostsConfig, GatewayConfig, MetricPolicy, ModelPolicy
from serving.costs import Ledger, Pricing
from serving.insights import PROMOTIONS, ROLLBACKS
from serving.tenancy import UserStore
from tests.integration.conftest import OpenEngine
from tests.integration.serving.admin.server import (
    DIGITS_CLASS,
    SIGNATURE,
    admin_token,
    client,
    digits_weights,
    gateway_app,
)
from tests.integration.serving.costs.test_ledger import record, reserve

POLICY = GatewayConfig(
    policies={
        "digits": ModelPolicy(metrics={"accuracy": MetricPolicy(max_regression=0.005)}),
    }
)
HOUR_NS = 3600 * 10**9


@pytest.fixture
def engine(open_db: OpenEngine) -> sa.Engine:
    return open_db()


def _ok(answer: httpx.Response, status: int = 200) -> Any:
    assert answer.status_code == status, answer.text
    return answer.json()


def _upload(who: httpx.Client, path: Path, accuracy: float, version: str | None = None) -> Any:
    data = path.read_bytes()
    query: dict[str, Any] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "format": "safetensors",
        "metric": [f"accuracy={accuracy}"],
        **SIGNATURE,
        **DIGITS_CLASS,
    }
    if version is not None:
        query["version"] = version
    return who.post(
        "/models/digits/versions",
        params=query,
        content=data,
        headers={"content-type": "application/octet-stream"},
    )


def _promote(who: httpx.Client, version: str, *stages: str) -> None:
    for stage in stages:
        _ok(who.post(f"/models/digits/versions/{version}/promote", json={"to": stage}))


def _build_history(engine: sa.Engine, state: Path, tmp_path: Path) -> dict[str, str]:
    """Tenants, usage, versions, approvals, stage changes and a rollout, through the API
    (usage straight into the ledger, as the gateways write it); the users' tokens."""
    app = gateway_app(engine, state, POLICY)
    users = UserStore(engine)
    tokens = {
        "admin": admin_token(engine, state),
        "dee": users.create("dee", "deployer", actor="admin"),
        "ann": users.create("ann", "approver", actor="admin"),
        "fin": users.create("fin", "finance", actor="admin"),
        "aud": users.create("aud", "auditor", actor="admin"),
    }
    weights = [digits_weights(tmp_path / f"w{i}.safetensors", seed=i) for i in range(6)]
    with (
        client(app, tokens["admin"]) as admin,
        client(app, tokens["dee"]) as dee,
        client(app, tokens["ann"]) as ann,
    ):
        for name in ("acme", "beta", "gamma"):
            _ok(admin.post("/tenants", json={"name": name}), 201)
        _ok(admin.post("/tenants/gamma/suspend", json={"reason": "unpaid"}))

        def approve(version: str) -> None:
            _ok(ann.post(f"/models/digits/versions/{version}/approve", json={"reason": "ok"}))

        _ok(_upload(dee, weights[0], 0.90), 201)  # 1
        approve("1")
        _promote(dee, "1", "staging", "production")
        _ok(_upload(dee, weights[1], 0.92), 201)  # 2
        approve("2")
        _promote(dee, "2", "staging", "production")
        _ok(dee.post("/models/digits/rollback", json={"reason": "latency"}))  # 1 again
        refused = _upload(dee, weights[2], 0.5, version="3")
        assert refused.status_code == 409 and "metrics" in refused.json()["error"]
        _ok(_upload(dee, weights[2], 0.91, version="3"), 201)  # waits for approval
        _ok(_upload(dee, weights[3], 0.93), 201)  # 4
        approve("4")
        _ok(dee.post("/models/digits/rollout", json={"version": "4"}))
        _ok(dee.post("/models/digits/rollout/abort", json={"reason": "errors"}))
        _promote(dee, "2", "staging", "production")  # archived -> production again
        _ok(_upload(admin, weights[4], 0.95), 201)  # 5, the admin's own
        own = admin.post("/models/digits/versions/5/approve", json={"reason": "mine"})
        assert own.status_code == 409  # a refusal, but no guardrail's
    now = datetime.now(UTC)
    today = datetime.combine(now.date(), datetime.min.time(), UTC)
    ledger = Ledger(engine, Pricing(CostsConfig()))
    ledger.write(
        [
            record("digits", [("acme", 3), ("beta", 1)], 2 * 10**9, now - timedelta(seconds=1)),
            record("digits", [("acme", 2)], 10**9, today - timedelta(days=2, hours=-5)),
            record("digits", [("beta", 4)], 5 * 10**8, today - timedelta(days=3, hours=-1)),
            record("digits", [("gamma", 1)], 10**9, today - timedelta(days=40)),
        ]
    )
    yesterday = today - timedelta(days=1)
    reserve(
        engine, "r1", "digits", yesterday + timedelta(hours=10), yesterday + timedelta(hours=11)
    )
    with client(app, tokens["fin"]) as fin:
        # acme's spend this month is at least today's 1.5 device-seconds of its 1.6.
        budget = {"unit": "device_hours", "amount": 1.6 / 3600}
        _ok(fin.put("/tenants/acme/budget", json=budget))
        _ok(fin.put("/tenants/beta/budget", json={"unit": "device_hours", "amount": 1000}))
    return tokens


def test_the_overview_agrees_with_every_other_endpoint(engine: sa.Engine, tmp_path: Path) -> None:
    state = tmp_path / "state"
    tokens = _build_history(engine, state, tmp_path)
    app = gateway_app(engine, state, POLICY)
    with client(app, tokens["aud"]) as aud:
        seen = _ok(aud.get("/overview"))
        assert _ok(aud.get("/overview", params={"days": 30})) | {"at": 0} == seen | {"at": 0}
        audit_log = _ok(aud.get("/audit", params={"limit": 5000}))
        verified = _ok(aud.get("/audit/verify"))
        tenants = _ok(aud.get("/tenants"))
        acme_budget = _ok(aud.get("/tenants/acme/budget"))
    with client(app, tokens["fin"]) as fin:
        assert _ok(fin.get("/overview")).keys() == seen.keys()  # every role reads it
        days = [d["day"] for d in seen["adoption"]["per_day"]]
        first, last = days[0], days[-1]
        by_day = _ok(fin.get("/costs", params={"group_by": "day", "from": first, "to": last}))
        by_tenant = _ok(fin.get("/costs", params={"group_by": "tenant", "from": first, "to": last}))
    with client(app, tokens["dee"]) as dee:
        # A deployer may not read budgets: the overview names the tenant, not its amounts.
        (hidden,) = _ok(dee.get("/overview"))["risk"]["budgets"]["tenants"]
        assert hidden["tenant"] == "acme" and hidden["spent"] is None is hidden["amount"]
        production = _ok(dee.get("/models", params={"stage": "production"}))
        waiting = _ok(dee.get("/models", params={"stage": "registered"}))
        aborted = _ok(dee.get("/rollouts", params={"state": "aborted"}))

    assert seen["days"] == 30
    today = datetime.now(UTC).date()
    assert days == [(today - timedelta(days=29 - i)).isoformat() for i in range(30)]
    assert datetime.fromisoformat(seen["from"]) == datetime.fromisoformat(f"{days[0]}T00:00Z")
    assert datetime.fromisoformat(seen["to"]) - datetime.fromisoformat(seen["from"]) == timedelta(
        days=30
    )
    adoption, risk = seen["adoption"], seen["risk"]

    # Requests and device-hours per day: the cost report's, every day present.
    report = {r["day"]: r for r in by_day["rows"]}
    for day in adoption["per_day"]:
        row = report.get(day["day"])
        if row is None:
            assert (day["requests"], day["used_ns"], day["idle_ns"], day["device_hours"]) == (
                0,
                0,
                0,
                0,
            )
            continue
        for field in ("requests", "rows", "used_ns", "idle_ns"):
            assert day[field] == row[field], (day, row)
        assert day["device_hours"] == row["gpu_hours"]
    assert sum(d["requests"] for d in adoption["per_day"]) == by_day["totals"]["requests"] == 4
    assert adoption["totals"]["device_hours"] == by_day["totals"]["gpu_hours"]
    assert report[(today - timedelta(days=1)).isoformat()]["idle_ns"] == HOUR_NS
    # Active: a request in the window (gamma's is 40 days old); enabled: served now.
    active = {r["tenant"] for r in by_tenant["rows"] if r["requests"] > 0}
    assert active == {"acme", "beta"}
    assert adoption["tenants"] == {
        "active": len(active),
        "enabled": sum(1 for t in tenants if t["status"] == "active"),
    }
    assert adoption["tenants"]["enabled"] == 2  # gamma is suspended
    assert adoption["production"] == {
        "models": 1,
        "versions": [f"{v['name']}:{v['version']}" for v in production],
    }
    assert adoption["production"]["versions"] == ["digits:2"]

    # Promotions and rollbacks per ISO week: the audit log's records of those actions.
    counted = adoption["counted_actions"]
    assert counted == {"promotions": list(PROMOTIONS), "rollbacks": list(ROLLBACKS)}
    in_window = [r for r in audit_log if r["at"] >= seen["from"]]
    actions = Counter(r["action"] for r in in_window)
    weeks = adoption["per_week"]
    assert sum(w["promotions"] for w in weeks) == sum(actions[a] for a in PROMOTIONS) == 3
    assert sum(w["rollbacks"] for w in weeks) == sum(actions[a] for a in ROLLBACKS) == 2
    assert weeks[-1]["week"] == "{}-W{:02d}".format(*today.isocalendar()[:2])
    assert all(date.fromisoformat(w["starts"]).weekday() == 0 for w in weeks)

    # Approvals waiting: the registered versions, oldest first.
    assert risk["approvals_waiting"]["count"] == len(waiting) == 2
    assert [
        (v["name"], v["version"], v["author"], v["approvals"], v["required"])
        for v in risk["approvals_waiting"]["versions"]
    ] == [("digits", "3", "dee", 0, 1), ("digits", "5", "admin", 0, 1)]
    assert [v["registered_at"] for v in risk["approvals_waiting"]["versions"]] == [
        v["created_at"] for v in waiting
    ]
    assert all(v["age_s"] >= 0 for v in risk["approvals_waiting"]["versions"])

    # Guardrail refusals: model.refused records that name a check (not the approval's).
    refusals = [r for r in in_window if r["action"] == "model.refused"]
    assert len(refusals) == 2
    assert risk["guardrail_refusals"] == {"count": 1, "by_check": {"metrics": 1}}

    assert risk["failed_rollouts"]["count"] == len(aborted) == 1
    (failed,) = risk["failed_rollouts"]["rollouts"]
    assert (failed["model"], failed["candidate"], failed["production"]) == ("digits", "4", "1")
    assert (failed["state"], failed["reason"], failed["id"]) == (
        "aborted",
        "errors",
        aborted[0]["id"],
    )

    budgets = risk["budgets"]
    assert budgets["percent"] == 80 and budgets["count"] == 1
    (acme,) = budgets["tenants"]
    assert acme["tenant"] == "acme" and acme["unit"] == "device_hours"
    assert acme["percent"] == acme_budget["spend"]["percent"] >= 80
    assert acme["amount"] is not None and acme["spent"] is not None  # the auditor may read them
    assert hidden["percent"] == acme["percent"]

    chain = risk["audit"]
    assert chain["ok"] and chain["problem"] == "" and chain["warnings"] == []
    assert chain["records"] == verified["records"] == len(audit_log)
    assert chain["last_anchor"]["seq"] == verified["anchored_seq"] == audit_log[-1]["seq"]

    # The views behind the models and rollouts pages, on the same history.
    with client(app, tokens["ann"]) as ann:
        every = _ok(ann.get("/rollouts"))
        assert [(r["model"], r["candidate"], r["state"]) for r in every] == [
            ("digits", "4", "aborted")
        ]
        assert every[0]["weights"] == {"1": 1.0, "4": 0.0}
        assert _ok(ann.get("/rollouts", params={"state": "live"})) == []
        assert ann.get("/rollouts", params={"state": "done"}).status_code == 400
        card = _ok(ann.get("/models/digits/versions/3"))
        standing = card["against_production"]
        assert standing["production_version"] == "2" and not standing["passes"]
        assert standing["signature_compatible"] and standing["refusal"]["check"] == "metrics"
        (accuracy,) = standing["metrics"]
        assert (accuracy["metric"], accuracy["value"], accuracy["production"]) == (
            "accuracy",
            0.91,
            0.92,
        )
        assert accuracy["passes"] is False and accuracy["max_regression"] == 0.005
        assert accuracy["delta"] == pytest.approx(-0.01)
        (refusal,) = card["guardrail_refusals"]
        assert (refusal["check"], refusal["during"], refusal["actor"]) == (
            "metrics",
            "register",
            "dee",
        )
        assert refusal["seq"] == next(r["seq"] for r in refusals if r["target"] == "model:digits:3")
        better = _ok(ann.get("/models/digits/versions/5"))["against_production"]
        assert better["passes"] and better["refusal"] is None
        assert better["metrics"][0]["passes"] is True
        assert _ok(ann.get("/models/digits/versions/2"))["against_production"] is None
        assert ann.get("/models", params={"stage": "waiting"}).status_code == 400


def test_days_bound_the_window_and_every_role_reads_the_overview(
    engine: sa.Engine, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    app = gateway_app(engine, state, POLICY)
    root = admin_token(engine, state)
    users = UserStore(engine)
    with client(app, root) as admin:
        for days in (0, 367, -1):
            answer = admin.get("/overview", params={"days": days})
            assert answer.status_code == 400 and "query.days" in answer.json()["error"]
        assert admin.get("/overview", params={"day": 3}).status_code == 400
        one = _ok(admin.get("/overview", params={"days": 1}))
        assert [d["day"] for d in one["adoption"]["per_day"]] == [
            datetime.now(UTC).date().isoformat()
        ]
        assert len(_ok(admin.get("/overview", params={"days": 366}))["adoption"]["per_day"]) == 366
    for role in ("deployer", "approver", "finance", "auditor"):
        token = users.create(f"u-{role}", role, actor="admin")
        with client(app, token) as user:
            assert user.get("/overview").status_code == 200
            assert user.get("/rollouts").status_code == 200
