"""The gateway alone enforces roles, approvals and policy, whoever runs the CLI and
wherever: a real `gpugate serve` whose config needs two approvals and allows at most a
0.01 accuracy regression for digits, driven by the CLI (no --config: the CLI takes no
policy) and by raw HTTP.

The tests share one gateway and run in order.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Gateway, admin, admin_token, configured_gateway, train_digits

pytestmark = pytest.mark.timeout(900)

POLICY = """
policies:
  digits:
    required_approvals: 2
    metrics:
      accuracy: {higher_is_better: true, max_regression: 0.01}
"""
# What a caller would like the rules to be; the CLI has no way to send it.
LAX = """
policies:
  digits:
    required_approvals: 1
    metrics:
      accuracy: {higher_is_better: true, max_regression: 1.0}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with configured_gateway(tmp_path_factory, "enforced", POLICY) as gw:
        yield gw


@pytest.fixture(scope="module")
def users(gateway: Gateway) -> dict[str, str]:
    tokens = {}
    for name, role in (("dee", "deployer"), ("ann", "approver"), ("bob", "approver")):
        made = gateway.cli("users", "create", name, "--role", role, "--json")
        assert made.returncode == 0, made.stderr
        tokens[name] = json.loads(made.stdout)["token"]
    made = gateway.cli("users", "create", "fin", "--role", "finance", "--json")
    tokens["fin"] = json.loads(made.stdout)["token"]
    return tokens


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    path = tmp_path_factory.mktemp("weights") / "digits.safetensors"
    return path, train_digits(path, seed=1)


def register(
    gw: Gateway, token: str, artifact: Path, accuracy: float, *extra: str
) -> subprocess.CompletedProcess[str]:
    return gw.admin_cli(
        "models", "register", "digits", "--artifact", str(artifact), "--format", "safetensors",
        "--class", "serving.demo:DigitsMLP", "--model-kwargs", '{"hidden": 128}',
        "--metric", f"accuracy={accuracy}", "--json", *extra, token=token,
    )  # fmt: skip


def test_a_version_the_gateways_policy_refuses_stays_refused(
    gateway: Gateway, users: dict[str, str], weights: tuple[Path, float], tmp_path: Path
) -> None:
    artifact, _ = weights
    refused = register(gateway, users["dee"], artifact, 0.50)
    assert refused.returncode == 1
    assert "gpugate: error: refused by the metrics guardrail: accuracy 0.5 is worse than " in (
        refused.stderr
    )
    assert "the policy allows at most 0.01" in refused.stderr

    # A laxer policy of the caller's own cannot be given: the CLI reads none.
    lax = tmp_path / "lax.yaml"
    lax.write_text(LAX)
    own_policy = register(gateway, users["dee"], artifact, 0.50, "--config", str(lax))
    assert own_policy.returncode == 2 and "unrecognized arguments: --config" in own_policy.stderr

    log = json.loads(gateway.cli("audit", "log", "--model", "digits", "--json").stdout)
    refusals = [r for r in log if r["action"] == "model.refused"]
    assert [(r["actor"], r["after"]["check"]) for r in refusals] == [("dee", "metrics")]
    listed = json.loads(gateway.cli("models", "list", "digits", "--json").stdout)
    assert [v["version"] for v in listed] == ["1"]  # nothing was recorded


def test_one_approval_does_not_reach_production_when_the_gateway_needs_two(
    gateway: Gateway, users: dict[str, str], weights: tuple[Path, float]
) -> None:
    artifact, accuracy = weights
    made = register(gateway, users["dee"], artifact, accuracy)
    assert made.returncode == 0, made.stderr
    version = json.loads(made.stdout)["version"]
    assert version == "2"

    approved = gateway.admin_cli(
        "models", "approve", "digits", "2", "--reason", "eval ok", "--json", token=users["ann"]
    )
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["stage"] == "registered"  # one of the two it needs

    for to, why in (
        ("staging", "digits:2 is registered; only a version that is approved or archived"),
        ("production", "digits:2 is registered; only a version that is staging"),
    ):
        cli = gateway.admin_cli("models", "promote", "digits", "2", "--to", to, token=users["dee"])
        assert cli.returncode == 1 and why in cli.stderr, cli.stderr
        status, body = admin(
            gateway, "POST", "/models/digits/versions/2/promote", users["dee"], {"to": to}
        )
        assert status == 409 and why in body["error"]

    second = gateway.admin_cli(
        "models", "approve", "digits", "2", "--reason", "agreed", "--json", token=users["bob"]
    )
    assert second.returncode == 0 and json.loads(second.stdout)["stage"] == "approved"


def test_a_role_without_the_action_is_refused_by_cli_and_server_alike(
    gateway: Gateway, users: dict[str, str]
) -> None:
    needs = "user 'fin' (role finance) may not models.approve; needs admin, approver"
    cli = gateway.admin_cli("models", "approve", "digits", "2", "--reason", "x", token=users["fin"])
    assert (cli.returncode, cli.stderr) == (1, f"gpugate: error: {needs}\n")
    status, body = admin(
        gateway, "POST", "/models/digits/versions/2/approve", users["fin"], {"reason": "x"}
    )
    assert (status, body) == (403, {"error": needs})

    deployer_needs = "user 'dee' (role deployer) may not users.create; needs admin"
    cli = gateway.admin_cli("users", "create", "eve", "--role", "admin", token=users["dee"])
    assert (cli.returncode, cli.stderr) == (1, f"gpugate: error: {deployer_needs}\n")
    status, body = admin(gateway, "POST", "/users", users["dee"], {"name": "eve", "role": "admin"})
    assert (status, body) == (403, {"error": deployer_needs})


def test_nobody_approves_their_own_version(gateway: Gateway, weights: tuple[Path, float]) -> None:
    root = admin_token(gateway)  # an admin may approve, but not what they registered
    artifact, accuracy = weights
    made = register(gateway, root, artifact, accuracy)
    assert made.returncode == 0, made.stderr
    version = json.loads(made.stdout)["version"]
    own = gateway.admin_cli("models", "approve", "digits", version, "--reason", "mine")
    assert own.returncode == 1 and f"'admin' is the author of digits:{version}" in own.stderr
    status, body = admin(
        gateway, "POST", f"/models/digits/versions/{version}/approve", root, {"reason": "mine"}
    )
    assert status == 409 and "is the author" in body["error"]
    shown = json.loads(gateway.cli("models", "show", "digits", version, "--json").stdout)
    assert (shown["stage"], shown["approvals"]) == ("registered", [])
    verify = gateway.cli("audit", "verify")
    assert verify.returncode == 0, verify.stdout
