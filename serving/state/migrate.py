"""Schema migrations: Alembic, run from code against the scripts in ``migrations/``.

No ``alembic.ini`` is read: :func:`alembic_config` points Alembic at the scripts
shipped inside this package, and every run goes through one connection that holds
the schema lock (:func:`_schema_lock`), so gateways starting together, or a
``gpugate db upgrade`` during a start, change the schema one at a time.

A database made before migrations existed has the baseline's tables but no
``alembic_version`` table; it is stamped as the baseline revision, which is
exactly that schema, before anything else runs on it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"

# The first versioned schema. It is frozen: later revisions build on it and never
# change it, so its table names identify an unversioned database from before
# migrations.
BASELINE_REVISION = "236a4da9c857"
BASELINE_TABLES = frozenset(
    {
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
)

# pg_advisory_xact_lock's first key; the second is a hash of the schema, so that
# databases in different schemas of one server do not wait for each other.
_PG_LOCK_CLASS = 0x67677363  # "ggsc"


class SchemaError(RuntimeError):
    """The database's schema does not fit this gpugate and was not changed."""

    def __init__(self, message: str, current: str | None, head: str) -> None:
        super().__init__(message)
        self.current = current
        self.head = head


class SchemaBehindError(SchemaError):
    """The schema is older than this gpugate's and must be upgraded explicitly."""


class SchemaAheadError(SchemaError):
    """The schema was migrated by a newer gpugate: this one does not know its revision."""


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's schema stands against the migration scripts.

    ``current`` is the stamped revision, ``None`` when there is no version table;
    ``unversioned`` is true when all of the baseline's tables exist without one (a
    database from before migrations), ``empty`` when none of them exists, and
    ``missing`` names the baseline tables absent from an unversioned database that
    has some of them (neither a fresh nor an old database: refused).
    """

    current: str | None
    head: str
    unversioned: bool
    empty: bool
    known: bool  # the scripts know ``current`` (false: a newer gpugate migrated it)
    missing: frozenset[str] = frozenset()

    @property
    def at_head(self) -> bool:
        return self.current == self.head


@dataclass(frozen=True)
class SchemaChange:
    """What :func:`upgrade_schema` did: the revision before (``None``: no version
    table) and after, and whether an unversioned database was stamped."""

    before: str | None
    after: str
    stamped: bool

    @property
    def changed(self) -> bool:
        return self.stamped or self.before != self.after


def alembic_config(version_locations: Sequence[Path] = ()) -> Config:
    """An Alembic config for the packaged scripts (and any extra ``versions`` dirs)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if version_locations:
        dirs = [MIGRATIONS_DIR / "versions", *version_locations]
        config.set_main_option("path_separator", "os")
        config.set_main_option("version_locations", ":".join(str(d) for d in dirs))
    return config


@cache
def _default_config() -> Config:
    return alembic_config()


def _script(config: Config | None) -> ScriptDirectory:
    return ScriptDirectory.from_config(config or _default_config())


@cache
def _default_head() -> str:
    return _head(_script(None))


def _head(script: ScriptDirectory) -> str:
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("the migration scripts hold no revision")
    return head


def head_revision(config: Config | None = None) -> str:
    """The newest revision of the scripts: the schema this gpugate reads and writes."""
    return _default_head() if config is None else _head(_script(config))


def schema_status(engine: sa.Engine, config: Config | None = None) -> SchemaStatus:
    """Read the database's revision (and tables) without changing anything."""
    with engine.connect() as conn:
        return _status(conn, config)


