"""The admin API against a SQLite file and PostgreSQL: tokens and roles checked by the
gateway, the error form, the generated OpenAPI, and registering by upload under the
gateway's own policy."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from serving.admin import MAX_JSON_BODY
from serving.config import GatewayConfig, MetricPolicy, ModelPolicy
from serving.state import audit
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

POLICY = GatewayConfig(
    policies={
        "digits": ModelPolicy(
            required_approvals=2,
            max_artifact_bytes=2 * 2**20,
            metrics={"accuracy": MetricPolicy(max_regression=0.01)},
        ),
        "tiny": ModelPolicy(max_artifact_bytes=1000),
    }
)


@pytest.fixture
def engine(open_db: OpenEngine) -> sa.Engine:
    return open_db()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def test_tokens_and_roles_are_checked_by_the_gateway(engine: sa.Engine, state: Path) -> None:
    app = gateway_app(engine, state, POLICY)
    root = admin_token(engine, state)
    finance = UserStore(engine).create("fiona", "finance", actor="admin")
    with client(app) as anyone:
        missing = anyone.get("/users")
        assert missing.status_code == 401 and "missing token" in missing.json()["error"]
        assert missing.headers["www-authenticate"] == "Bearer"
        basic = anyone.get("/users", headers={"Authorization": "Basic eDp5"})
        assert basic.status_code == 401 and "malformed" in basic.json()["error"]
        assert anyone.get("/users", headers={"Authorization": "Bearer ggu_nope"}).json() == {
            "error": "unknown user token"
        }
    with client(app, finance) as fin:
        assert fin.get("/whoami").json() == {"name": "fiona", "role": "finance"}
        denied = fin.post("/users", json={"name": "x", "role": "admin"})
        assert denied.status_code == 403
        assert denied.json() == {
            "error": "user 'fiona' (role finance) may not users.create; needs admin"
        }
        assert fin.get("/costs").status_code == 200
    with client(app, root) as admin:
        made = admin.post("/users", json={"name": "ann", "role": "auditor"})
        assert made.status_code == 201 and made.json()["token"].startswith("ggu_")
        listed = {u["user"]: u["role"] for u in admin.get("/users").json()}
        assert listed == {"admin": "admin", "fiona": "finance", "ann": "auditor"}


def test_errors_keep_the_error_form(engine: sa.Engine, state: Path) -> None:
    app = gateway_app(engine, state, POLICY)
    with client(app, admin_token(engine, state)) as admin:

        def error(method: str, path: str, status: int, **kw: Any) -> str:
            answer = admin.request(method, path, **kw)
            assert answer.status_code == status, answer.text
            body = answer.json()
            assert list(body) == ["error"], body
            return str(body["error"])

        assert "body.role" in error("POST", "/users", 400, json={"name": "y", "role": "root"})
        assert "body.name" in error("POST", "/users", 400, json={"name": "../x", "role": "admin"})
        assert "malformed JSON" in error(
            "POST", "/users", 400, content=b"{nope", headers={"content-type": "application/json"}
        )
        assert "body.color" in error(
            "POST", "/models/digits/rollout", 400, json={"version": "2", "color": "red"}
        )
        assert "steps must increase" in error(
            "POST", "/models/digits/rollout", 400, json={"version": "2", "steps": [50, 10]}
        )
        assert "query.colour" in error("GET", "/costs?colour=red", 400)
        assert "query.from" in error("GET", "/costs?from=yesterday", 400)
        assert "query.since" in error("GET", "/audit?since=1700000000", 400)  # not a Unix time
        assert "after the start" in error("GET", "/costs?from=2026-11-02&to=2026-11-01", 400)
        assert "body.reason" in error(
            "POST", "/models/digits/rollback", 400, json={"reason": "a\x00b"}
        )
        assert "body.reason" in error(
            "POST", "/models/digits/versions/1/approve", 400, json={"reason": "   "}
        )
        too_big = {"name": "z", "role": "admin", "pad": "x" * MAX_JSON_BODY}
        assert "limit" in error("POST", "/users", 413, json=too_big)
        assert error("GET", "/nope", 404) == "no admin route /admin/nope"
        assert error("PUT", "/users", 405) == "method PUT not allowed"
        assert "no tenant 'ghost'" in error("DELETE", "/tenants/ghost", 404)
        assert "no rollout in progress" in error("POST", "/models/digits/rollout/pause", 404)
        admin.post("/tenants", json={"name": "t1"})
        assert "already exists" in error("POST", "/tenants", 409, json={"name": "t1"})


def test_openapi_is_generated_with_each_action_and_the_error_answers(
    engine: sa.Engine, state: Path
) -> None:
    app = gateway_app(engine, state, POLICY)
    with client(app) as anyone:
        spec = anyone.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1") and spec["servers"] == [{"url": "/admin"}]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    operations = [op for path in spec["paths"].values() for op in path.values()]
    assert len(operations) == 44
    for op in operations:
        (requirement,) = op["security"]
        (action,) = requirement["HTTPBearer"]
        assert op["description"].startswith(f"Action `{action}`; roles: ")
        assert {"400", "401", "403", "default"} <= set(op["responses"])
        assert "422" not in op["responses"]
        error = op["responses"]["default"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorBody"}
    costs = spec["paths"]["/costs"]["get"]
    assert "roles: admin, finance" in costs["description"]
    assert {p["name"] for p in costs["parameters"]} == {
        "from",
        "to",
        "group_by",
        "share_idle",
        "tenant",
    }
    upload = spec["paths"]["/models/{name}/versions"]["post"]
    assert list(upload["requestBody"]["content"]) == ["application/octet-stream"]


def _upload(admin: Any, name: str, data: bytes, sha256: str | None = None, **params: Any) -> Any:
    query = {"sha256": sha256 or hashlib.sha256(data).hexdigest(), **params}
    return admin.post(
        f"/models/{name}/versions",
        params=query,
        content=data,
        headers={"content-type": "application/octet-stream"},
    )


def test_register_uploads_checks_digest_and_size_under_the_gateways_policy(
    engine: sa.Engine, state: Path, tmp_path: Path
) -> None:
    app = gateway_app(engine, state, POLICY)
    users = UserStore(engine)
    deployer = users.create("dee", "deployer", actor="admin")
    finance = users.create("fin", "finance", actor="admin")
    weights = digits_weights(tmp_path / "v1.safetensors").read_bytes()
    store = state / "artifacts" / "sha256"
    with client(app, finance) as fin:
        denied = _upload(fin, "digits", weights, format="safetensors")
        assert denied.status_code == 403 and "may not models.register" in denied.json()["error"]
    with client(app, deployer) as dee:
        wrong = _upload(dee, "digits", weights, sha256="0" * 64, format="safetensors")
        assert wrong.status_code == 400 and "not the declared" in wrong.json()["error"]
        assert sorted(p.name for p in store.iterdir()) == []  # nothing kept

        big = _upload(dee, "tiny", b"x" * 5000, format="safetensors")
        assert big.status_code == 413
        assert big.json()["error"].startswith("refused by the size guardrail: ")

        bad_tensor = _upload(
            dee, "digits", weights, format="safetensors", input=["pixels:FP99:64"], output=["y"]
        )
        assert bad_tensor.status_code == 400 and "FP99" in bad_tensor.json()["error"]

        pickled = _upload(dee, "digits", b"\x80\x04K\x01.", format="safetensors", **SIGNATURE)
        assert pickled.status_code == 409 and "is a Python pickle" in pickled.json()["error"]
        assert list(store.iterdir()) == []  # refused: neither filed nor left as a temporary

        made = _upload(
            dee,
            "digits",
            weights,
            format="safetensors",
            metric=["accuracy=0.9"],
            source="run://1",
            **SIGNATURE,
            **DIGITS_CLASS,
        )
        assert made.status_code == 201, made.text
        v1 = made.json()
        assert (v1["version"], v1["author"], v1["stage"]) == ("1", "dee", "registered")
        assert v1["sha256"] == hashlib.sha256(weights).hexdigest()
        assert v1["lineage"]["source_uri"] == "run://1" and v1["metrics"] == {"accuracy": 0.9}
        assert (store / v1["sha256"]).read_bytes() == weights
        assert [p.name for p in store.iterdir()] == [v1["sha256"]]  # no temporary file left
    refusals = [r for r in audit.read(engine) if r.action == "model.refused"]
    assert [(r.actor, r.target, r.after["check"]) for r in refusals] == [
        ("dee", "model:tiny:new", "size"),
        ("dee", "model:digits:new", "payload"),
    ]


def test_approvals_follow_the_gateways_policy(
    engine: sa.Engine, state: Path, tmp_path: Path
) -> None:
    app = gateway_app(engine, state, POLICY)
    users = UserStore(engine)
    approvers = [users.create(f"appr{i}", "approver", actor="admin") for i in range(2)]
    weights = digits_weights(tmp_path / "v1.safetensors").read_bytes()
    with client(app, admin_token(engine, state)) as admin:
        made = _upload(admin, "digits", weights, format="safetensors", **SIGNATURE, **DIGITS_CLASS)
        assert made.status_code == 201, made.text
        own = admin.post("/models/digits/versions/1/approve", json={"reason": "mine"})
        assert own.status_code == 409 and "is the author" in own.json()["error"]
    stages = []
    for token in approvers:
        with client(app, token) as appr:
            ok = appr.post("/models/digits/versions/1/approve", json={"reason": "fine"})
            assert ok.status_code == 200, ok.text
            stages.append(ok.json()["stage"])
    assert stages == ["registered", "approved"]  # two approvals, as the policy says
    with client(app, approvers[0]) as appr:
        shown = appr.get("/models/digits/versions/1").json()
    assert [a["approver"] for a in shown["approvals"]] == ["appr0", "appr1"]
