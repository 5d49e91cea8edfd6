"""Identities, the admin API, the audit log and the model registry against a real
`gpugate serve` (local Ray, SQLite state in a temp dir, the demo digits model)."""

from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.e2e.conftest import Gateway

pytestmark = pytest.mark.timeout(300)


def admin(
    gw: Gateway, method: str, path: str, token: str | None, body: Any = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{gw.http_url}/admin{path}", data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def admin_token(gw: Gateway) -> str:
    return (gw.state_dir / "admin.token").read_text().strip()


def make_user(gw: Gateway, name: str, role: str) -> str:
    made = gw.cli("users", "create", name, "--role", role, "--json")
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["token"])


def test_admin_api_checks_tokens_and_roles(gateway: Gateway) -> None:
    root = admin_token(gateway)
    assert admin(gateway, "GET", "/whoami", root) == (200, {"name": "admin", "role": "admin"})
    status, body = admin(gateway, "GET", "/users", None)
    assert status == 401 and "error" in body
    assert admin(gateway, "GET", "/users", "ggu_wrong")[0] == 401

    status, made = admin(gateway, "POST", "/users", root, {"name": "fin", "role": "finance"})
    assert status == 201 and made["token"].startswith("ggu_")
    finance = made["token"]
    status, body = admin(gateway, "POST", "/users", finance, {"name": "x", "role": "admin"})
    assert status == 403 and "may not users.create" in body["error"]
    assert admin(gateway, "POST", "/users", root, {"name": "fin", "role": "auditor"})[0] == 409
    assert admin(gateway, "POST", "/users", root, {"name": "y", "role": "root"})[0] == 400

    status, tenant = admin(gateway, "POST", "/tenants", root, {"name": "api-t", "weight": 2})
    assert status == 201 and tenant["api_key"].startswith("gg_")
    assert admin(gateway, "DELETE", "/tenants/api-t", root) == (
        200,
        {"tenant": "api-t", "deleted": True},
    )
    assert admin(gateway, "DELETE", "/tenants/api-t", root)[0] == 404

    with urllib.request.urlopen(f"http://{gateway.http_url}/admin/openapi.json") as resp:
        spec = json.loads(resp.read())
    assert "/admin/users" in spec["paths"] and "/admin/audit/verify" in spec["paths"]


def test_cli_acts_with_a_token_and_is_checked(gateway: Gateway) -> None:
    finance = make_user(gateway, "fin-cli", "finance")
    denied = gateway.cli("tenants", "create", "nope", "--token", finance)
    assert denied.returncode == 2
    assert "gpugate: error: user 'fin-cli' (role finance) may not tenants.create" in denied.stderr
    bad = gateway.cli("users", "list", "--token", "ggu_wrong")
    assert bad.returncode == 2 and "unknown user token" in bad.stderr
    listed = json.loads(gateway.cli("users", "list", "--json").stdout)
    assert {"user": "fin-cli", "role": "finance"}.items() <= next(
        u for u in listed if u["user"] == "fin-cli"
    ).items()


def test_audit_log_and_verify_catch_a_direct_edit(gateway: Gateway) -> None:
    auditor = make_user(gateway, "aud", "auditor")
    made = gateway.cli("tenants", "create", "audited-t", "--json")
    assert made.returncode == 0, made.stderr
    log = gateway.cli("audit", "log", "--json", "--token", auditor)
    assert log.returncode == 0, log.stderr
    records = json.loads(log.stdout)
    assert ("admin", "tenant.create", "tenant:audited-t") in {
        (r["actor"], r["action"], r["target"]) for r in records
    }
    ok = gateway.cli("audit", "verify", "--token", auditor)
    assert ok.returncode == 0 and "intact" in ok.stdout

    victim = next(r for r in records if r["target"] == "tenant:audited-t")["seq"]
    with sqlite3.connect(gateway.state_dir / "gpugate.db") as db:
        db.execute("UPDATE audit_log SET actor = 'someone-else' WHERE seq = ?", (victim,))
    broken = gateway.cli("audit", "verify", "--token", auditor)
    assert broken.returncode == 1
    assert f"record {victim} was changed" in broken.stdout
    with sqlite3.connect(gateway.state_dir / "gpugate.db") as db:
        db.execute("UPDATE audit_log SET actor = 'admin' WHERE seq = ?", (victim,))
    assert gateway.cli("audit", "verify", "--token", auditor).returncode == 0
