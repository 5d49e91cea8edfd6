"""Tenant priority grants and in-flight caps in the tenant table (SQLite and PostgreSQL),
through the admin API on a real socket, and through ``gpugate tenants``: stored,
validated, audited, and handed to the router with the tenant."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from router import Tenant
from serving.cli import main
from serving.config import GatewayConfig, TenantConfig
from serving.state import audit
from serving.tenancy import Admission, TenantDirectory, TenantError, TenantStore, hash_key
from tests.integration.serving.admin.server import AdminServer, admin_token, client, gateway_app


def test_grants_and_caps_are_stored_audited_and_reach_the_router(engine: sa.Engine) -> None:
    store = TenantStore(engine)
    key = store.create(
        "acme",
        2.0,
        ["digits"],
        admission=Admission.checked([1], max_requests_in_flight=8, max_bytes_in_flight=2**20),
        actor="alice",
    )
    plain_key = store.create("plain", actor="alice")
    got = store.get_by_key_hash(hash_key(key))
    assert got == Tenant("acme", 2.0, frozenset({"digits"}), frozenset({1, 2}), 8, 2**20)
    assert got.may_ask(1) and got.may_ask(2) and not got.may_ask(3)
    plain = store.get_by_key_hash(hash_key(plain_key))
    assert plain is not None and plain.priorities == frozenset({2})
    assert (plain.max_requests_in_flight, plain.max_bytes_in_flight) == (None, None)

    row = store.update("acme", priorities=[3], max_requests_in_flight=None, actor="bob")
    assert row.admission == Admission((2, 3), None, 2**20)
    assert row.weight == 2.0 and row.models == ("digits",)  # left as they were
    store.update("acme", priorities=[3], actor="bob")  # no change: no record
    records = [r for r in audit.read(engine) if r.target == "tenant:acme"]
    assert [(r.actor, r.action) for r in records] == [
        ("alice", "tenant.create"),
        ("bob", "tenant.update"),
    ]
    assert records[0].after["priorities"] == [1, 2]
    assert records[1].before["max_requests_in_flight"] == 8
    assert records[1].after == {
        "name": "acme",
        "weight": 2.0,
        "models": ["digits"],
        "priorities": [2, 3],
        "max_requests_in_flight": None,
        "max_bytes_in_flight": 2**20,
    }
    assert audit.verify(engine).ok

    # The router's cache hands the change out (here at once: no TTL).
    directory = TenantDirectory(store, ttl_s=0)
    found = asyncio.run(directory.authenticate(key))
    assert found is not None and found.priorities == frozenset({2, 3})

    for bad in ({"priorities": [0]}, {"priorities": [4]}, {"max_requests_in_flight": -1}):
        with pytest.raises(ValueError):
            store.update("acme", **bad, actor="bob")  # type: ignore[arg-type]
    with pytest.raises(TenantError, match="no tenant 'ghost'"):
        store.update("ghost", weight=2.0)


def test_config_tenants_take_grants_and_caps_from_the_file(engine: sa.Engine) -> None:
    store = TenantStore(engine)
    key = "key-cfg-0123456789abcdef"
    first = TenantConfig(name="cfg", api_key_env="K")
    store.upsert_from_config([first], {"K": key})
    assert store.get_by_key_hash(hash_key(key)) == Tenant("cfg", 1.0, frozenset({"*"}))
    # The same file again writes no record; a changed grant writes one.
    store.upsert_from_config([first], {"K": key})
    changed = TenantConfig(name="cfg", api_key_env="K", priorities=[1], max_requests_in_flight=4)
    store.upsert_from_config([changed], {"K": key})
    got = store.get_by_key_hash(hash_key(key))
    assert got is not None and got.priorities == frozenset({1, 2})
    assert got.max_requests_in_flight == 4
    actions = [r.action for r in audit.read(engine) if r.target == "tenant:cfg"]
    assert actions == ["tenant.create", "tenant.update"]
    with pytest.raises(TenantError, match="managed by the config file"):
        store.update("cfg", priorities=[1, 3])
    with pytest.raises(ValueError, match=r"priority levels are 1\.\.3"):
        TenantConfig(name="x", api_key_env="K", priorities=[7])


def test_admin_api_creates_updates_and_lists_grants(engine: sa.Engine, tmp_path: Path) -> None:
    state = tmp_path / "state"
    app = gateway_app(engine, state, GatewayConfig())
    with client(app, admin_token(engine, state)) as admin:
        made = admin.post(
            "/tenants", json={"name": "acme", "priorities": [1], "max_bytes_in_flight": 4096}
        )
        assert made.status_code == 201, made.text
        listed = {t["tenant"]: t for t in admin.get("/tenants").json()}
        assert listed["acme"] == {
            "tenant": "acme",
            "weight": 1.0,
            "models": ["*"],
            "source": "cli",
            "priorities": [1, 2],
            "max_requests_in_flight": None,
            "max_bytes_in_flight": 4096,
            "status": "active",
            "suspended_at": None,
            "suspended_reason": None,
            "deleted_at": None,
        }
        changed = admin.patch(
            "/tenants/acme", json={"priorities": [], "max_requests_in_flight": 16}
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["priorities"] == [2]
        assert changed.json()["max_requests_in_flight"] == 16
        assert changed.json()["max_bytes_in_flight"] == 4096  # not sent: kept
        # null puts a cap back to the server's default.
        cleared = admin.patch("/tenants/acme", json={"max_bytes_in_flight": None}).json()
        assert cleared["max_bytes_in_flight"] is None and cleared["max_requests_in_flight"] == 16
        for body in (
            {"priorities": [0]},
            {"priorities": [4]},
            {"priorities": ["1"]},
            {"max_requests_in_flight": -1},
            {"max_bytes_in_flight": 1.5},
            {"colour": "red"},
        ):
            answer = admin.patch("/tenants/acme", json=body)
            assert answer.status_code == 400, (body, answer.text)
            assert set(answer.json()) == {"error"}
        missing = admin.patch("/tenants/ghost", json={"weight": 2})
        assert missing.status_code == 404 and "no tenant 'ghost'" in missing.json()["error"]
    records = [(r.actor, r.action) for r in audit.read(engine) if r.target == "tenant:acme"]
    assert records == [
        ("admin", "tenant.create"),
        ("admin", "tenant.update"),
        ("admin", "tenant.update"),
    ]


def test_cli_tenants_create_and_update_priorities(
    engine: sa.Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    admin_token(engine, state)
    with AdminServer(gateway_app(engine, state, GatewayConfig())) as server:
        at = ("--url", server.url, "--state-dir", str(state))
        code = main(["tenants", "create", "acme", "--priorities", "1,2", *at])
        assert code == 0 and "API key (shown once)" in capsys.readouterr().out
        code = main(["tenants", "update", "acme", "--max-requests-in-flight", "32", "--json", *at])
        out = json.loads(capsys.readouterr().out)
        assert code == 0 and out["priorities"] == [1, 2] and out["max_requests_in_flight"] == 32
        code = main(["tenants", "update", "acme", "--priorities", "2", *at])
        assert code == 0
        code = main(["tenants", "list", *at])
        listing = capsys.readouterr().out
        assert "acme" in listing and "priorities=2 " in listing and "max_requests=32" in listing
        assert main(["tenants", "update", "acme", *at]) == 2
        assert "give at least one of --weight" in capsys.readouterr().err
        with pytest.raises(SystemExit) as bad:
            main(["tenants", "update", "acme", "--max-bytes-in-flight", "lots", *at])
        assert bad.value.code == 2
    actions = [r.action for r in audit.read(engine) if r.target == "tenant:acme"]
    assert actions == ["tenant.create", "tenant.update", "tenant.update"]
