"""The state store and tenants against real databases: a SQLite file and PostgreSQL
(the `open_db` and `engine` fixtures of tests/integration/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from router.types import Tenant
from serving.config.schema import TenantConfig
from serving.state.db import metadata, open_engine
from serving.tenancy.directory import TenantDirectory
from serving.tenancy.tenants import (
    DEMO_KEY_FILE,
    TenantError,
    TenantExistsError,
    TenantKeyConflictError,
    TenantKeyMissingError,
    TenantLookupError,
    TenantNotFoundError,
    TenantStore,
    ensure_demo_tenant,
    generate_api_key,
    hash_key,
)
from tests.integration.conftest import OpenEngine


class ManualClock:
    """A clock the test advances, so TTL expiry is exact instead of sleep-timed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(engine: sa.Engine) -> TenantStore:
    return TenantStore(engine)


def auth(directory: TenantDirectory, key: str) -> Tenant | None:
    return asyncio.run(directory.authenticate(key))


def count_tenant_queries(engine: sa.Engine) -> list[str]:
    """Record every statement on the tenants table (real events, not a mock)."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "tenants" in statement:
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    return seen


# --- schema and engine -------------------------------------------------------------


def test_schema_is_created_idempotently(open_db: OpenEngine) -> None:
    first = open_db()
    TenantStore(first).create("acme")
    second = open_db()  # a restart: the schema check again must keep the data
    assert [r.name for r in TenantStore(second).list()] == ["acme"]
    assert set(metadata.tables) <= set(sa.inspect(second).get_table_names())


def test_sqlite_pragmas_on_every_connection(tmp_path: Path) -> None:
    engine = open_engine(None, tmp_path / "nested" / "state")
    try:
        assert (tmp_path / "nested" / "state" / "gpugate.db").is_file()
        conns = [engine.connect() for _ in range(3)]  # distinct pooled connections
        expected = {
            "journal_mode": "wal",
            "synchronous": 1,  # NORMAL: commits survive a process crash (FULL on request)
            "busy_timeout": 10_000,
            "foreign_keys": 1,
        }
        for conn in conns:
            for name, value in expected.items():
                assert conn.exec_driver_sql(f"PRAGMA {name}").scalar() == value, name
        for conn in conns:
            conn.close()
    finally:
        engine.dispose()


def test_concurrent_startup_and_creates(open_db: OpenEngine) -> None:
    """Several "processes" open a fresh database at once and each creates tenants."""
    workers, per_worker = 8, 5
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []
    keys: dict[str, str] = {}
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            barrier.wait()
            worker_store = TenantStore(open_db())  # schema-creation race included
            for j in range(per_worker):
                key = worker_store.create(f"t{i}-{j}", weight=1.0 + j)
                with lock:
                    keys[f"t{i}-{j}"] = key
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    check = TenantStore(open_db())
    assert len(check.list()) == workers * per_worker
    for name, key in keys.items():
        found = check.get_by_key_hash(hash_key(key))
        assert found is not None and found.name == name


# --- store ---------------------------------------------------------------------------


def test_create_then_authenticate(store: TenantStore) -> None:
    key = store.create("acme", weight=2.5, models=["resnet", "bert"])
    assert key.startswith("gg_") and len(key) > 40
    directory = TenantDirectory(store)
    assert auth(directory, key) == Tenant("acme", 2.5, frozenset({"resnet", "bert"}))
    assert auth(directory, generate_api_key()) is None
    assert auth(directory, key + "x") is None


def test_duplicate_name_and_validation(store: TenantStore) -> None:
    store.create("acme")
    with pytest.raises(TenantExistsError, match="acme"):
        store.create("acme", weight=3)
    for bad in ("", "-x", "has space", "a/b", "x" * 129):
        with pytest.raises(ValueError, match="name"):
            store.create(bad)
    for weight in (0, -1, float("nan"), float("inf"), 1001):
        with pytest.raises(ValueError, match="weight"):
            store.create("w", weight=weight)
    with pytest.raises(ValueError, match="model"):
        store.create("m", models=[])
    with pytest.raises(ValueError, match="model"):
        store.create("m", models=["ok", "not ok"])
    assert [r.name for r in store.list()] == ["acme"]


def test_key_is_stored_only_as_hash(engine: sa.Engine, store: TenantStore) -> None:
    key = store.create("acme")
    with engine.connect() as conn:
        rows = [
            *conn.execute(sa.select(metadata.tables["tenants"])).all(),
            *conn.execute(sa.select(metadata.tables["tenant_keys"])).all(),
        ]
    cells = [str(v) for row in rows for v in row]
    assert all(key not in c for c in cells)
    assert hash_key(key) in cells
    listed = store.list()
    assert len(listed) == 1
    assert hash_key(key) not in repr(listed) and key not in repr(listed)
    row = listed[0]
    assert (row.name, row.weight, row.models, row.source) == ("acme", 1.0, ("*",), "cli")
    assert row.created_at.tzinfo is not None and row.updated_at >= row.created_at


def test_rotate_and_delete(store: TenantStore) -> None:
    old = store.create("acme")
    new = store.rotate_key("acme")
    assert new != old
    assert store.get_by_key_hash(hash_key(old)) is None
    assert store.get_by_key_hash(hash_key(new)) == Tenant("acme", 1.0, frozenset({"*"}))
    store.delete("acme")
    assert store.get_by_key_hash(hash_key(new)) is None
    with pytest.raises(TenantNotFoundError):
        store.delete("acme")
    with pytest.raises(TenantNotFoundError):
        store.rotate_key("acme")
    assert store.get_by_key_hash("not-a-hash") is None


# --- directory -----------------------------------------------------------------------


def test_cache_hit_and_malformed_keys_do_no_io(engine: sa.Engine, store: TenantStore) -> None:
    key = store.create("acme")
    directory = TenantDirectory(store)
    queries = count_tenant_queries(engine)
    for bad in ("", " ", "x" * 257, "key with spaces", "k\u00e9y", "a\nb"):
        assert auth(directory, bad) is None
    assert queries == []
    assert auth(directory, key) is not None
    assert len(queries) == 1

    async def many() -> list[Tenant | None]:
        return [await directory.authenticate(key) for _ in range(100)]

    assert all(t is not None for t in asyncio.run(many()))
    assert len(queries) == 1


def test_concurrent_misses_share_one_lookup(engine: sa.Engine, store: TenantStore) -> None:
    key = store.create("acme")
    bad = generate_api_key()
    directory = TenantDirectory(store)
    queries = count_tenant_queries(engine)

    async def burst() -> list[Tenant | None]:
        return await asyncio.gather(*(directory.authenticate(k) for k in [key] * 50 + [bad] * 50))

    results = asyncio.run(burst())
    assert all(t is not None and t.name == "acme" for t in results[:50])
    assert all(t is None for t in results[50:])
    assert len(queries) == 2  # one per distinct key


def test_negative_cache_is_brief(engine: sa.Engine, store: TenantStore) -> None:
    clock = ManualClock()
    directory = TenantDirectory(store, ttl_s=2.0, negative_ttl_s=0.25, clock=clock)
    queries = count_tenant_queries(engine)
    bad = generate_api_key()
    for _ in range(20):
        assert auth(directory, bad) is None
    assert len(queries) == 1  # the flood hit the database once
    clock.now += 0.3
    assert auth(directory, bad) is None
    assert len(queries) == 2


def test_tenant_from_another_process_authenticates_without_restart(
    open_db: OpenEngine,
) -> None:
    gateway = TenantDirectory(TenantStore(open_db()), negative_ttl_s=0.05)
    assert auth(gateway, generate_api_key()) is None  # the gateway is up and serving
    cli = TenantStore(open_db())  # the CLI: its own engine, its own connections
    key = cli.create("late", weight=3, models=["bert"])
    assert auth(gateway, key) == Tenant("late", 3.0, frozenset({"bert"}))

    # A key tried just before it existed works once the short negative TTL passes.
    early = "early-secret-key-0001"
    assert auth(gateway, early) is None
    cli.upsert_from_config([cfg("early", "EARLY_KEY")], {"EARLY_KEY": early})
    time.sleep(0.1)
    assert auth(gateway, early) == Tenant("early", 1.0, frozenset({"*"}))


def test_changes_take_effect_after_ttl(engine: sa.Engine, store: TenantStore) -> None:
    clock = ManualClock()
    directory = TenantDirectory(store, ttl_s=2.0, clock=clock)
    key = store.create("acme", weight=1)
    other = store.create("other")
    assert auth(directory, key) == Tenant("acme", 1.0, frozenset({"*"}))
    assert auth(directory, other) is not None

    with engine.begin() as conn:
        tenants = metadata.tables["tenants"]
        conn.execute(
            tenants.update()
            .where(tenants.c.name == "acme")
            .values(weight=4.0, models=json.dumps(["bert"]))
        )
    store.delete("other")
    clock.now += 1.0  # within the TTL the cached view stands
    assert auth(directory, key) == Tenant("acme", 1.0, frozenset({"*"}))
    assert auth(directory, other) is not None
    clock.now += 1.5  # past it: re-validated against the database
    assert auth(directory, key) == Tenant("acme", 4.0, frozenset({"bert"}))
    assert auth(directory, other) is None

    new = store.rotate_key("acme")
    clock.now += 2.5
    assert auth(directory, key) is None
    assert auth(directory, new) == Tenant("acme", 4.0, frozenset({"bert"}))


def test_a_key_in_use_is_refreshed_ahead_without_waiting(
    engine: sa.Engine, store: TenantStore
) -> None:
    """In the TTL's last quarter the cached tenant answers at once and a background
    lookup brings the change in; no request waits for the database while the key is
    used; an idle key past its TTL is looked up before it answers, as before."""
    clock = ManualClock()
    directory = TenantDirectory(store, ttl_s=2.0, clock=clock)
    key = store.create("acme", weight=1)
    queries = count_tenant_queries(engine)

    def lookups() -> int:
        return sum(q.lstrip().upper().startswith("SELECT") for q in queries)

    def set_weight(weight: float) -> None:
        with engine.begin() as conn:
            tenants = metadata.tables["tenants"]
            conn.execute(tenants.update().where(tenants.c.name == "acme").values(weight=weight))

    async def refreshed(n: int) -> None:
        """Until the ``n``-th lookup has ended."""
        deadline = time.monotonic() + 10
        while lookups() < n or directory._inflight:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def main() -> None:
        assert await directory.authenticate(key) == Tenant("acme", 1.0, frozenset({"*"}))
        set_weight(4.0)
        clock.now += 1.0  # inside the TTL, before its last quarter: the cache, no lookup
        assert (await directory.authenticate(key)).weight == 1.0  # type: ignore[union-attr]
        assert lookups() == 1
        clock.now += 0.6  # t = 1.6: answered from the cache, one lookup started
        coro = directory.authenticate(key)
        with pytest.raises(StopIteration) as answered:
            coro.send(None)  # returned on its first step: it did not wait for the lookup
        assert answered.value.value.weight == 1.0
        assert (await directory.authenticate(key)).weight == 1.0  # type: ignore[union-attr]
        await refreshed(2)
        assert lookups() == 2  # the two requests shared one lookup
        assert await directory.authenticate(key) == Tenant("acme", 4.0, frozenset({"*"}))
        # The refreshed entry lives a full TTL from its lookup (t = 1.6 to 3.6).
        clock.now += 1.8  # t = 3.4, inside it: cached, a refresh due again
        set_weight(2.0)
        assert (await directory.authenticate(key)).weight == 4.0  # type: ignore[union-attr]
        await refreshed(3)  # (it brings 2.0 in)
        clock.now += 10  # idle far past the TTL: this request waits for the lookup
        set_weight(3.0)
        assert (await directory.authenticate(key)).weight == 3.0  # type: ignore[union-attr]
        assert lookups() == 4

    asyncio.run(main())


def test_database_outage(engine: sa.Engine, store: TenantStore) -> None:
    """Known tenants keep working through an outage; unknown keys get an error, not a 401."""
    clock = ManualClock()
    directory = TenantDirectory(store, ttl_s=2.0, clock=clock)
    key = store.create("acme")
    assert auth(directory, key) is not None
    with engine.begin() as conn:  # every lookup now fails inside the database
        conn.execute(sa.text("ALTER TABLE tenants RENAME TO tenants_away"))
    clock.now += 5
    assert auth(directory, key) == Tenant("acme", 1.0, frozenset({"*"}))
    with pytest.raises(TenantLookupError):
        auth(directory, generate_api_key())
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE tenants_away RENAME TO tenants"))
    assert auth(directory, generate_api_key()) is None


# --- config tenants ------------------------------------------------------------------


def cfg(name: str, env: str, weight: float = 1.0, models: list[str] | None = None) -> TenantConfig:
    return TenantConfig(name=name, api_key_env=env, weight=weight, models=models or ["*"])


def test_upsert_from_config(store: TenantStore) -> None:
    env = {"A_KEY": "alpha-secret-key-0001", "B_KEY": "beta-secret-key-0002"}
    store.upsert_from_config([cfg("alpha", "A_KEY", 2), cfg("beta", "B_KEY", models=["m1"])], env)
    directory = TenantDirectory(store, ttl_s=0)
    assert auth(directory, env["A_KEY"]) == Tenant("alpha", 2.0, frozenset({"*"}))
    assert auth(directory, env["B_KEY"]) == Tenant("beta", 1.0, frozenset({"m1"}))
    assert {r.source for r in store.list()} == {"config"}

    # Next start: alpha changed (weight, models, key); beta removed from the config.
    env2 = {"A_KEY": "alpha-new-key-0003"}
    store.upsert_from_config([cfg("alpha", "A_KEY", 5, ["m1", "m2"])], env2)
    assert auth(directory, env["A_KEY"]) is None
    assert auth(directory, env2["A_KEY"]) == Tenant("alpha", 5.0, frozenset({"m1", "m2"}))
    assert auth(directory, env["B_KEY"]) is None  # revoked by removing it from config
    assert [r.name for r in store.list()] == ["alpha"]

    # Same config again is a no-op, and CLI tenants are left alone.
    cli_key = store.create("cli-tenant")
    store.upsert_from_config([cfg("alpha", "A_KEY", 5, ["m1", "m2"])], env2)
    assert [r.name for r in store.list()] == ["alpha", "cli-tenant"]
    assert auth(directory, cli_key) is not None

    # An empty tenant list in the config removes every config tenant.
    store.upsert_from_config([], {})
    assert [r.name for r in store.list()] == ["cli-tenant"]


def test_upsert_missing_env_var_changes_nothing(store: TenantStore) -> None:
    env = {"A_KEY": "alpha-secret-key-0001"}
    with pytest.raises(TenantKeyMissingError) as info:
        store.upsert_from_config([cfg("alpha", "A_KEY"), cfg("beta", "BETA_API_KEY")], env)
    assert "beta" in str(info.value) and "BETA_API_KEY" in str(info.value)
    assert (info.value.tenant, info.value.env_var) == ("beta", "BETA_API_KEY")
    assert store.list() == []
    with pytest.raises(TenantKeyMissingError, match="EMPTY"):
        store.upsert_from_config([cfg("alpha", "EMPTY")], {"EMPTY": ""})


def test_upsert_conflicts_are_explained(store: TenantStore) -> None:
    store.create("taken")
    with pytest.raises(TenantExistsError, match="CLI"):
        store.upsert_from_config([cfg("taken", "K")], {"K": "some-key-0001-abcdef"})
    with pytest.raises(TenantKeyConflictError, match="same key"):
        dup = "dup-key-0123456789"
        store.upsert_from_config([cfg("a", "K1"), cfg("b", "K2")], {"K1": dup, "K2": dup})
    cli_key = store.create("holder")
    with pytest.raises(TenantKeyConflictError, match="holder"):
        store.upsert_from_config([cfg("a", "K")], {"K": cli_key})
    with pytest.raises(TenantKeyConflictError, match="printable"):
        store.upsert_from_config([cfg("a", "K")], {"K": "has space in a long key"})
    for short in ("k", "fifteen-chars-k"):  # a person's choice: too short to be safe
        with pytest.raises(TenantKeyConflictError, match="16-256 printable"):
            store.upsert_from_config([cfg("a", "K")], {"K": short})
    assert [r.name for r in store.list()] == ["holder", "taken"]


def test_config_tenant_key_cannot_be_rotated(store: TenantStore) -> None:
    store.upsert_from_config([cfg("alpha", "A")], {"A": "alpha-secret-key-0001"})
    with pytest.raises(TenantError, match="api_key_env"):
        store.rotate_key("alpha")


# --- demo tenant ---------------------------------------------------------------------


def test_demo_tenant_key_is_stable_and_private(store: TenantStore, tmp_path: Path) -> None:
    state_dir = tmp_path / "demo-state"
    old_umask = os.umask(0)  # the file's mode must not depend on a strict umask
    try:
        key = ensure_demo_tenant(store, state_dir)
    finally:
        os.umask(old_umask)
    path = state_dir / DEMO_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == key
    assert ensure_demo_tenant(store, state_dir) == key
    assert auth(TenantDirectory(store), key) == Tenant("demo", 1.0, frozenset({"digits"}))
    assert [r.name for r in store.list()] == ["demo"]


def test_demo_tenant_recovers(store: TenantStore, tmp_path: Path) -> None:
    state_dir = tmp_path / "demo-state"
    first = ensure_demo_tenant(store, state_dir)

    store.delete("demo")  # row gone, file still there
    second = ensure_demo_tenant(store, state_dir)
    assert second != first
    assert store.get_by_key_hash(hash_key(second)) is not None

    store.rotate_key("demo")  # hash no longer matches the file
    third = ensure_demo_tenant(store, state_dir)
    assert store.get_by_key_hash(hash_key(third)) is not None

    (state_dir / DEMO_KEY_FILE).unlink()  # file lost, tenant still there
    fourth = ensure_demo_tenant(store, state_dir)
    assert store.get_by_key_hash(hash_key(fourth)) is not None
    assert (state_dir / DEMO_KEY_FILE).read_text().strip() == fourth
    assert ensure_demo_tenant(store, state_dir) == fourth
    assert [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_demo_tenant_concurrent_starts_agree(open_db: OpenEngine, tmp_path: Path) -> None:
    state_dir = tmp_path / "demo-state"
    stores = [TenantStore(open_db()) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    keys: list[str] = []

    def start(s: TenantStore) -> None:
        barrier.wait()
        keys.append(ensure_demo_tenant(s, state_dir))

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == len(stores) and len(set(keys)) == 1
    assert stores[0].get_by_key_hash(hash_key(keys[0])) is not None