def _status(conn: sa.Connection, config: Config | None) -> SchemaStatus:
    script = _script(config)
    head = _default_head() if config is None else _head(script)
    tables = set(sa.inspect(conn).get_table_names())
    versioned = VERSION_TABLE in tables
    # Read directly rather than through a MigrationContext, which logs at every start.
    stamped = (
        sorted(conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
        if versioned
        else []
    )
    current = ",".join(stamped) or None
    known = True
    if current is not None:
        try:
            script.get_revision(current)
        except CommandError:  # unknown, or several heads, which gpugate never makes
            known = False
    present = tables & BASELINE_TABLES
    return SchemaStatus(
        current=current,
        head=head,
        unversioned=not versioned and present == BASELINE_TABLES,
        empty=not versioned and not present,
        known=known,
        missing=frozenset(BASELINE_TABLES - present) if not versioned and present else frozenset(),
    )


def upgrade_schema(
    engine: sa.Engine, revision: str = "head", config: Config | None = None
) -> SchemaChange:
    """Bring the database's schema to ``revision`` (default: this gpugate's newest).

    An empty database gets the whole schema; an unversioned one (made before
    migrations) is stamped as the baseline first. A schema newer than the scripts
    know raises :class:`SchemaAheadError` and is left alone. Safe to run from
    several processes at once: they take the schema lock in turn, and whoever comes
    second finds nothing left to do.
    """
    with _schema_lock(engine) as conn:
        status = _status(conn, config)
        _refuse_unknown(status, engine)
        return _upgrade(conn, status, revision, config)


def ensure_schema(engine: sa.Engine, *, upgrade: bool, config: Config | None = None) -> None:
    """Make sure the database holds this gpugate's schema before anything uses it.

    An empty database gets the schema, and an unversioned one is stamped as the
    baseline, either way: neither changes a table that a running gateway uses. An
    older schema is upgraded when ``upgrade`` is true, else refused with
    :class:`SchemaBehindError`, whose message says what to run; a newer one is
    always refused (:class:`SchemaAheadError`).
    """
    status = schema_status(engine, config)
    if status.at_head:
        return  # the common start: no lock, no write
    with _schema_lock(engine) as conn:
        status = _status(conn, config)  # again, under the lock: another process may have won
        _refuse_unknown(status, engine)
        if status.at_head:
            return
        if upgrade or status.empty:
            change = _upgrade(conn, status, "head", config)
            log.info(
                "database schema upgraded from %s to %s",
                change.before or "nothing",
                change.after,
            )
            return
        if status.unversioned and status.head == BASELINE_REVISION:
            _stamp(conn, BASELINE_REVISION, config)  # the schema it has is the newest
            return
        current = BASELINE_REVISION if status.unversioned else status.current
        raise SchemaBehindError(
            f"database schema is at revision {current}, this gpugate needs {status.head}: "
            "run `gpugate db upgrade --database-url ...`",
            current,
            status.head,
        )


def _refuse_unknown(status: SchemaStatus, engine: sa.Engine) -> None:
    if status.missing:
        raise SchemaError(
            f"{engine.url.render_as_string(hide_password=True)} has some of gpugate's tables "
            f"but not {', '.join(sorted(status.missing))}, and no schema revision: it is "
            "neither empty nor a gpugate database; restore it or point at another database",
            None,
            status.head,
        )
    if status.known:
        return
    raise SchemaAheadError(
        f"database schema is at revision {status.current}, which this gpugate does not "
        f"know (its newest is {status.head}): a newer gpugate has upgraded "
        f"{engine.url.render_as_string(hide_password=True)}; run that version or newer",
        status.current,
        status.head,
    )


def _upgrade(
    conn: sa.Connection, status: SchemaStatus, revision: str, config: Config | None
) -> SchemaChange:
    if status.unversioned:
        _stamp(conn, BASELINE_REVISION, config)
    cfg = _bound(conn, config)
    command.upgrade(cfg, revision)
    after = MigrationContext.configure(conn).get_current_revision()
    assert after is not None
    return SchemaChange(status.current, after, stamped=status.unversioned)


def _stamp(conn: sa.Connection, revision: str, config: Config | None) -> None:
    log.info("stamping an unversioned database as revision %s", revision)
    command.stamp(_bound(conn, config), revision)


def _bound(conn: sa.Connection, config: Config | None) -> Config:
    """A copy of ``config`` whose env.py runs on ``conn`` (inside its transaction)."""
    base = config or _default_config()
    bound = Config()
    for key in ("script_location", "version_locations", "path_separator"):
        value = base.get_main_option(key)
        if value is not None:
            bound.set_main_option(key, value)
    bound.attributes["connection"] = conn
    return bound


@contextlib.contextmanager
def _schema_lock(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One transaction holding the schema lock; committed when the block ends.

    PostgreSQL: a transaction-scoped advisory lock per schema (DDL is transactional
    there, so a failed upgrade leaves nothing behind). SQLite: ``BEGIN IMMEDIATE``,
    the database's write lock, with foreign keys off for the transaction as SQLite
    prescribes for schema changes (a table rebuilt by a batch migration is dropped
    and re-created, which with foreign keys on would cascade into the rows that
    refer to it); they are checked before the commit instead.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            yield from _sqlite_lock(conn)
        else:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(
                        sa.select(
                            sa.func.pg_advisory_xact_lock(
                                _PG_LOCK_CLASS, sa.func.hashtext(sa.func.current_schema())
                            )
                        )
                    )
                yield conn


def _sqlite_lock(conn: sa.Connection) -> Iterator[sa.Connection]:
    conn.exec_driver_sql("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield conn
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                raise RuntimeError(f"a migration left rows with broken foreign keys: {broken}")
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
    finally:
        conn.exec_driver_sql("PRAGMA foreign_keys = ON")
        conn.commit()
