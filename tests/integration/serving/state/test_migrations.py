"""Schema migrations on real databases: the embedded SQLite file, a SQLite URL and
PostgreSQL (the ``blank`` fixture), with the packaged revisions and, where a newer
gpugate must be played, one more revision written by the test."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from serving.state import (
    SchemaAheadError,
    SchemaBehindError,
    SchemaError,
    head_revision,
    ledger_allocations,
    ledger_batches,
    metadata,
    schema_status,
    upgrade_schema,
    utcnow,
)
from serving.state import migrate as migrate_module
from serving.state.migrate import BASELINE_REVISION, BASELINE_TABLES, alembic_config, ensure_schema
from tests.integration.serving.state.schema import Blank, catalog, metadata_differences
from tests.postgres import fresh_schema

NEXT = "0000test0next"
# The packaged scripts' newest revision: the schema this gpugate writes.
CURRENT = head_revision()
# A revision after the packaged ones, as a later gpugate would ship it. On SQLite it
# rebuilds ledger_batches, the parent of ledger_allocations (ON DELETE CASCADE): with
# foreign keys on, dropping the old table would delete every allocation.
NEXT_SCRIPT = f'''
import sqlalchemy as sa
from alembic import op

revision = "{NEXT}"
down_revision = "{CURRENT}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    rebuild = "always" if op.get_context().dialect.name == "sqlite" else "auto"
    with op.batch_alter_table("ledger_batches", recreate=rebuild) as batch:
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger_batches") as batch:
        batch.drop_column("note")
'''
FAILING_SCRIPT = f'''
import sqlalchemy as sa
from alembic import op

revision = "{NEXT}"
down_revision = "{CURRENT}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("half_done", sa.Column("id", sa.Integer(), primary_key=True))
    op.execute("INSERT INTO tenants (name) VALUES ('violates not null')")


def downgrade() -> None:
    pass
'''


def scripts(tmp_path: Path, text: str) -> Config:
    """The packaged revisions plus one more from ``text``."""
    versions = tmp_path / "later_versions"
    versions.mkdir(exist_ok=True)
    (versions / f"{NEXT}_later.py").write_text(text)
    return alembic_config(version_locations=[versions])


@pytest.fixture
def later(tmp_path: Path) -> Config:
    return scripts(tmp_path, NEXT_SCRIPT)


@pytest.fixture
def newer_code(later: Config, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make this process a gpugate whose scripts end at NEXT (serve's own code path)."""
    monkeypatch.setattr(migrate_module, "_default_config", lambda: later)
    monkeypatch.setattr(migrate_module, "_default_head", lambda: NEXT)
    yield


def revision(engine: sa.Engine) -> str | None:
    return schema_status(engine).current


def fill_ledger(engine: sa.Engine) -> None:
    now = utcnow()
    with engine.begin() as conn:
        batch_id = conn.execute(
            ledger_batches.insert()
            .values(
                gateway="g",
                model="m",
                version="1",
                device="cpu",
                device_share=1.0,
                device_ns=10,
                charge_ns=10,
                rows=2,
                requests=2,
                started_at=now,
                finished_at=now,
                currency="USD",
                price_nanos_per_hour=1,
            )
            .returning(ledger_batches.c.id)
        ).scalar_one()
        conn.execute(
            ledger_allocations.insert(),
            [
                {"batch_id": batch_id, "tenant": t, "requests": 1, "rows": 1, "charge_ns": 5}
                for t in ("a", "b")
            ],
        )


# --- the schema the revisions make ---------------------------------------------------


def test_migrations_make_exactly_the_metadata(blank: Blank) -> None:
    engine = blank.engine()
    change = upgrade_schema(engine)
    assert (change.before, change.after, change.stamped) == (None, head_revision(), False)
    assert metadata_differences(engine) == []
    # Autogenerate ignores CHECK constraints and server-side details; the catalog does not.
    if blank.admin_url is None:
        reference = sa.create_engine(f"sqlite+pysqlite:///{blank.state_dir / 'reference.db'}")
        metadata.create_all(reference)
        assert catalog(engine) == catalog(reference)
        reference.dispose()
        return
    with fresh_schema(blank.admin_url) as schema:
        reference = sa.create_engine(schema.url)
        metadata.create_all(reference)
        assert catalog(engine) == catalog(reference)
        reference.dispose()


