"""``gpugate audit log``'s filters and order against a real admin API: the records it
prints are the gateway's, page after page, whatever the page size."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import serving.cli.audit as audit_cli
from serving.cli import main
from serving.config import GatewayConfig
from serving.state import audit
from tests.integration.serving.admin.server import AdminServer, admin_token, gateway_app


@pytest.fixture
def gateway(engine: sa.Engine, state: Path) -> Iterator[AdminServer]:
    admin_token(engine, state)
    with AdminServer(gateway_app(engine, state, GatewayConfig())) as server:
        yield server


def _log(capsys: pytest.CaptureFixture[str], at: tuple[str, ...], *argv: str) -> list[Any]:
    code = main(["audit", "log", "--json", *argv, *at])
    out, err = capsys.readouterr()
    assert code == 0, err
    return list(json.loads(out))


def test_filters_order_and_pages(
    gateway: AdminServer,
    state: Path,
    engine: sa.Engine,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    at = ("--url", gateway.url, "--state-dir", str(state))
    for name in ("acme", "acme-eu", "beta", "gamma"):
        assert main(["tenants", "create", name, "--json", *at]) == 0
    assert main(["tenants", "suspend", "beta", "--reason", "unpaid", *at]) == 0
    capsys.readouterr()
    every = [r.as_json() for r in audit.read(engine)]
    monkeypatch.setattr(audit_cli, "PAGE", 2)  # several pages, each a request

    assert [r["seq"] for r in _log(capsys, at)] == [r["seq"] for r in every]
    newest = _log(capsys, at, "--newest-first")
    assert [r["seq"] for r in newest] == [r["seq"] for r in every][::-1]
    assert [r["seq"] for r in _log(capsys, at, "--newest-first", "--limit", "3")] == [
        r["seq"] for r in every
    ][::-1][:3]
    assert len(_log(capsys, at, "--limit", "5")) == 5

    created = _log(capsys, at, "--action", "tenant.create", "--actor", "admin")
    assert [r["target"] for r in created] == [
        "tenant:acme",
        "tenant:acme-eu",
        "tenant:beta",
        "tenant:gamma",
    ]
    acme = _log(capsys, at, "--target", "tenant:acme*", "--action", "tenant.*")
    assert {r["target"] for r in acme} == {"tenant:acme", "tenant:acme-eu"}
    either = _log(capsys, at, "--action", "tenant.suspend", "--action", "user.create")
    assert {r["action"] for r in either} == {"tenant.suspend", "user.create"}
    assert _log(capsys, at, "--actor", "ADMIN") == []
    last = every[-1]["at"]
    assert [r["seq"] for r in _log(capsys, at, "--until", last)] == [
        r["seq"] for r in every if r["at"] < last
    ]

    with pytest.raises(SystemExit) as done:
        main(["audit", "log", "--limit", "0", *at])
    assert done.value.code == 2
    assert "not a positive whole number" in capsys.readouterr().err
