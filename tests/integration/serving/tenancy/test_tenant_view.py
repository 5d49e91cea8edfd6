"""A tenant's own view against real databases (SQLite and PostgreSQL): its bounds (keys,
models), the order of its keys, own caps against the server's, per-model quotas, and
one read shared by concurrent asks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa

import serving.tenancy.view as view_module
from router import Unauthenticated
from serving.config import CostsConfig, GatewayConfig
from serving.costs import LedgerReports, Pricing
from serving.registry import Registry, Stages
from serving.tenancy import (
    Admission,
    QuotaRow,
    QuotaStore,
    ServerCaps,
    TenantKeyStore,
    TenantStore,
    TenantViews,
)

CAPS = ServerCaps(max_requests_in_flight=512, max_bytes_in_flight=1 << 28)


def views(engine: sa.Engine, tmp_path: Path) -> TenantViews:
    stages = Stages(Registry(engine, tmp_path / "state", GatewayConfig()))
    reports = LedgerReports(engine, Pricing(CostsConfig()))
    return TenantViews.open(engine, stages, reports, CAPS)


def test_keys_and_models_are_bounded(
    engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(view_module, "MAX_KEYS", 3)
    monkeypatch.setattr(view_module, "MAX_MODELS", 2)
    models = ["m1", "m2", "m3", "m4", "m5"]
    TenantStore(engine).create("acme", 1.0, models)
    keys = TenantKeyStore(engine)
    made = [keys.create("acme", f"k{i}").row.id for i in range(5)]
    keys.revoke("acme", made[-1])
    QuotaStore(engine).set("acme", QuotaRow("", requests_per_s=10))
    for m in models:
        QuotaStore(engine).set("acme", QuotaRow(m, rows_per_s=100, rows_burst=400))

    got = views(engine, tmp_path).read("acme")

    listed = got["keys"]
    assert listed["total"] == 6  # the default key and five more
    # The unrevoked first, newest first: the revoked newest key is left out.
    assert [k["key_id"] for k in listed["keys"]] == [made[3], made[2], made[1]]
    assert got["model_cards"]["total"] == 5
    assert [m["model"] for m in got["model_cards"]["models"]] == ["m1", "m2"]
    assert all(m["production"] is None for m in got["model_cards"]["models"])
    quotas = got["quotas"]
    assert quotas["total"] == 6 and len(quotas["quotas"]) == 3  # every model, then two
    assert quotas["quotas"][0] == {
        "model": None,
        "requests": {"per_s": 10.0, "burst": 10.0},
        "rows": None,
    }
    assert quotas["quotas"][1] == {
        "model": "m1",
        "requests": None,
        "rows": {"per_s": 100.0, "burst": 400.0},
    }
    assert got["usage"]["requests"] == 0 and got["usage"]["by_model"] == []


def test_own_caps_and_grants_beside_the_servers(engine: sa.Engine, tmp_path: Path) -> None:
    admission = Admission.checked([1, 2], max_requests_in_flight=8)
    TenantStore(engine).create("acme", 2.0, ["*"], admission=admission)
    got = views(engine, tmp_path).read("acme")
    assert got["priorities"] == [1, 2] and got["models"] == ["*"]
    assert got["max_requests_in_flight"] == {"limit": 8, "server_default": False}
    assert got["max_bytes_in_flight"] == {"limit": 1 << 28, "server_default": True}
    assert got["model_cards"] == {"total": 0, "models": []}


def test_concurrent_asks_share_one_read_and_a_deleted_tenant_is_unknown(
    engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TenantStore(engine)
    store.create("acme")
    source = views(engine, tmp_path)
    reads: list[str] = []
    read = source.read

    def counted(name: str) -> dict[str, object]:
        reads.append(name)
        return read(name)

    monkeypatch.setattr(source, "read", counted)

    async def ask() -> None:
        answers = await asyncio.gather(*(source.view("acme") for _ in range(8)))
        assert all(a == answers[0] for a in answers)
        assert reads == ["acme"]
        store.delete("acme")
        await asyncio.sleep(view_module.REUSE_S + 0.05)
        with pytest.raises(Unauthenticated):
            await source.view("acme")

    asyncio.run(ask())