def test_the_developers_check_finds_nothing_to_generate(tmp_path: Path) -> None:
    """``python -m serving.state.migrations check``: the metadata has no change that
    lacks a revision (run against a scratch SQLite database at head)."""
    run = subprocess.run(
        [sys.executable, "-m", "serving.state.migrations", "check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "No new upgrade operations detected" in run.stdout


# --- what a start does with each kind of database ------------------------------------


def test_an_empty_database_gets_the_schema_at_start(blank: Blank) -> None:
    engine = blank.open()
    status = schema_status(engine)
    assert status.at_head and not status.unversioned
    assert set(sa.inspect(engine).get_table_names()) >= BASELINE_TABLES
    blank.open()  # the next start finds it at head and changes nothing
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar_one() == 1


def test_an_unversioned_database_is_stamped_as_the_baseline(blank: Blank) -> None:
    """A database from before migrations: its tables, no version table."""
    legacy = blank.engine()
    make_unversioned(legacy)
    assert schema_status(legacy).unversioned
    if blank.url is not None:
        # A shared database is refused: the revisions after the baseline wait for
        # `gpugate db upgrade`.
        with pytest.raises(SchemaBehindError, match=f"at revision {BASELINE_REVISION}, "):
            blank.open()
        assert schema_status(legacy).unversioned  # refused means untouched
        upgrade_schema(blank.engine())
    engine = blank.open()  # embedded: stamped and upgraded at once
    assert revision(engine) == CURRENT
    fresh = blank.engine()
    if blank.admin_url is None:
        reference = sa.create_engine(f"sqlite+pysqlite:///{blank.state_dir / 'reference.db'}")
        metadata.create_all(reference)
        assert catalog(engine) == catalog(reference)
        reference.dispose()
    assert metadata_differences(fresh) == []


def make_unversioned(engine: sa.Engine) -> None:
    """A database from before migrations: the baseline's tables, no version table."""
    upgrade_schema(engine, BASELINE_REVISION)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE alembic_version")


def test_an_older_schema_is_upgraded_only_when_embedded(
    blank: Blank, later: Config, newer_code: None
) -> None:
    old = blank.engine()
    upgrade_schema(old, CURRENT)
    fill_ledger(old)
    if blank.url is None:
        engine = blank.open()
        assert revision(engine) == NEXT
        assert "note" in {c["name"] for c in sa.inspect(engine).get_columns("ledger_batches")}
        return
    with pytest.raises(SchemaBehindError) as refused:
        blank.open()
    assert str(refused.value) == (
        f"database schema is at revision {CURRENT}, this gpugate needs {NEXT}: "
        "run `gpugate db upgrade --database-url ...`"
    )
    assert (refused.value.current, refused.value.head) == (CURRENT, NEXT)
    assert revision(old) == CURRENT  # refused means untouched
    change = upgrade_schema(blank.engine())  # what `gpugate db upgrade` does
    assert (change.before, change.after) == (CURRENT, NEXT)
    assert revision(blank.open()) == NEXT


def test_an_unversioned_database_behind_head_is_refused_untouched(
    blank: Blank, newer_code: None
) -> None:
    make_unversioned(blank.engine())
    if blank.url is None:
        assert revision(blank.open()) == NEXT
        return
    with pytest.raises(SchemaBehindError, match=f"at revision {BASELINE_REVISION}, "):
        blank.open()
    assert schema_status(blank.engine()).unversioned  # refused means untouched


def test_a_database_with_some_of_the_tables_is_refused_untouched(blank: Blank) -> None:
    """Neither fresh nor from before migrations: stamping it would hide the tables it lacks."""
    partial = blank.engine()
    metadata.create_all(partial, tables=[metadata.tables["tenants"], metadata.tables["users"]])
    before = catalog(partial)
    for attempt in (blank.open, lambda: upgrade_schema(blank.engine())):
        with pytest.raises(SchemaError, match="has some of gpugate's tables but not ") as refused:
            attempt()
        assert "ledger_batches" in str(refused.value)
    assert catalog(blank.engine()) == before
    assert not schema_status(blank.engine()).unversioned


def test_the_baseline_cannot_be_downgraded(blank: Blank) -> None:
    engine = blank.engine()
    upgrade_schema(engine, BASELINE_REVISION)
    with pytest.raises(RuntimeError, match="baseline cannot be downgraded"):
        downgrade_to_base(engine)
    assert revision(engine) == BASELINE_REVISION
    assert set(sa.inspect(engine).get_table_names()) >= BASELINE_TABLES


def downgrade_to_base(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")


def test_a_newer_schema_is_refused_everywhere(blank: Blank, later: Config) -> None:
    engine = blank.engine()
    upgrade_schema(engine, config=later)  # a newer gpugate was here
    for attempt in (blank.open, lambda: upgrade_schema(blank.engine())):
        with pytest.raises(SchemaAheadError) as refused:
            attempt()
        assert f"database schema is at revision {NEXT}, which this gpugate does not know" in (
            str(refused.value)
        )
    assert revision(engine) == NEXT


def test_a_rebuilt_table_keeps_the_rows_that_refer_to_it(blank: Blank, later: Config) -> None:
    """The SQLite rebuild of a parent table must not cascade into its children."""
    engine = blank.engine()
    upgrade_schema(engine, CURRENT)
    fill_ledger(engine)
    upgrade_schema(engine, config=later)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger_allocations)).scalar()
        if conn.dialect.name == "sqlite":
            # The lock turned foreign keys off for the migration only.
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger_allocations)).scalar()


