"""Users, roles and the audit hash chain against a SQLite file and PostgreSQL."""

from __future__ import annotations

import stat
import threading
from datetime import timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from serving.state import audit, audit_log
from serving.tenancy.tenants import TenantStore
from serving.tenancy.users import (
    ADMIN_TOKEN_FILE,
    PERMISSIONS,
    Forbidden,
    Principal,
    UserExistsError,
    UserStore,
    check,
    ensure_admin,
)
from tests.integration.conftest import OpenEngine


@pytest.fixture
def engine(open_db: OpenEngine) -> sa.Engine:
    return open_db()


def test_user_tokens_are_shown_once_and_stored_hashed(engine: sa.Engine) -> None:
    users = UserStore(engine)
    token = users.create("alice", "approver", actor="admin")
    assert users.authenticate(token) == Principal("alice", "approver")
    assert users.authenticate(token + "x") is None
    assert users.authenticate("") is None
    with engine.connect() as conn:
        dumped = " ".join(
            str(v) for row in conn.execute(sa.text("SELECT * FROM users")) for v in row
        )
    assert token not in dumped
    with pytest.raises(UserExistsError):
        users.create("alice", "finance", actor="admin")
    with pytest.raises(ValueError, match="role"):
        users.create("bob", "root", actor="admin")
    assert [(u.name, u.role, u.created_by) for u in users.list()] == [
        ("alice", "approver", "admin")
    ]


def test_role_table_decides_every_action() -> None:
    finance, deployer = Principal("f", "finance"), Principal("d", "deployer")
    check(finance, "costs.read")
    with pytest.raises(Forbidden, match=r"may not models\.promote; needs admin, deployer"):
        check(finance, "models.promote")
    check(deployer, "models.promote")
    with pytest.raises(Forbidden):
        check(deployer, "models.approve")
    for action in PERMISSIONS:
        check(Principal("a", "admin"), action)
    with pytest.raises(Forbidden):
        check(deployer, "no.such.action")
    assert all(PERMISSIONS[a] for a in PERMISSIONS)


def test_embedded_admin_token_file(open_db: OpenEngine, tmp_path: Path) -> None:
    state = tmp_path / "state"
    users = UserStore(open_db())
    token = ensure_admin(users, state)
    assert token is not None
    path = state / ADMIN_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert users.authenticate(token) == Principal("admin", "admin")
    assert ensure_admin(UserStore(open_db()), state) == token  # a restart keeps it
    path.unlink()
    # An admin exists: losing the file must not mint a new admin token.
    assert ensure_admin(users, state) is None
    assert [u.name for u in users.list()] == ["admin"]


