"""The ``gpugate`` command as a client of a real admin API (uvicorn on a socket, SQLite
state): exit codes, ``--json``, uploads, and the commands that open the database
directly."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from serving.cli import main
from serving.config import GatewayConfig, ModelPolicy
from serving.tenancy import UserStore
from tests.integration.serving.admin.server import (
    AdminServer,
    admin_token,
    digits_weights,
    gateway_app,
)

POLICY = GatewayConfig(policies={"*": ModelPolicy(max_artifact_bytes=2**20)})


@pytest.fixture
def gateway(engine: sa.Engine, state: Path) -> Iterator[AdminServer]:
    admin_token(engine, state)  # STATE/admin.token, as `gpugate serve` leaves it
    with AdminServer(gateway_app(engine, state, POLICY)) as server:
        yield server


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("gpugate ")
    for argv in (["tenants", "create"], ["models", "promote", "m", "1", "--to", "prod"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2
    with pytest.raises(SystemExit) as done:
        main(["rollout", "start", "m", "2", "--interval", "soon"])
    assert done.value.code == 2 and "duration 'soon'" in capsys.readouterr().err


def test_commands_act_through_the_gateway_and_exit_1_when_refused(
    gateway: AdminServer, state: Path, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ("--url", gateway.url, "--state-dir", str(state))
    code, out, _ = run(capsys, "tenants", "create", "acme", "--weight", "2", "--json", *at)
    assert code == 0 and json.loads(out)["api_key"].startswith("gg_")
    code, out, _ = run(capsys, "tenants", "list", *at)
    assert code == 0 and out.startswith("acme ") and "weight=2" in out

    code, out, _ = run(capsys, "users", "create", "fin", "--role", "finance", "--json", *at)
    finance = json.loads(out)["token"]
    code, _, err = run(capsys, "tenants", "delete", "acme", *at, "--token", finance)
    assert code == 1
    assert err == (
        "gpugate: error: user 'fin' (role finance) may not tenants.delete; needs admin\n"
    )
    code, _, err = run(capsys, "users", "list", *at, "--token", "ggu_wrong")
    assert (code, err) == (1, "gpugate: error: unknown user token\n")
    code, _, err = run(capsys, "tenants", "delete", "ghost", *at)
    assert (code, err) == (1, "gpugate: error: no tenant 'ghost'\n")
    code, out, _ = run(capsys, "tenants", "delete", "acme", "--json", *at)
    assert (code, json.loads(out)) == (0, {"tenant": "acme", "deleted": True})

    code, out, _ = run(capsys, "audit", "log", "--json", *at)
    assert ("admin", "tenant.delete", "tenant:acme") in {
        (r["actor"], r["action"], r["target"]) for r in json.loads(out)
    }
    records = len(json.loads(out))
    code, out, _ = run(capsys, "audit", "verify", *at)
    assert (code, out) == (
        0,
        f"audit chain intact: {records} records; matches its anchor at record {records}\n",
    )


def test_no_gateway_and_no_token_are_failures_that_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "users", "list", "--url", "http://127.0.0.1:9", "--token", "t")
    assert code == 1
    assert err.startswith("gpugate: error: cannot reach the gateway at http://127.0.0.1:9 (")
    code, _, err = run(capsys, "users", "list", "--state-dir", str(tmp_path))
    assert code == 1 and f"no readable {tmp_path / 'admin.token'}" in err


def test_register_uploads_and_the_gateway_refuses_what_its_policy_refuses(
    gateway: AdminServer,
    state: Path,
    engine: sa.Engine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    at = ("--url", gateway.url, "--state-dir", str(state))
    weights = digits_weights(tmp_path / "digits.safetensors")
    register = (
        "models", "register", "digits", "--artifact", str(weights), "--format", "safetensors",
        "--class", "serving.demo:DigitsMLP", "--model-kwargs", '{"hidden": 16}',
        "--input", "pixels:FP32:64", "--output", "logits:FP32:10", "--metric", "accuracy=0.9",
    )  # fmt: skip
    code, out, err = run(capsys, *register, "--json", "--code-revision", "abc", *at)
    assert code == 0, err
    made = json.loads(out)
    assert (made["version"], made["lineage"]["code_revision"]) == ("1", "abc")
    code, out, _ = run(capsys, "models", "lineage", "digits", "1", *at)
    assert out == "digits:1  stage=registered author=admin code=abc\n"

    # Over the gateway's 1 MiB limit: refused while it arrives, and the refusal (not a
    # reset connection) reaches the command, also for a body still being sent.
    big = tmp_path / "big.safetensors"
    big.write_bytes(weights.read_bytes() + b"\0" * (8 * 2**20))
    code, _, err = run(capsys, *register[:3], "--artifact", str(big), *register[5:], *at)
    assert code == 1 and "refused by the size guardrail" in err
    deployer = UserStore(engine).create("dee", "deployer", actor="admin")
    finance = UserStore(engine).create("fin", "finance", actor="admin")
    code, _, err = run(capsys, *register[:3], "--artifact", str(big), *register[5:], *at,
                       "--token", finance)  # fmt: skip
    assert code == 1 and "may not models.register" in err
    code, out, err = run(capsys, *register, "--version", "v2", "--json", *at, "--token", deployer)
    assert code == 0, err
    assert json.loads(out)["author"] == "dee"


def test_database_commands_are_local_and_admin_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = ("--state-dir", str(tmp_path / "db"))
    code, out, _ = run(capsys, "db", "upgrade", "--json", *state)
    first = json.loads(out)
    assert code == 0 and first["changed"] and first["before"] is None
    code, out, _ = run(capsys, "db", "upgrade", *state)
    assert code == 0 and out == f"database schema is at revision {first['after']} already\n"

    code, out, _ = run(capsys, "users", "bootstrap", "--json", *state)
    assert code == 0 and json.loads(out)["user"] == "admin"
    code, _, err = run(capsys, "users", "bootstrap", "--name", "second", *state)
    assert code == 1 and "has an admin already" in err

    code, out, _ = run(capsys, "audit", "verify", "--offline", *state)
    assert (code, out) == (0, "audit chain intact: 1 records; matches its anchor at record 1\n")
    with sqlite3.connect(tmp_path / "db" / "gpugate.db") as db:
        db.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")
    code, out, _ = run(capsys, "audit", "verify", "--offline", "--json", *state)
    assert code == 1 and json.loads(out)["first_bad_seq"] == 1
    code, _, err = run(capsys, "audit", "verify", "--offline", "--state-dir", str(tmp_path / "x"))
    assert code == 1 and "no state database at" in err
