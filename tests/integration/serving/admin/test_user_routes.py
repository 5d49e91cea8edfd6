"""The users routes of the admin API over a real socket, on a SQLite file and PostgreSQL:
a token disabled, rotated or deleted through the API is refused from the next request;
the audit routes filter literally and include rollout records."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from serving.config import GatewayConfig
from serving.state import audit
from tests.integration.conftest import OpenEngine
from tests.integration.serving.admin.server import admin_token, client, gateway_app


@pytest.fixture
def engine(open_db: OpenEngine) -> sa.Engine:
    return open_db()


def test_lifecycle_through_the_api(engine: sa.Engine, tmp_path: Path) -> None:
    state = tmp_path / "state"
    app = gateway_app(engine, state, GatewayConfig())
    root = admin_token(engine, state)
    with client(app, root) as admin, client(app) as anyone:
        made = admin.post("/users", json={"name": "dave", "role": "auditor", "expires_in_s": 600})
        assert made.status_code == 201 and made.json()["expires_at"] is not None
        dave = {"Authorization": f"Bearer {made.json()['token']}"}
        assert anyone.get("/whoami", headers=dave).status_code == 200

        off = admin.post("/users/dave/disable", json={"reason": "on leave"})
        assert off.status_code == 200 and off.json()["status"] == "disabled"
        assert anyone.get("/whoami", headers=dave).status_code == 401  # at once, not after a TTL
        assert admin.post("/users/dave/enable").json()["status"] == "active"
        assert anyone.get("/whoami", headers=dave).status_code == 200

        rotated = admin.post("/users/dave/rotate", json={"never_expires": True})
        assert rotated.status_code == 200 and rotated.json()["expires_at"] is None
        assert anyone.get("/whoami", headers=dave).status_code == 401
        fresh = {"Authorization": f"Bearer {rotated.json()['token']}"}
        assert anyone.get("/whoami", headers=fresh).json() == {"name": "dave", "role": "auditor"}
        # The auditor may read users but not change them.
        assert anyone.get("/users", headers=fresh).status_code == 200
        assert anyone.post("/users/admin/disable", headers=fresh).status_code == 403

        listed = {u["user"]: u for u in admin.get("/users").json()}
        assert listed["dave"]["status"] == "active" and listed["admin"]["role"] == "admin"

        last = admin.post("/users/admin/disable")
        assert last.status_code == 409 and "last enabled admin" in last.json()["error"]
        assert admin.delete("/users/admin").status_code == 409
        assert admin.delete("/users/ghost").json() == {"error": "no user 'ghost'"}
        assert admin.delete("/users/ghost").status_code == 404
        assert admin.delete("/users/dave").json() == {"user": "dave", "deleted": True}
        assert anyone.get("/whoami", headers=fresh).status_code == 401

        both = admin.post(
            "/users",
            json={
                "name": "x",
                "role": "finance",
                "expires_in_s": 5,
                "expires_at": "2099-01-01T00:00:00Z",
            },
        )
        assert both.status_code == 400 and "not both" in both.json()["error"]
        past = admin.post(
            "/users", json={"name": "x", "role": "finance", "expires_at": "2001-01-01T00:00:00Z"}
        )
        assert past.status_code == 400 and "not in the future" in past.json()["error"]

        acts = [r["action"] for r in admin.get("/audit").json() if r["target"] == "user:dave"]
        assert acts == ["user.create", "user.disable", "user.enable", "user.rotate", "user.delete"]
        checked = admin.get("/audit/verify").json()
        assert checked["ok"] and checked["anchored_seq"] == checked["records"]
        assert checked["warnings"] == []  # anchored here, sealed with the key
        (state / "audit.anchor").unlink()  # another gateway's view: nothing anchored
        unanchored = admin.get("/audit/verify").json()
        assert unanchored["ok"] and unanchored["anchored_seq"] is None
        assert any("unanchored on this host" in w for w in unanchored["warnings"])


def test_audit_model_filter_is_literal_and_includes_rollouts(
    engine: sa.Engine, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    app = gateway_app(engine, state, GatewayConfig())
    root = admin_token(engine, state)
    for target in ("model:a_b:1", "model:axb:1", "rollout:a_b", "rollout:axb"):
        audit.append(engine, "alice", "test.act", target)
    with client(app, root) as admin:
        got = admin.get("/audit", params={"model": "a_b"}).json()
    assert [r["target"] for r in got] == ["model:a_b:1", "rollout:a_b"]
