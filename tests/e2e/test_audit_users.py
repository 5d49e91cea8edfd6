"""A real `gpugate serve` on its embedded SQLite state: the audit key and the state files
are private, a user's token stops working when disabled, rotated or deleted through the
CLI, and a tail deleted from the database with the head rewound is caught by
`audit verify` through the gateway's anchor."""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Gateway, start_gateway

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("audit") / "state")
    try:
        yield gw
    finally:
        gw.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_and_the_audit_key_are_private(gateway: Gateway) -> None:
    state = gateway.state_dir
    assert mode(state) == 0o700
    assert mode(state / "gpugate.db") == 0o600
    assert mode(state / "audit.key") == 0o600
    assert mode(state / "audit.anchor") == 0o600  # the bootstrap admin's record


def test_a_users_token_follows_its_life(gateway: Gateway) -> None:
    made = gateway.admin_cli("users", "create", "bob", "--role", "auditor", "--expires-in", "1h")
    assert made.returncode == 0, made.stderr
    token = made.stdout.rsplit(" ", 1)[1].strip()
    assert gateway.admin_cli("audit", "verify", token=token).returncode == 0

    assert gateway.admin_cli("users", "disable", "bob", "--reason", "audit").returncode == 0
    refused = gateway.admin_cli("audit", "verify", token=token)
    assert (refused.returncode, refused.stderr) == (1, "gpugate: error: unknown user token\n")
    assert gateway.admin_cli("users", "enable", "bob").returncode == 0
    assert gateway.admin_cli("audit", "verify", token=token).returncode == 0

    rotated = gateway.admin_cli("users", "rotate", "bob", "--json")
    new = json.loads(rotated.stdout)["token"]
    assert gateway.admin_cli("audit", "verify", token=token).returncode == 1
    assert gateway.admin_cli("audit", "verify", token=new).returncode == 0

    last = gateway.admin_cli("users", "delete", "admin")
    assert last.returncode == 1 and "last enabled admin" in last.stderr
    assert gateway.admin_cli("users", "delete", "bob").returncode == 0
    assert gateway.admin_cli("audit", "verify", token=new).returncode == 1

    log = json.loads(gateway.admin_cli("audit", "log", "--json").stdout)
    assert [r["action"] for r in log if r["target"] == "user:bob"] == [
        "user.create",
        "user.disable",
        "user.enable",
        "user.rotate",
        "user.delete",
    ]


def test_a_rewound_tail_is_caught_by_the_anchor(gateway: Gateway) -> None:
    intact = gateway.admin_cli("audit", "verify", "--json")
    assert intact.returncode == 0, intact.stdout
    records = json.loads(intact.stdout)["records"]
    assert json.loads(intact.stdout)["anchored_seq"] == records
    # A writer of the database drops the last two records and rewinds the head to match.
    with sqlite3.connect(gateway.state_dir / "gpugate.db") as db:
        keep = records - 2
        (mac,) = db.execute("SELECT hash FROM audit_log WHERE seq = ?", (keep,)).fetchone()
        db.execute("DELETE FROM audit_log WHERE seq > ?", (keep,))
        db.execute("UPDATE audit_head SET seq = ?, hash = ?", (keep, mac))
    broken = gateway.admin_cli("audit", "verify")
    assert broken.returncode == 1
    assert f"record {records} was anchored" in broken.stdout
    assert "removed from the end and the head rewound" in broken.stdout