def test_bootstrap_makes_one_first_admin(open_db: OpenEngine) -> None:
    stores = [UserStore(open_db()) for _ in range(4)]
    made: list[str] = []
    refused: list[str] = []

    def bootstrap(store: UserStore, name: str) -> None:
        try:
            made.append(store.bootstrap(name))
        except UserExistsError as exc:
            refused.append(str(exc))

    threads = [
        threading.Thread(target=bootstrap, args=(s, f"root{i}")) for i, s in enumerate(stores)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(refused) == 3  # whoever came first; the others refused
    assert all("has an admin already" in r for r in refused)
    (admin,) = stores[0].list()
    assert stores[0].authenticate(made[0]) == Principal(admin.name, "admin")
    assert admin.created_by == "system"


def test_chain_verifies_and_names_a_changed_record(engine: sa.Engine) -> None:
    for i in range(5):
        audit.append(engine, "alice", "test.act", f"model:m:{i}", after={"i": i}, reason="r")
    result = audit.verify(engine)
    assert result.ok and result.records == 5
    with engine.begin() as conn:
        conn.execute(audit_log.update().where(audit_log.c.seq == 3).values(reason="edited"))
    result = audit.verify(engine)
    assert not result.ok and result.first_bad_seq == 3
    assert "record 3 was changed" in result.problem


def test_chain_names_a_rehashed_edit_removal_and_insertion(engine: sa.Engine) -> None:
    for i in range(5):
        audit.append(engine, "alice", "test.act", f"t:{i}", after={"i": i})
    rows = audit.read(engine)
    # An editor who also recomputes the edited record's own hash (without the key: the
    # plain rule) is caught at that record.
    r2 = rows[1]
    forged = audit.record_hash(
        2,
        r2.at,
        "mallory",
        r2.action,
        r2.target,
        audit.canonical(r2.before),
        audit.canonical(r2.after),
        r2.reason,
        r2.prev_hash,
    )
    with engine.begin() as conn:
        conn.execute(
            audit_log.update().where(audit_log.c.seq == 2).values(actor="mallory", hash=forged)
        )
    result = audit.verify(engine)
    assert not result.ok and result.first_bad_seq == 2
    assert "record 2 was changed" in result.problem
    with engine.begin() as conn:
        conn.execute(
            audit_log.update().where(audit_log.c.seq == 2).values(actor="alice", hash=r2.hash)
        )
    assert audit.verify(engine).ok

    with engine.begin() as conn:
        conn.execute(audit_log.delete().where(audit_log.c.seq == 4))
    result = audit.verify(engine)
    assert not result.ok and result.first_bad_seq == 4 and "removed" in result.problem

    with engine.begin() as conn:
        conn.execute(
            audit_log.insert().values(
                seq=4,
                at=rows[3].at,
                actor="mallory",
                action="test.act",
                target="t:x",
                before="null",
                after="null",
                reason="",
                prev_hash=rows[2].hash,
                hash="f" * 64,
            )
        )
    result = audit.verify(engine)
    assert not result.ok and result.first_bad_seq == 4


def test_removing_the_newest_records_is_noticed(engine: sa.Engine) -> None:
    for i in range(3):
        audit.append(engine, "alice", "test.act", f"t:{i}")
    with engine.begin() as conn:
        conn.execute(audit_log.delete().where(audit_log.c.seq == 3))
    result = audit.verify(engine)
    assert not result.ok and result.first_bad_seq == 3 and "removed from the end" in result.problem


def test_concurrent_writers_never_fork_the_chain(open_db: OpenEngine) -> None:
    """Writers on their own engines (as separate processes would be) append at once."""
    engines = [open_db() for _ in range(4)]
    errors: list[BaseException] = []

    def writer(i: int, engine: sa.Engine) -> None:
        try:
            for j in range(15):
                audit.append(engine, f"w{i}", "test.act", f"t:{i}:{j}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, e)) for i, e in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = audit.verify(engines[0])
    assert result.ok and result.records == 60
    assert [r.seq for r in audit.read(engines[0])] == list(range(1, 61))


def test_tenant_and_user_changes_are_audited(engine: sa.Engine) -> None:
    tenants = TenantStore(engine)
    tenants.create("acme", 2.0, ["digits"], actor="alice")
    tenants.delete("acme", actor="bob")
    UserStore(engine).create("carol", "auditor", actor="alice")
    records = audit.read(engine)
    assert [(r.actor, r.action, r.target) for r in records] == [
        ("alice", "tenant.create", "tenant:acme"),
        ("bob", "tenant.delete", "tenant:acme"),
        ("alice", "user.create", "user:carol"),
    ]
    assert records[0].after == {
        "name": "acme",
        "weight": 2.0,
        "models": ["digits"],
        "priorities": [2],
        "max_requests_in_flight": None,
        "max_bytes_in_flight": None,
    }
    assert records[1].before["weight"] == 2.0 and records[1].after is None
    assert audit.verify(engine).ok
    since = audit.read(engine, since=records[1].at)
    assert [r.seq for r in since] == [2, 3]
    # The same instant in other zones selects the same records.
    for hours in (2, -5):
        zone = timezone(timedelta(hours=hours))
        assert [r.seq for r in audit.read(engine, since=records[1].at.astimezone(zone))] == [2, 3]


def test_config_tenant_changes_are_audited_as_config(engine: sa.Engine) -> None:
    from serving.config.schema import TenantConfig

    store = TenantStore(engine)
    a = TenantConfig(name="a", weight=1, api_key_env="KA")
    b = TenantConfig(name="b", weight=1, api_key_env="KB")
    keys = {"KA": "key-a-0123456789", "KB": "key-b-0123456789"}
    store.upsert_from_config([a, b], keys)
    store.upsert_from_config([a, b], keys)  # a restart: no records
    a2 = TenantConfig(name="a", weight=3, api_key_env="KA")
    store.upsert_from_config([a2], {"KA": "key-a2-0123456789"})
    records = [(r.actor, r.action, r.target) for r in audit.read(engine)]
    assert records == [
        ("config", "tenant.create", "tenant:a"),
        ("config", "tenant.create", "tenant:b"),
        ("config", "tenant.delete", "tenant:b"),
        ("config", "tenant.update", "tenant:a"),
        ("config", "tenant.rotate_key", "tenant:a"),
    ]
    assert audit.read(engine)[3].after["weight"] == 3.0
    assert audit.verify(engine).ok