def test_a_failed_migration_leaves_nothing_behind(blank: Blank, tmp_path: Path) -> None:
    engine = blank.engine()
    upgrade_schema(engine)
    failing = scripts(tmp_path, FAILING_SCRIPT)
    with pytest.raises(sa.exc.IntegrityError):
        upgrade_schema(engine, config=failing)
    assert revision(engine) == head_revision()
    assert "half_done" not in sa.inspect(engine).get_table_names()


# --- concurrency ---------------------------------------------------------------------


def test_concurrent_upgrades_of_an_empty_database(blank: Blank) -> None:
    """Gateways starting together on a fresh database, and an operator's upgrade."""
    workers = 6
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            barrier.wait()
            if i % 2:
                blank.open()
            else:
                upgrade_schema(blank.engine())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = blank.engine()
    assert revision(engine) == head_revision()
    assert metadata_differences(engine) == []


def test_an_upgrade_waits_for_the_schema_lock(blank: Blank) -> None:
    holder = blank.engine()
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with migrate_module._schema_lock(holder):
            held.set()
            release.wait(10)

    locker = threading.Thread(target=hold)
    locker.start()
    assert held.wait(10)
    done = threading.Event()

    def upgrade() -> None:
        upgrade_schema(blank.engine())
        done.set()

    waiter = threading.Thread(target=upgrade)
    waiter.start()
    try:
        time.sleep(0.5)
        assert not done.is_set()
    finally:
        release.set()
        locker.join()
    waiter.join(10)
    assert done.is_set()
    assert revision(holder) == head_revision()


def test_ensure_schema_holds_no_lock_when_at_head(blank: Blank) -> None:
    """The common start (schema at head) must not wait behind a long upgrade elsewhere."""
    engine = blank.engine()
    upgrade_schema(engine)
    with migrate_module._schema_lock(blank.engine()):
        started = time.monotonic()
        ensure_schema(blank.engine(), upgrade=False)
        assert time.monotonic() - started < 2
