"""Identities, the admin API, the audit log and the model registry against a real
`gpugate serve` (local Ray, SQLite state in a temp dir, the demo digits model).

The tests of this module share one gateway and run in order: users first, then a
second version of the demo model goes through approval, staging and production
while a load generator runs, then rollback, then every guardrail refusal.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    Gateway,
    Traffic,
    admin,
    admin_token,
    configured_gateway,
    make_user,
)
from tests.e2e.conftest import register_digits as register
from tests.e2e.conftest import train_digits as train

pytestmark = pytest.mark.timeout(900)

POLICY = """
policies:
  digits:
    required_approvals: 1
    metrics:
      accuracy: {higher_is_better: true, max_regression: 0.01}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with configured_gateway(tmp_path_factory, "registry-state", POLICY) as gw:
        yield gw


def cli(gw: Gateway, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user of the gateway (default: its admin); the gateway applies its own
    config's policies."""
    return gw.admin_cli(*args, token=token)


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
    status, rotated = admin(gateway, "POST", "/tenants/api-t/rotate", root)
    assert status == 200 and rotated["api_key"] not in ("", tenant["api_key"])
    rotate_cli = cli(gateway, "tenants", "rotate", "api-t", "--json")
    assert rotate_cli.returncode == 0 and json.loads(rotate_cli.stdout)["tenant"] == "api-t"
    assert admin(gateway, "DELETE", "/tenants/api-t", root) == (
        200,
        {"tenant": "api-t", "deleted": True},
    )
    assert admin(gateway, "DELETE", "/tenants/api-t", root)[0] == 404

    with urllib.request.urlopen(f"http://{gateway.http_url}/admin/openapi.json") as resp:
        spec = json.loads(resp.read())
    assert spec["servers"] == [{"url": "/admin"}]
    assert "/users" in spec["paths"] and "/audit/verify" in spec["paths"]


def test_cli_acts_with_a_token_and_is_checked(gateway: Gateway) -> None:
    finance = make_user(gateway, "fin-cli", "finance")
    denied = gateway.cli("tenants", "create", "nope", "--token", finance)
    assert denied.returncode == 1
    assert "gpugate: error: user 'fin-cli' (role finance) may not tenants.create" in denied.stderr
    bad = gateway.cli("users", "list", "--token", "ggu_wrong")
    assert bad.returncode == 1 and "unknown user token" in bad.stderr
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


# --------------------------------------------------------------------- registry


def test_second_version_approval_and_live_promotion_under_load(
    gateway: Gateway, tmp_path: Path
) -> None:
    root = admin_token(gateway)
    approver = make_user(gateway, "appr", "approver")
    deployer = make_user(gateway, "dep", "deployer")
    finance = make_user(gateway, "fin2", "finance")
    listed = json.loads(cli(gateway, "models", "list", "--json", token=finance).stdout)
    assert [(v["version"], v["stage"], v["author"]) for v in listed] == [
        ("1", "production", "config")
    ]

    accuracy = train(tmp_path / "v2.safetensors", seed=1)
    made = register(
        gateway,
        root,
        tmp_path / "v2.safetensors",
        "--parent",
        "1",
        "--metric",
        f"accuracy={accuracy}",
        "--source",
        "run://seed-1",
        "--dataset-digest",
        "sklearn-digits",
    )
    assert made.returncode == 0, made.stderr
    v2 = json.loads(made.stdout)
    assert (v2["version"], v2["stage"], v2["author"]) == ("2", "registered", "admin")
    lineage = cli(gateway, "models", "lineage", "digits", "2", token=finance)
    assert lineage.stdout.splitlines()[0].startswith("digits:1 ")
    assert "└─ digits:2" in lineage.stdout and "run://seed-1" in lineage.stdout

    own = cli(gateway, "models", "approve", "digits", "2", "--reason", "mine", token=root)
    assert own.returncode == 1 and "is the author of digits:2" in own.stderr
    by_deployer = cli(gateway, "models", "approve", "digits", "2", "--reason", "x", token=deployer)
    assert by_deployer.returncode == 1 and "may not models.approve" in by_deployer.stderr
    ok = cli(gateway, "models", "approve", "digits", "2", "--reason", "eval ok", token=approver)
    assert ok.returncode == 0, ok.stderr
    shown = json.loads(cli(gateway, "models", "show", "digits", "2", "--json").stdout)
    assert shown["stage"] == "approved"
    assert [(a["approver"], a["reason"]) for a in shown["approvals"]] == [("appr", "eval ok")]

    denied = cli(gateway, "models", "promote", "digits", "2", "--to", "staging", token=finance)
    assert denied.returncode == 1 and "may not models.promote" in denied.stderr

    with Traffic(gateway) as load:
        time.sleep(1.0)
        staged = cli(gateway, "models", "promote", "digits", "2", "--to", "staging", token=deployer)
        assert staged.returncode == 0, staged.stderr
        deadline = time.monotonic() + 120
        while {"name": "digits", "version": "2", "state": "UNAVAILABLE"}.items() > {
            **next((e for e in gateway.index() if e["version"] == "2"), {})
        }.items():
            assert time.monotonic() < deadline, gateway.index()
            time.sleep(0.1)
        # Staging takes no tenant traffic.
        assert load.count()["2"] == 0
        promoted_at = time.monotonic()
        prod = cli(
            gateway, "models", "promote", "digits", "2", "--to", "production", token=deployer
        )
        assert prod.returncode == 0, prod.stderr
        switch_s = load.wait_for_version("2")
        time.sleep(2.0)
    counts = load.count()
    print(
        f"promotion under load: {sum(counts.values())} answered {dict(counts)}, "
        f"{len(load.failures)} failed, switched {switch_s:.2f}s after the command returned "
        f"({time.monotonic() - promoted_at:.1f}s window)"
    )
    assert load.failures == []
    assert counts["1"] > 0 and counts["2"] > 0
    assert gateway.index() == [{"name": "digits", "version": "2", "state": "READY", "reason": ""}]
    with urllib.request.urlopen(f"http://{gateway.http_url}/v2/models/digits") as resp:
        assert json.loads(resp.read())["versions"] == ["2"]


def test_rollback_under_load(gateway: Gateway) -> None:
    deployer = make_user(gateway, "dep-rb", "deployer")
    with Traffic(gateway) as load:
        time.sleep(1.0)
        back = cli(gateway, "models", "rollback", "digits", "--reason", "drill", token=deployer)
        assert back.returncode == 0, back.stderr
        switch_s = load.wait_for_version("1")
        time.sleep(1.0)
    counts = load.count()
    print(
        f"rollback under load: {sum(counts.values())} answered {dict(counts)}, "
        f"{len(load.failures)} failed, switched after {switch_s:.2f}s"
    )
    assert load.failures == []
    assert gateway.index() == [{"name": "digits", "version": "1", "state": "READY", "reason": ""}]
    stages = {
        v["version"]: v["stage"]
        for v in json.loads(cli(gateway, "models", "list", "--json").stdout)
    }
    assert stages == {"1": "production", "2": "archived"}


def test_each_guardrail_refuses_with_its_reason(gateway: Gateway, tmp_path: Path) -> None:
    import torch

    from serving.demo.models import DigitsMLP

    root = admin_token(gateway)
    approver = make_user(gateway, "appr-g", "approver")
    pickled = tmp_path / "model.pt"
    torch.save(DigitsMLP(128).state_dict(), pickled)
    refused = register(gateway, root, pickled)
    assert refused.returncode == 1 and "payload guardrail" in refused.stderr
    assert "torch.save files hold pickles" in refused.stderr

    good = tmp_path / "good.safetensors"
    accuracy = train(good, seed=2)
    narrow = register(
        gateway,
        root,
        good,
        "--input",
        "pixels:FP32:32",
        "--output",
        "logits:FP32:10",
        "--metric",
        f"accuracy={accuracy}",
    )
    assert narrow.returncode == 1 and "signature guardrail" in narrow.stderr
    assert "input 'pixels' has shape [32], production's is [64]" in narrow.stderr

    worse = register(gateway, root, good, "--metric", "accuracy=0.5")
    assert worse.returncode == 1 and "metrics guardrail" in worse.stderr
    assert "accuracy 0.5 is worse than production's" in worse.stderr

    nan = tmp_path / "nan.safetensors"
    train(nan, seed=3, nan=True)
    smoke = register(gateway, root, nan, "--metric", f"accuracy={accuracy}")
    assert smoke.returncode == 1 and "smoke-test guardrail" in smoke.stderr
    assert "NaN/Inf" in smoke.stderr

    made = register(gateway, root, good, "--metric", f"accuracy={accuracy}")
    assert made.returncode == 0, made.stderr
    v = json.loads(made.stdout)
    assert (
        cli(
            gateway, "models", "approve", "digits", v["version"], "--reason", "ok", token=approver
        ).returncode
        == 0
    )
    stored = gateway.state_dir / "artifacts" / "sha256" / v["sha256"]
    os.chmod(stored, 0o644)
    with stored.open("r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    corrupt = cli(
        gateway, "models", "promote", "digits", v["version"], "--to", "staging", token=root
    )
    assert corrupt.returncode == 1 and "digest guardrail" in corrupt.stderr
    assert "changed after registration" in corrupt.stderr

    log = json.loads(cli(gateway, "audit", "log", "--model", "digits", "--json").stdout)
    refusals = [r for r in log if r["action"] == "model.refused"]
    checks = [r["after"].get("check") for r in refusals]
    for check in ("payload", "signature", "metrics", "smoke-test", "digest"):
        assert check in checks, checks
    assert any("author" in r["reason"] for r in refusals)
    verify = cli(gateway, "audit", "verify")
    assert verify.returncode == 0, verify.stdout


def test_admin_api_reads_and_moves_versions(gateway: Gateway, tmp_path: Path) -> None:
    root = admin_token(gateway)
    finance = make_user(gateway, "fin-api", "finance")
    approver = make_user(gateway, "appr-api", "approver")
    status, versions = admin(gateway, "GET", "/models?name=digits", finance)
    assert status == 200 and versions[0]["version"] == "1"
    status, one = admin(gateway, "GET", "/models/digits/versions/2", finance)
    assert status == 200 and one["approvals"][0]["approver"] == "appr"
    status, chain = admin(gateway, "GET", "/models/digits/versions/2/lineage", finance)
    assert [v["version"] for v in chain] == ["2", "1"]
    assert admin(gateway, "GET", "/models/digits/versions/99", finance)[0] == 404

    good = tmp_path / "api.safetensors"
    accuracy = train(good, seed=4)
    made = register(gateway, root, good, "--metric", f"accuracy={accuracy}")
    assert made.returncode == 0, made.stderr
    v = json.loads(made.stdout)["version"]
    path = f"/models/digits/versions/{v}"
    status, body = admin(gateway, "POST", path + "/approve", root, {"reason": "mine"})
    assert status == 409 and "author" in body["error"]
    assert admin(gateway, "POST", path + "/approve", approver, {})[0] == 400
    status, body = admin(gateway, "POST", path + "/approve", approver, {"reason": "ok"})
    assert status == 200 and body["stage"] == "approved"
    status, body = admin(gateway, "POST", path + "/promote", finance, {"to": "staging"})
    assert status == 403 and "may not models.promote" in body["error"]
    status, body = admin(gateway, "POST", path + "/promote", root, {"to": "production"})
    assert status == 409 and "only a version that is staging" in body["error"]
    status, body = admin(gateway, "POST", path + "/reject", approver, {"reason": "late"})
    assert status == 409 and "already decided" in body["error"]
    second = make_user(gateway, "appr-api2", "approver")
    status, body = admin(gateway, "POST", path + "/reject", second, {"reason": "drift"})
    assert status == 200 and body["stage"] == "rejected"
    spec = json.loads(
        urllib.request.urlopen(f"http://{gateway.http_url}/admin/openapi.json").read()
    )
    assert "/models/{name}/versions/{version}/promote" in spec["paths"]
