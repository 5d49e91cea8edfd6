"""Tenants' rate quotas in the state database (SQLite and PostgreSQL: the ``engine``
fixture of tests/integration/conftest.py), and the tenant directory handing them to the
router with the tenant."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from router import NO_QUOTA, Quota, Rate
from serving.state import audit
from serving.tenancy import QuotaRow, QuotaStore, TenantDirectory, TenantStore
from serving.tenancy.tenants import TenantNotFoundError


def test_quotas_are_set_replaced_listed_and_removed(engine: sa.Engine) -> None:
    TenantStore(engine).create("acme")
    quotas = QuotaStore(engine)
    assert quotas.list("acme") == []
    quotas.set("acme", QuotaRow("", requests_per_s=50, requests_burst=5), actor="ops")
    quotas.set("acme", QuotaRow("digits", rows_per_s=100.5), actor="ops")
    assert quotas.list("acme") == [
        QuotaRow("", requests_per_s=50, requests_burst=5),
        QuotaRow("digits", rows_per_s=100.5),
    ]
    # Replaced whole: the request quota over every model becomes a rows quota.
    quotas.set("acme", QuotaRow("", rows_per_s=10), actor="ops")
    assert quotas.of("acme").quota == Quota(None, Rate(10, 10))
    assert quotas.of("acme").model_quotas == (("digits", Quota(None, Rate(100.5, 100.5))),)
    quotas.set("acme", QuotaRow(""), actor="ops")  # no rate: removed
    assert quotas.list("acme") == [QuotaRow("digits", rows_per_s=100.5)]
    records = [r for r in audit.read(engine) if r.action == "tenant.quota"]
    assert [(r.actor, r.target) for r in records] == [("ops", "tenant:acme")] * 4
    assert records[-1].after is None and records[-1].before["rows_per_s"] == 10
    assert quotas.of("nobody").quota is NO_QUOTA


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (QuotaRow("", requests_per_s=0), "requests_per_s"),
        (QuotaRow("", rows_per_s=-1), "rows_per_s"),
        (QuotaRow("", rows_per_s=float("nan")), "rows_per_s"),
        (QuotaRow("", requests_per_s=2e9), "requests_per_s"),
        (QuotaRow("", requests_per_s=5, requests_burst=0.5), "requests_burst"),
        (QuotaRow("", rows_burst=5), "rows_burst needs rows_per_s"),
    ],
)
def test_bad_quotas_are_refused_and_change_nothing(
    engine: sa.Engine, row: QuotaRow, message: str
) -> None:
    TenantStore(engine).create("acme")
    quotas = QuotaStore(engine)
    with pytest.raises(ValueError, match=message):
        quotas.set("acme", row)
    assert quotas.list("acme") == []


def test_a_quota_needs_a_tenant_and_goes_with_it(engine: sa.Engine) -> None:
    quotas = QuotaStore(engine)
    with pytest.raises(TenantNotFoundError):
        quotas.set("ghost", QuotaRow("", requests_per_s=1))
    with pytest.raises(TenantNotFoundError):
        quotas.list("ghost")
    TenantStore(engine).create("gone")
    quotas.set("gone", QuotaRow("", requests_per_s=1))
    TenantStore(engine).delete("gone")  # soft: the row stays, its quotas too
    with pytest.raises(TenantNotFoundError):
        quotas.set("gone", QuotaRow("", requests_per_s=2))


def test_the_directory_hands_the_router_the_tenant_with_its_quotas(engine: sa.Engine) -> None:
    store = TenantStore(engine)
    key = store.create("acme")
    quotas = QuotaStore(engine)
    directory = TenantDirectory(store, quotas, ttl_s=0.0)
    tenant = asyncio.run(directory.authenticate(key))
    assert tenant is not None and tenant.quota is NO_QUOTA and tenant.model_quotas == ()
    quotas.set("acme", QuotaRow("", requests_per_s=50))
    quotas.set("acme", QuotaRow("digits", rows_per_s=8, rows_burst=16))
    tenant = asyncio.run(directory.authenticate(key))
    assert tenant is not None
    assert tenant.quota == Quota(Rate(50, 50), None)
    assert tenant.quota_of("digits") == Quota(None, Rate(8, 16))
    assert tenant.quota_of("other") is NO_QUOTA
