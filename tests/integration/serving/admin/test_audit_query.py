"""``GET /admin/audit``'s filters and paging against a SQLite file and PostgreSQL: actor,
action and target as exact values or literal, case-sensitive prefixes, a time window,
and pages of records oldest or newest first that add up to the whole log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from serving.config import GatewayConfig
from serving.state import audit
from serving.tenancy import UserStore
from tests.integration.conftest import OpenEngine
from tests.integration.serving.admin.server import admin_token, client, gateway_app


@pytest.fixture
def engine(open_db: OpenEngine) -> sa.Engine:
    return open_db()


def _records(who: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    answer = who.get("/audit", params=params)
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def test_filters_and_pages(engine: sa.Engine, tmp_path: Path) -> None:
    state = tmp_path / "state"
    app = gateway_app(engine, state, GatewayConfig())
    root = admin_token(engine, state)
    users = UserStore(engine)
    ops = users.create("ops_1", "admin", actor="admin")
    with client(app, root) as admin:
        for name in ("acme", "acme-eu", "beta"):
            assert admin.post("/tenants", json={"name": name}).status_code == 201
    with client(app, ops) as op:
        assert op.post("/tenants/acme/suspend", json={"reason": "unpaid"}).status_code == 200
        assert op.post("/tenants/acme/resume").status_code == 200
        assert op.post("/tenants", json={"name": "opsx1"}).status_code == 201
    with client(app, root) as admin:
        everything = _records(admin)
        assert everything == _records(admin, limit=5000, order="asc")
        assert [r["seq"] for r in everything] == list(range(1, len(everything) + 1))
        actors = {r["actor"] for r in everything}
        assert {"admin", "ops_1"} <= actors

        # Exact values, and prefixes: literal (no LIKE wildcard) and case-sensitive.
        assert {r["actor"] for r in _records(admin, actor="ops_1")} == {"ops_1"}
        assert _records(admin, actor="ops") == []
        assert {r["actor"] for r in _records(admin, actor="ops*")} == {"ops_1"}
        assert _records(admin, actor="ops%*") == [] and _records(admin, actor="o_s*") == []
        assert _records(admin, actor="OPS*") == [] and _records(admin, actor="Admin") == []
        acme = _records(admin, target="tenant:acme")
        assert acme and {r["target"] for r in acme} == {"tenant:acme"}
        assert {r["target"] for r in _records(admin, target="tenant:acme*")} == {
            "tenant:acme",
            "tenant:acme-eu",
        }
        assert _records(admin, target="tenant:acm_*") == []
        suspends = _records(admin, action="tenant.suspend")
        assert [(r["actor"], r["target"]) for r in suspends] == [("ops_1", "tenant:acme")]
        both = _records(admin, action=["tenant.suspend", "tenant.resume"])
        assert [r["action"] for r in both] == ["tenant.suspend", "tenant.resume"]
        assert {r["action"] for r in _records(admin, action="tenant.*")} == {
            r["action"] for r in everything if r["action"].startswith("tenant.")
        }
        combined = _records(admin, actor="ops_1", action="tenant.create")
        assert [r["target"] for r in combined] == ["tenant:opsx1"]

        # A window: since includes its instant, until excludes it.
        middle = everything[len(everything) // 2]
        assert all(r["seq"] >= 1 for r in _records(admin, since=middle["at"]))
        before = _records(admin, until=middle["at"])
        assert before and all(r["at"] < middle["at"] for r in before)
        assert _records(admin, since=middle["at"], until=middle["at"]) == []

        # Pages: oldest first after a seq, newest first before one; they add up.
        pages, after = [], 0
        while page := _records(admin, limit=2, after_seq=after):
            pages += page
            after = page[-1]["seq"]
        assert pages == everything
        newest, before_seq = [], None
        while True:
            query: dict[str, Any] = {"limit": 3, "order": "desc"}
            if before_seq is not None:
                query["before_seq"] = before_seq
            page = _records(admin, **query)
            if not page:
                break
            newest += page
            before_seq = page[-1]["seq"]
        assert newest == everything[::-1]
        assert len(_records(admin, limit=1, order="desc")) == 1
        assert _records(admin, before_seq=0) == [] and _records(admin, after_seq=2**63 - 1) == []

        for bad in (
            {"limit": 0},
            {"limit": 5001},
            {"order": "up"},
            {"after_seq": -1},
            {"before_seq": 2**63},
            {"actor": ""},
            {"until": "yesterday"},
            {"action": ["x"] * 21},
        ):
            answer = admin.get("/audit", params=bad)
            assert answer.status_code == 400, (bad, answer.text)
    # The store's own reader keeps its default: every record, oldest first.
    assert [r.seq for r in audit.read(engine)] == [r["seq"] for r in everything]
