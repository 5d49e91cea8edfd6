"""A user's life on a SQLite file and PostgreSQL: disable, enable, rotate, delete and
expiry, each audited; refused tokens stop working within the token cache's TTL; the
last enabled admin stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from serving.state import audit
from serving.tenancy import (
    LastAdminError,
    Principal,
    UserDirectory,
    UserError,
    UserNotFoundError,
    UserStore,
)
from tests.integration.conftest import OpenEngine


@pytest.fixture
def engine(open_db: OpenEngine) -> sa.Engine:
    return open_db()


def actions(engine: sa.Engine, name: str) -> list[tuple[str, str]]:
    return [(r.actor, r.action) for r in audit.read(engine, target_prefix=f"user:{name}")]


def test_disable_enable_rotate_delete_are_audited_and_take_effect(engine: sa.Engine) -> None:
    users = UserStore(engine)
    users.bootstrap()
    token = users.create("alice", "deployer", actor="admin")
    assert users.authenticate(token) == Principal("alice", "deployer")

    assert users.disable("alice", actor="admin", reason="left the team").status() == "disabled"
    assert users.authenticate(token) is None
    assert users.enable("alice", actor="admin").status() == "active"
    assert users.authenticate(token) == Principal("alice", "deployer")

    new = users.rotate("alice", actor="admin")
    assert new != token
    assert users.authenticate(token) is None
    assert users.authenticate(new) == Principal("alice", "deployer")

    users.delete("alice", actor="admin")
    assert users.authenticate(new) is None
    with pytest.raises(UserNotFoundError):
        users.disable("alice", actor="admin")
    assert actions(engine, "alice") == [
        ("admin", "user.create"),
        ("admin", "user.disable"),
        ("admin", "user.enable"),
        ("admin", "user.rotate"),
        ("admin", "user.delete"),
    ]
    assert audit.read(engine, target_prefix="user:alice")[1].reason == "left the team"
    assert audit.verify(engine).ok


def test_tokens_expire_and_a_rotation_can_renew_them(engine: sa.Engine) -> None:
    now = [datetime.now(UTC)]
    users = UserStore(engine, clock=lambda: now[0])
    token = users.create("bot", "finance", actor="admin", expires_at=now[0] + timedelta(hours=1))
    assert users.authenticate(token) is not None
    now[0] += timedelta(hours=1, seconds=1)
    assert users.authenticate(token) is None
    assert users.get("bot").status(now[0]) == "expired"
    assert users.enable("bot", actor="admin").status(now[0]) == "expired"  # enable is no renewal
    renewed = users.rotate(
        "bot", actor="admin", keep_expiry=False, expires_at=now[0] + timedelta(days=1)
    )
    assert users.authenticate(renewed) == Principal("bot", "finance")
    assert audit.read(engine, target_prefix="user:bot")[0].after["expires_at"] is not None
    with pytest.raises(ValueError, match="not in the future"):
        users.create("late", "finance", actor="admin", expires_at=now[0] - timedelta(seconds=1))
    with pytest.raises(ValueError, match="time zone"):
        users.create("naive", "finance", actor="admin", expires_at=datetime(2099, 1, 1))


def test_the_last_enabled_admin_cannot_be_disabled_or_deleted(engine: sa.Engine) -> None:
    users = UserStore(engine)
    users.bootstrap()
    for attempt in (users.disable, users.delete):
        with pytest.raises(LastAdminError, match="last enabled admin"):
            attempt("admin", actor="admin")
    users.create("root2", "admin", actor="admin")
    users.disable("root2", actor="admin")
    with pytest.raises(LastAdminError):  # a disabled admin does not count
        users.delete("admin", actor="admin")
    users.enable("root2", actor="admin")
    users.disable("admin", actor="root2")
    with pytest.raises(LastAdminError):
        users.delete("root2", actor="root2")
    assert [u.name for u in users.list() if u.status() == "active"] == ["root2"]


def test_a_refused_token_is_refused_by_every_cache_within_its_ttl(open_db: OpenEngine) -> None:
    here, elsewhere = UserStore(open_db()), UserStore(open_db())  # two gateways
    here.bootstrap()
    token = here.create("carol", "auditor", actor="admin")
    clock = [0.0]
    cache = UserDirectory(elsewhere, ttl_s=2.0, clock=lambda: clock[0])
    assert cache.lookup(token) == Principal("carol", "auditor")
    here.disable("carol", actor="admin")
    assert cache.lookup(token) is not None  # cached: the TTL is the bound
    clock[0] += 2.01
    assert cache.lookup(token) is None
    here.enable("carol", actor="admin")
    clock[0] += 0.26  # a refusal is cached for a quarter second
    assert cache.lookup(token) is not None
    here.delete("carol", actor="admin")
    cache.invalidate()  # what the admin API does after a change made through it
    assert cache.lookup(token) is None


def test_a_cache_never_outlives_the_expiry(engine: sa.Engine) -> None:
    users = UserStore(engine)
    token = users.create(
        "eve", "auditor", actor="admin", expires_at=datetime.now(UTC) + timedelta(seconds=30)
    )
    clock = [0.0]
    cache = UserDirectory(users, ttl_s=3600.0, clock=lambda: clock[0])
    assert cache.lookup(token) is not None
    clock[0] += 31  # past the expiry, well inside the TTL
    assert cache._cache  # the entry is there, but expired with the token
    hit = next(iter(cache._cache.values()))
    assert hit.expires <= 30.5


def test_rotating_an_expired_user_needs_a_new_expiry(engine: sa.Engine) -> None:
    now = [datetime.now(UTC)]
    users = UserStore(engine, clock=lambda: now[0])
    old = users.create("bot", "finance", actor="admin", expires_at=now[0] + timedelta(hours=1))
    now[0] += timedelta(hours=2)
    # The kept expiry is past: the new token would be refused from its first use.
    with pytest.raises(UserError, match=r"expired at .*give the new token an expiry or none"):
        users.rotate("bot", actor="admin")
    assert actions(engine, "bot") == [("admin", "user.create")]  # nothing changed
    assert users.get("bot").status(now[0]) == "expired"
    never = users.rotate("bot", actor="admin", keep_expiry=False, expires_at=None)
    assert users.authenticate(never) == Principal("bot", "finance")
    assert users.authenticate(old) is None
    assert users.get("bot").expires_at is None
    # A kept expiry still ahead is fine.
    ahead = now[0] + timedelta(days=1)
    users.rotate("bot", actor="admin", keep_expiry=False, expires_at=ahead)
    kept = users.rotate("bot", actor="admin")
    assert users.authenticate(kept) == Principal("bot", "finance")
    assert users.get("bot").expires_at == ahead


@pytest.mark.parametrize("text", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_an_expiry_out_of_range_in_utc_is_bad_input(engine: sa.Engine, text: str) -> None:
    users = UserStore(engine)
    users.create("bot", "finance", actor="admin")
    when = datetime.fromisoformat(text)
    with pytest.raises(ValueError, match="out of range"):
        users.create("late", "finance", actor="admin", expires_at=when)
    with pytest.raises(ValueError, match="out of range"):
        users.rotate("bot", actor="admin", keep_expiry=False, expires_at=when)
    assert [u.name for u in users.list()] == ["bot"]
