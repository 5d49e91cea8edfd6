"""Tenants' lifecycle and keys against real databases (SQLite and PostgreSQL): several
keys per tenant, expiry, revocation, rotation with a grace, suspension, soft deletion
and restoring, config tenants, the router's key cache and the keys' last use."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from router import Tenant
from serving.config.schema import TenantConfig
from serving.state import audit, tenant_keys, tenants
from serving.tenancy import (
    KeyNotFoundError,
    KeyStateError,
    TenantDeletedError,
    TenantDirectory,
    TenantError,
    TenantKeyStore,
    TenantNotFoundError,
    TenantStore,
    hash_key,
)


class Clocks:
    """A wall clock and a monotonic clock that the test moves together."""

    def __init__(self) -> None:
        self.wall = datetime(2030, 1, 1, tzinfo=UTC)
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def store(engine: sa.Engine, clocks: Clocks) -> TenantStore:
    return TenantStore(engine, clock=clocks.now)


@pytest.fixture
def keys(engine: sa.Engine, clocks: Clocks) -> TenantKeyStore:
    return TenantKeyStore(engine, clock=clocks.now)


def auth(store: TenantStore, key: str) -> Tenant | None:
    return store.get_by_key_hash(hash_key(key))


def actions(engine: sa.Engine) -> list[str]:
    return [r.action for r in audit.read(engine)]


def cfg(name: str, env: str) -> TenantConfig:
    return TenantConfig(name=name, api_key_env=env, weight=1, models=["*"])


# --- keys ------------------------------------------------------------------------------


def test_a_tenant_holds_several_labelled_keys(
    engine: sa.Engine, store: TenantStore, keys: TenantKeyStore, clocks: Clocks
) -> None:
    first = store.create("acme")
    ci = keys.create("acme", "ci", expires_at=clocks.now() + timedelta(days=30), actor="ann")
    assert ci.api_key.startswith("gg_") and ci.api_key != first
    for key in (first, ci.api_key):
        found = auth(store, key)
        assert found is not None and found.name == "acme"
    listed = keys.list("acme")
    assert [(k.label, k.status(clocks.now())) for k in listed] == [
        ("default", "active"),
        ("ci", "active"),
    ]
    assert listed[1].expires_at == clocks.now() + timedelta(days=30)
    assert listed[1].fingerprint == hash_key(ci.api_key)[:12]
    assert ci.api_key not in repr(listed) and hash_key(ci.api_key) not in repr(listed)
    assert actions(engine)[-1] == "tenant.key.create"
    for bad in ("", "has space", "x" * 65, "-dash"):
        with pytest.raises(ValueError, match="label"):
            keys.create("acme", bad)
    for when in (clocks.now(), clocks.now() + timedelta(days=4000)):
        with pytest.raises(ValueError, match="expires_at"):
            keys.create("acme", "late", expires_at=when)
    with pytest.raises(TenantNotFoundError):
        keys.create("ghost")
    with pytest.raises(KeyNotFoundError):
        keys.revoke("acme", 10_000)


def test_an_expired_key_is_refused(
    store: TenantStore, keys: TenantKeyStore, clocks: Clocks
) -> None:
    store.create("acme")
    brief = keys.create("acme", "brief", expires_at=clocks.now() + timedelta(minutes=5))
    assert auth(store, brief.api_key) is not None
    clocks.advance(299)
    assert auth(store, brief.api_key) is not None
    clocks.advance(1)
    assert auth(store, brief.api_key) is None
    assert keys.list("acme")[1].status(clocks.now()) == "expired"


def test_revoke_is_audited_and_idempotent(
    engine: sa.Engine, store: TenantStore, keys: TenantKeyStore
) -> None:
    store.create("acme")
    store.create("other")
    extra = keys.create("acme", "extra")
    other_key = keys.list("other")[0].id
    with pytest.raises(KeyNotFoundError, match="tenant 'acme' has no key"):
        keys.revoke("acme", other_key)  # another tenant's key id
    done = keys.revoke("acme", extra.row.id, actor="ann", reason="leaked")
    assert done.revoked_at is not None and auth(store, extra.api_key) is None
    count = len(audit.read(engine))
    assert keys.revoke("acme", extra.row.id) == done
    assert len(audit.read(engine)) == count
    record = audit.read(engine)[-1]
    assert (record.actor, record.action, record.reason) == ("ann", "tenant.key.revoke", "leaked")


def test_rotation_keeps_the_old_key_for_the_grace(
    engine: sa.Engine, store: TenantStore, keys: TenantKeyStore, clocks: Clocks
) -> None:
    store.create("acme")
    old = keys.create("acme", "web")
    new, ended = keys.rotate("acme", old.row.id, grace=timedelta(hours=1), actor="ann")
    assert new.row.label == "web" and new.row.expires_at is None
    assert ended.expires_at == clocks.now() + timedelta(hours=1) and ended.revoked_at is None
    assert auth(store, old.api_key) is not None and auth(store, new.api_key) is not None
    clocks.advance(3600)
    assert auth(store, old.api_key) is None and auth(store, new.api_key) is not None
    with pytest.raises(KeyStateError, match="expired"):
        keys.rotate("acme", old.row.id)
    # No grace: the old key is revoked at once.
    newer, ended = keys.rotate("acme", new.row.id)
    assert ended.revoked_at == clocks.now() and auth(store, new.api_key) is None
    assert auth(store, newer.api_key) is not None
    with pytest.raises(KeyStateError, match="revoked"):
        keys.rotate("acme", new.row.id)
    with pytest.raises(ValueError, match="grace"):
        keys.rotate("acme", newer.row.id, grace=timedelta(days=31))
    # A grace never lengthens a key's life.
    short = keys.create("acme", "short", expires_at=clocks.now() + timedelta(minutes=1))
    _, ended = keys.rotate("acme", short.row.id, grace=timedelta(hours=1))
    assert ended.expires_at == clocks.now() + timedelta(minutes=1)
    rotations = [r for r in audit.read(engine) if r.action == "tenant.key.rotate"]
    assert rotations[0].after["old"]["key_id"] == old.row.id
    assert rotations[0].after["new"]["key_id"] == new.row.id
    assert rotations[0].reason == "grace 3600s"


def test_the_tenant_rotate_replaces_its_one_key(store: TenantStore, keys: TenantKeyStore) -> None:
    first = store.create("acme")
    second = store.rotate_key("acme")
    assert auth(store, first) is None and auth(store, second) is not None
    assert [k.label for k in keys.list("acme")] == ["default", "default"]
    keys.create("acme", "ci")
    with pytest.raises(TenantError, match=r"has 2 keys.*tenants keys rotate acme KEY_ID"):
        store.rotate_key("acme")
    for k in keys.list("acme"):
        keys.revoke("acme", k.id)
    third = store.rotate_key("acme")  # none left: it gets one
    assert auth(store, third) is not None


# --- suspension ------------------------------------------------------------------------


def test_a_suspended_tenant_authenticates_with_its_reason(
    engine: sa.Engine, store: TenantStore
) -> None:
    key = store.create("acme")
    row = store.suspend("acme", "  invoice 1042 unpaid ", actor="ann")
    assert (row.status, row.suspended_reason) == ("suspended", "invoice 1042 unpaid")
    found = auth(store, key)
    assert found is not None and found.suspended == "invoice 1042 unpaid"
    count = len(audit.read(engine))
    store.suspend("acme", "invoice 1042 unpaid")  # the same again: nothing to record
    assert len(audit.read(engine)) == count
    store.suspend("acme", "abuse report 7")
    assert auth(store, key).suspended == "abuse report 7"  # type: ignore[union-attr]
    for bad in ("", "   ", "two\nlines", "x" * 1001):
        with pytest.raises(ValueError, match="reason"):
            store.suspend("acme", bad)
    row = store.resume("acme", actor="ann")
    assert row.status == "active" and row.suspended_reason is None
    assert auth(store, key) == Tenant("acme", 1.0, frozenset({"*"}))
    store.resume("acme")  # not suspended: nothing to do
    assert actions(engine) == [
        "tenant.create",
        "tenant.suspend",
        "tenant.suspend",
        "tenant.resume",
    ]


# --- deletion --------------------------------------------------------------------------


def test_delete_is_soft_and_the_name_is_kept(
    engine: sa.Engine, store: TenantStore, keys: TenantKeyStore
) -> None:
    first = store.create("acme", weight=2)
    extra = keys.create("acme", "ci")
    store.delete("acme", actor="ann")
    assert auth(store, first) is None and auth(store, extra.api_key) is None
    assert store.list() == []
    (gone,) = store.list(include_deleted=True)
    assert (gone.name, gone.weight, gone.status) == ("acme", 2.0, "deleted")
    assert {k.status() for k in keys.list("acme")} == {"revoked"}  # still on record
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tenants)).scalar() == 1
    with pytest.raises(TenantDeletedError, match=r"was deleted at .*choose another name"):
        store.create("acme")
    for change in (
        lambda: store.delete("acme"),
        lambda: store.update("acme", weight=3),
        lambda: store.suspend("acme", "x"),
        lambda: store.rotate_key("acme"),
        lambda: keys.create("acme"),
    ):
        with pytest.raises(TenantNotFoundError, match="no tenant 'acme': it was deleted"):
            change()

    restored = store.restore("acme", actor="ann")
    assert auth(store, restored) is not None and auth(store, first) is None
    assert [r.name for r in store.list()] == ["acme"]
    with pytest.raises(TenantError, match="not deleted"):
        store.restore("acme")
    assert actions(engine)[-2:] == ["tenant.delete", "tenant.restore"]


# --- config tenants --------------------------------------------------------------------


def test_config_tenants_suspend_but_are_deleted_by_the_config(
    store: TenantStore, keys: TenantKeyStore
) -> None:
    env = {"A": "alpha-secret-key-0001"}
    store.upsert_from_config([cfg("alpha", "A")], env)
    with pytest.raises(TenantError, match="remove it from the config file"):
        store.delete("alpha")
    with pytest.raises(TenantError, match="api_key_env"):
        keys.create("alpha")
    with pytest.raises(TenantError, match="api_key_env"):
        keys.rotate("alpha", keys.list("alpha")[0].id)
    store.suspend("alpha", "maintenance")
    store.upsert_from_config([cfg("alpha", "A")], env)  # a restart keeps the suspension
    assert auth(store, env["A"]).suspended == "maintenance"  # type: ignore[union-attr]
    store.resume("alpha")

    store.upsert_from_config([], {})  # removed from the file: deleted, key revoked
    assert auth(store, env["A"]) is None
    assert [r.status for r in store.list(include_deleted=True)] == ["deleted"]
    store.upsert_from_config([cfg("alpha", "A")], env)  # declared again: back, same key
    assert auth(store, env["A"]) is not None and [r.name for r in store.list()] == ["alpha"]
    store.upsert_from_config([cfg("alpha", "A")], {"A": "alpha-second-key-002"})
    assert auth(store, env["A"]) is None
    assert [k.status() for k in keys.list("alpha")] == ["revoked", "active"]


def test_a_config_tenant_cannot_take_a_deleted_tenants_name(store: TenantStore) -> None:
    store.create("taken")
    store.delete("taken")
    with pytest.raises(TenantDeletedError, match="rename the config tenant"):
        store.upsert_from_config([cfg("taken", "K")], {"K": "some-key-0001-abcdef"})


# --- the router's cache ----------------------------------------------------------------


def directory(store: TenantStore, clocks: Clocks, **options: Any) -> TenantDirectory:
    return TenantDirectory(
        store, ttl_s=2.0, clock=clocks.monotonic, wall_clock=clocks.now, **options
    )


def test_a_cached_key_is_refused_at_its_expiry(
    store: TenantStore, keys: TenantKeyStore, clocks: Clocks
) -> None:
    store.create("acme")
    brief = keys.create("acme", "brief", expires_at=clocks.now() + timedelta(seconds=1.5))
    cache = directory(store, clocks)

    async def main() -> None:
        assert await cache.authenticate(brief.api_key) is not None
        clocks.advance(1.4)  # inside the TTL and the key's life: the cache answers
        assert await cache.authenticate(brief.api_key) is not None
        clocks.advance(0.1)  # the key's expiry, still inside the TTL: refused
        assert await cache.authenticate(brief.api_key) is None

    asyncio.run(main())


def test_revocation_takes_effect_within_the_ttl(
    store: TenantStore, keys: TenantKeyStore, clocks: Clocks
) -> None:
    key = store.create("acme")
    cache = directory(store, clocks)

    async def main() -> None:
        assert await cache.authenticate(key) is not None
        keys.revoke("acme", keys.list("acme")[0].id)
        clocks.advance(2.0)
        assert await cache.authenticate(key) is None

    asyncio.run(main())


def count_key_writes(engine: sa.Engine) -> list[str]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE TENANT_KEYS"):
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    return seen


def test_last_use_is_written_off_the_request_path(
    engine: sa.Engine, store: TenantStore, keys: TenantKeyStore, clocks: Clocks
) -> None:
    key = store.create("acme")
    other = keys.create("acme", "other").api_key
    writes = count_key_writes(engine)
    cache = directory(store, clocks, touch_interval_s=0.2)

    async def main() -> None:
        for _ in range(200):  # many requests, no write on their path
            assert await cache.authenticate(key) is not None
        assert await cache.authenticate(other) is not None
        assert writes == []
        await asyncio.sleep(0.5)  # the periodic write: one statement per key used
        assert len(writes) == 2
        clocks.advance(30)
        await cache.authenticate(key)
        await cache.close()  # what is left is written at shutdown

    asyncio.run(main())
    used = {k.label: k.last_used_at for k in keys.list("acme")}
    assert used == {"default": clocks.now(), "other": clocks.now() - timedelta(seconds=30)}
    assert len(writes) == 3


def test_last_use_is_written_about_once_a_minute_per_key(
    engine: sa.Engine, store: TenantStore, keys: TenantKeyStore, clocks: Clocks
) -> None:
    """Two gateways writing the same key: the later write a moment after is skipped."""
    store.create("acme")
    key_id = keys.list("acme")[0].id
    store.touch_keys({key_id: clocks.now()}, interval_s=30)
    store.touch_keys({key_id: clocks.now() + timedelta(seconds=10)}, interval_s=30)
    assert keys.list("acme")[0].last_used_at == clocks.now()
    store.touch_keys({key_id: clocks.now() + timedelta(seconds=31)}, interval_s=30)
    assert keys.list("acme")[0].last_used_at == clocks.now() + timedelta(seconds=31)


def test_keys_table_holds_only_hashes(engine: sa.Engine, store: TenantStore) -> None:
    key = store.create("acme")
    with engine.connect() as conn:
        rows = conn.execute(sa.select(tenant_keys)).all()
    assert json.dumps([[str(v) for v in r] for r in rows]).count(key) == 0
    assert [r.key_hash.strip() for r in rows] == [hash_key(key)]
