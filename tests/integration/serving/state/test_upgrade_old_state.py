"""Databases made by gpugate 045d7eb, the last one without migrations, brought to this
gpugate's schema: every row intact, the audit chain still verifying, the keys and
tokens that were handed out still working. tests/fixtures/make_old_state.py made them
(with that commit's code) and says what they hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from serving.state import (
    SQLITE_FILENAME,
    SchemaBehindError,
    audit,
    head_revision,
    make_engine,
    open_engine,
    upgrade_schema,
)
from serving.tenancy import TenantStore, UserStore, hash_key
from tests.integration.serving.state.schema import all_rows, catalog, metadata_differences
from tests.postgres import Schema

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"
SQLITE_FIXTURE = FIXTURES / "state_045d7eb.db"
PG_FIXTURE = FIXTURES / "state_045d7eb.pg.sql"
MANIFEST: dict[str, Any] = json.loads((FIXTURES / "state_045d7eb.json").read_text())


# Columns that later revisions added, at the end of their tables, and what every row
# from before holds in them.
ADDED = {
    "users": lambda row: (None, None),  # disabled_at, expires_at: every token still works
    # legacy_seq = seq: the old rule up to here; key_id and legacy_mac: set (the boundary
    # sealed) by the first keyed append
    "audit_head": lambda row: (row[1], None, None),
    # priorities, max_requests_in_flight, max_bytes_in_flight: the default level only, and
    # the server's caps; suspended_at, suspended_reason, deleted_at: none suspended or deleted
    "tenants": lambda row: ("[2]", None, None, None, None, None),
}
# tenants.key_hash (the fifth column) moved to tenant_keys.
KEY_HASH_AT = 4


def old_columns(after: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``after``'s rows in the old schema's form: the added columns checked and cut off,
    each tenant's key hash put back from its one key, every newer table checked and
    left out."""
    cut: dict[str, list[Any]] = {}
    for name, rows in after.items():
        if name not in ADDED:
            cut[name] = rows
            continue
        width = len(rows[0]) - len(ADDED[name](rows[0]))
        for row in rows:
            assert row[width:] == ADDED[name](row), (name, row)
        cut[name] = [row[:width] for row in rows]
    # Each tenant's key became its one key, labelled "default", created with the tenant,
    # with no expiry, not revoked, never used.
    keys = cut.pop("tenant_keys")
    by_tenant = {k[1]: k for k in keys}
    assert len(by_tenant) == len(keys) == len(cut["tenants"])
    tenants = []
    for row in cut["tenants"]:
        _, tenant_id, label, key_hash, created_at, *rest = by_tenant[row[0]]
        assert (tenant_id, label, created_at, rest) == (row[0], "default", row[5], [None] * 3)
        tenants.append((*row[:KEY_HASH_AT], key_hash, *row[KEY_HASH_AT:]))
    cut["tenants"] = tenants
    # Tables later revisions made that nothing from before fills.
    for name in set(after) - set(MANIFEST["rows"]) - {"tenant_keys"}:
        assert cut.pop(name) == [], name
    return cut


def check_upgraded(engine: sa.Engine, before: dict[str, list[Any]], made: dict[str, Any]) -> None:
    assert old_columns(all_rows(engine)) == before
    checked = audit.verify(engine)
    assert checked.ok, checked.problem
    assert checked.records == MANIFEST["rows"]["audit_log"]
    assert metadata_differences(engine) == []
    tenants = TenantStore(engine)
    for name, key in made["tenant_keys"].items():
        found = tenants.get_by_key_hash(hash_key(key))
        assert found is not None and found.name == name
    users = UserStore(engine)
    for name, token in made["user_tokens"].items():
        principal = users.authenticate(token)
        assert principal is not None and principal.name == name


def test_the_fixtures_hold_what_the_manifest_says() -> None:
    assert SQLITE_FIXTURE.stat().st_size < 200_000
    assert set(MANIFEST["rows"]) == {
        "approvals",
        "audit_head",
        "audit_log",
        "ledger_allocations",
        "ledger_batches",
        "ledger_reservations",
        "model_versions",
        "rollout_events",
        "rollouts",
        "tenants",
        "users",
    }
    assert all(n > 0 for n in MANIFEST["rows"].values())


def test_sqlite_state_of_045d7eb_upgrades_at_start(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    shutil.copyfile(SQLITE_FIXTURE, state_dir / SQLITE_FILENAME)
    plain = make_engine(None, state_dir)
    tables = set(sa.inspect(plain).get_table_names())
    assert "alembic_version" not in tables
    before = all_rows(plain)
    plain.dispose()
    assert {name: len(rows) for name, rows in before.items()} == MANIFEST["rows"]

    engine = open_engine(None, state_dir)  # what `gpugate serve` does with it
    try:
        check_upgraded(engine, before, MANIFEST["sqlite"])
        with engine.connect() as conn:
            stamped = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
        assert stamped == [(head_revision(),)]
        fresh = make_engine(None, tmp_path / "fresh")
        upgrade_schema(fresh)
        assert catalog(engine) == catalog(fresh)
        fresh.dispose()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_state_of_045d7eb_upgrades(postgres_schema: Schema, tmp_path: Path) -> None:
    load_dump(postgres_schema)
    plain = make_engine(postgres_schema.url, tmp_path)
    before = all_rows(plain)
    assert {name: len(rows) for name, rows in before.items()} == MANIFEST["rows"]
    change = upgrade_schema(plain)  # `gpugate db upgrade`
    assert (change.before, change.after, change.stamped) == (None, head_revision(), True)
    plain.dispose()

    engine = open_engine(postgres_schema.url, tmp_path)  # a gateway's start
    try:
        check_upgraded(engine, before, MANIFEST["postgres"])
        assert upgrade_schema(engine).changed is False
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_state_of_045d7eb_waits_for_db_upgrade(
    postgres_schema: Schema, tmp_path: Path
) -> None:
    """A shared database from before migrations, behind the newest schema: a gateway
    refuses it untouched and names `gpugate db upgrade`, after which it starts."""
    load_dump(postgres_schema)
    plain = make_engine(postgres_schema.url, tmp_path)
    before = all_rows(plain)
    with pytest.raises(SchemaBehindError, match="gpugate db upgrade"):
        open_engine(postgres_schema.url, tmp_path)
    assert all_rows(plain) == before
    upgrade_schema(plain)
    plain.dispose()
    engine = open_engine(postgres_schema.url, tmp_path)
    try:
        check_upgraded(engine, before, MANIFEST["postgres"])
    finally:
        engine.dispose()


def load_dump(schema: Schema) -> None:
    """Load the pg_dump fixture into the test's (empty) schema."""
    sql = PG_FIXTURE.read_text().replace("__SCHEMA__", f'"{schema.name}"')
    loader = sa.create_engine(schema.admin_url, poolclass=sa.NullPool)
    try:
        raw = loader.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute(sql)  # no parameters: the whole script in one simple query
            cursor.close()
            raw.commit()
        finally:
            raw.close()
    finally:
        loader.dispose()
