"""The gateway's state database: engine setup and the schema.

Every table lives on the one ``metadata`` below, in SQLAlchemy Core, so this module
is the single place to read the schema. The default store is a SQLite file in the
state dir; a cluster points ``database_url`` at PostgreSQL instead. A change to the
schema here comes with an Alembic revision (``serving/state/migrations``), which
:mod:`serving.state.migrate` applies. The code that reads and writes the tables
lives beside the feature that owns them (``serving.tenancy.tenants`` for tenants,
``serving.costs.ledger`` for the cost ledger).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from serving.state.audit_key import Chain, bind, private_dir
from serving.state.migrate import ensure_schema

SQLITE_FILENAME = "gpugate.db"
# Long enough to ride out another process's write burst (schema creation, a batch of
# ledger rows); short enough that a wedged writer surfaces as an error, not a hang.
SQLITE_BUSY_TIMEOUT_MS = 10_000
# Trades durability on power loss for commit latency on SQLite (docs/state.md).
SQLITE_SYNCHRONOUS_ENV = "GPUGATE_SQLITE_SYNCHRONOUS"

# Explicit constraint names make later migrations (ALTER ... DROP CONSTRAINT) name
# the same object on SQLite and PostgreSQL instead of a dialect-generated name.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def utcnow() -> datetime:
    """Timestamps are always UTC and timezone-aware when written."""
    return datetime.now(UTC)


tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("weight", sa.Float, nullable=False),
    # JSON list of model names; "*" allows every model. Text rather than a JSON
    # column type so the value reads back identically on SQLite and PostgreSQL.
    sa.Column("models", sa.Text, nullable=False),
    # "config" rows are reconciled from the config file at every start; "cli" rows
    # are only changed by an explicit command.
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, default=utcnow, onupdate=utcnow
    ),
    # JSON list of the priority levels granted to the tenant (the default level, 2,
    # is always usable); text for the same reason as models.
    sa.Column("priorities", sa.Text, nullable=False, server_default="[2]"),
    # The tenant's caps on requests and input bytes in flight; NULL: the server's default.
    sa.Column("max_requests_in_flight", sa.Integer, nullable=True),
    sa.Column("max_bytes_in_flight", sa.BigInteger, nullable=True),
    # Set: every request of the tenant is refused 403 with the reason; its keys still
    # authenticate, so the answer can say why (``tenants suspend`` / ``resume``).
    sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("suspended_reason", sa.Text, nullable=True),
    # Set: the tenant is deleted. The row stays, so the ledger's usage keeps its tenant
    # and the name is not given to another tenant; every key is revoked.
    sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("source IN ('config', 'cli')", name="source"),
    sa.CheckConstraint("weight > 0", name="weight_positive"),
)

# A tenant's API keys (serving.tenancy.keys): several per tenant, each with a label. A key
# is refused once revoked_at is set or expires_at has passed; rows stay for the record.
tenant_keys = sa.Table(
    "tenant_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "tenant_id",
        sa.Integer,
        sa.ForeignKey("tenants.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("label", sa.String(64), nullable=False),
    # sha256 hex of the API key. The key itself is never stored; the unique index
    # is what authentication looks rows up by.
    sa.Column("key_hash", sa.CHAR(64), nullable=False, index=True, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    # Written by the gateways at most about once a minute per key, never per request.
    sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
)


# BIGINT on PostgreSQL; SQLite's INTEGER PRIMARY KEY must stay INTEGER to autoincrement.
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The cost ledger (serving.costs.ledger). One row per batch, one per (batch, tenant): money
# is never a float here; device time is integer ns and prices integer nano-units
# per hour, so any report can be recomputed exactly.
ledger_batches = sa.Table(
    "ledger_batches",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("gateway", sa.String(128), nullable=False),  # host:pid that recorded it
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("device", sa.String(128), nullable=False),
    sa.Column("device_share", sa.Float, nullable=False),
    sa.Column("device_ns", sa.BigInteger, nullable=False),  # measured forward time
    sa.Column("charge_ns", sa.BigInteger, nullable=False),  # device_ns x device_share
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("currency", sa.String(8), nullable=False),
    sa.Column("price_nanos_per_hour", sa.BigInteger, nullable=False),
)

ledger_allocations = sa.Table(
    "ledger_allocations",
    metadata,
    sa.Column(
        "batch_id",
        _BigId,
        sa.ForeignKey("ledger_batches.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # A tenant name, or "shadow" for mirrored canary traffic nobody is billed for.
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("charge_ns", sa.BigInteger, nullable=False),
)

# What each model replica holds while it is up (for idle capacity): reserved time is
# (last_seen_at or ended_at) - started_at, times device_share.
ledger_reservations = sa.Table(
    "ledger_reservations",
    metadata,
    sa.Column("replica", sa.String(128), primary_key=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("device", sa.String(128), nullable=False),
    sa.Column("device_share", sa.Float, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
)

# Identities of the people and tools that run the admin CLI and API (serving.tenancy.users).
users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    # sha256 hex of the token, like tenant keys: the token itself is never stored.
    sa.Column("token_hash", sa.CHAR(64), nullable=False, index=True, unique=True),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    # Set: the user's token is refused (``users disable``); cleared by ``users enable``.
    sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
    # Set: the token is refused from then on (``users create --expires-in``).
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint(
        "role IN ('admin', 'deployer', 'approver', 'finance', 'auditor')", name="role"
    ),
)

# The audit chain (serving.state.audit). `seq` is assigned under the lock on the
# single audit_head row, never by the database, so gaps mean removed records. `hash`
# is the record's HMAC-SHA256 (its plain sha256 up to audit_head.legacy_seq).
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(300), nullable=False, index=True),
    # Canonical JSON text (serving.state.audit.canonical), hashed exactly as stored.
    sa.Column("before", sa.Text, nullable=False),
    sa.Column("after", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.CHAR(64), nullable=False),
    sa.Column("hash", sa.CHAR(64), nullable=False),
)

audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.CHAR(64), nullable=False),
    # Records up to here were chained by the plain sha256 rule (written before the MAC).
    sa.Column("legacy_seq", sa.BigInteger, nullable=False, server_default="0"),
    # Which key the MAC records are made with (serving.state.audit.AuditKey.key_id).
    sa.Column("key_id", sa.String(32), nullable=True),
    # HMAC of legacy_seq under that key (AuditKey.boundary_mac), set with key_id: a
    # writer without the key cannot move the old-rule boundary.
    sa.Column("legacy_mac", sa.String(64), nullable=True),
    sa.CheckConstraint("id = 1", name="single_row"),
)

# Registered model versions (serving.registry.store). Everything but the stage columns
# is immutable: a changed artifact is a new version.
model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    # sha256 hex of the artifact; also its file name in the content-addressed store.
    sa.Column("digest", sa.CHAR(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("model_class", sa.String(300), nullable=True),
    # JSON texts, as for tenants: identical on SQLite and PostgreSQL.
    sa.Column("model_kwargs", sa.Text, nullable=False),
    sa.Column("signature", sa.Text, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("parent_version", sa.String(128), nullable=True),
    sa.Column("source_uri", sa.Text, nullable=True),
    sa.Column("dataset_digest", sa.String(200), nullable=True),
    sa.Column("code_revision", sa.String(200), nullable=True),
    sa.Column("author", sa.String(128), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("stage_changed_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    # When it last became production; rollback returns to the latest earlier one.
    sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
    sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
    sa.CheckConstraint(
        "stage IN ('registered', 'approved', 'rejected', 'staging', 'production', 'archived')",
        name="stage",
    ),
)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("approver", sa.String(128), nullable=False),
    sa.Column("decision", sa.String(8), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.UniqueConstraint("name", "version", "approver", name="uq_approvals_name_version_approver"),
    sa.CheckConstraint("decision IN ('approve', 'reject')", name="decision"),
)


# Canary rollouts (serving.rollout.rollouts). One row per rollout; `active_model` is the model
# name while the rollout runs or is paused and NULL once it ends, so the unique index
# allows one live rollout per model on SQLite and PostgreSQL alike. `revision` counts
# changes: a writer updates only the revision it read (optimistic concurrency between
# the gateway's controller and operators' commands).
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(128), nullable=False, index=True),
    sa.Column("candidate", sa.String(128), nullable=False),
    sa.Column("baseline", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    # JSON texts: the step weights and the analysis settings, the last analysis.
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("last_analysis", sa.Text, nullable=True),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("active_model", sa.String(128), nullable=True, unique=True),
    sa.CheckConstraint(
        "state IN ('running', 'paused', 'succeeded', 'failed', 'aborted')", name="state"
    ),
)

# Every decision on a rollout, operator's or controller's, with the figures behind it
# (the same record also goes to the audit chain).
rollout_events = sa.Table(
    "rollout_events",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column(
        "rollout_id", sa.Integer, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    ),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("weight", sa.Float, nullable=False),  # candidate's share after the event
    sa.Column("figures", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

# A tenant's rate quotas (serving.tenancy.quotas): one row over every model (model ''),
# and one per model that has its own. NULL: no quota of that kind. Token buckets: the
# rate per second and the burst (NULL: one second's worth).
tenant_quotas = sa.Table(
    "tenant_quotas",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("requests_per_s", sa.Float, nullable=True),
    sa.Column("requests_burst", sa.Float, nullable=True),
    sa.Column("rows_per_s", sa.Float, nullable=True),
    sa.Column("rows_burst", sa.Float, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.UniqueConstraint("tenant_id", "model"),
    sa.CheckConstraint(
        "(requests_per_s IS NULL OR requests_per_s > 0)"
        " AND (requests_burst IS NULL OR requests_burst >= 1)"
        " AND (rows_per_s IS NULL OR rows_per_s > 0)"
        " AND (rows_burst IS NULL OR rows_burst >= 1)",
        name="positive",
    ),
)

# A tenant's budget (serving.budgets): an amount of currency (in nano-units) or of device
# time (in ns) per calendar month or over a fixed period, the alert thresholds (JSON list of
# percentages), and what happens at 100%. The webhook secret signs alert deliveries.
tenant_budgets = sa.Table(
    "tenant_budgets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("unit", sa.String(16), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("period_start", sa.DateTime(timezone=True), nullable=True),  # NULL: monthly
    sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
    sa.Column("thresholds", sa.Text, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("webhook_url", sa.Text, nullable=True),
    sa.Column("webhook_secret", sa.Text, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.UniqueConstraint("tenant_id"),
    sa.CheckConstraint(
        "unit IN ('currency', 'device_hours') AND amount > 0"
        " AND action IN ('notify', 'reject', 'best-effort')",
        name="valid",
    ),
)

# Each threshold crossed, once per tenant, period and threshold (the unique constraint is
# what makes it once, whichever process sees it first).
budget_alerts = sa.Table(
    "budget_alerts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
    sa.Column("threshold", sa.Integer, nullable=False),
    sa.Column("spend", sa.BigInteger, nullable=False),  # in the budget's unit, as amount
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("crossed_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.UniqueConstraint("tenant_id", "period_start", "threshold"),
)

# Every attempt to deliver an alert to the tenant's webhook.
budget_deliveries = sa.Table(
    "budget_deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "alert_id",
        sa.Integer,
        sa.ForeignKey("budget_alerts.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("http_status", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
)


# Signed-in web console sessions (serving.tenancy.sessions). The session secret is in the
# browser's cookie only; the row keys it by its sha256. ``token_hash`` is the user's token
# hash at sign-in: rotating the token (or deleting the user) ends the user's sessions.
console_sessions = sa.Table(
    "console_sessions",
    metadata,
    sa.Column("id_hash", sa.CHAR(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("token_hash", sa.CHAR(64), nullable=False),
    # Forms carry it back (a per-session CSRF token); not a credential on its own.
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, default=utcnow),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
)


def make_engine(database_url: str | None, state_dir: Path) -> sa.Engine:
    """An engine on the state database, with no schema check (for :func:`upgrade_schema`).

    ``database_url`` ``None`` means the SQLite file ``state_dir/gpugate.db`` (the
    folder is created mode 0700, or made 0700 if it is ours and open to others). A
    SQLite file is made mode 0600 before SQLite opens it (its ``-wal`` and ``-shm``
    files take the same mode). The audit chain's key and anchor file default to
    ``state_dir`` (:func:`serving.state.audit.configure`).
    """
    if database_url is None:
        private_dir(state_dir)
        url = sa.URL.create("sqlite+pysqlite", database=str(state_dir / SQLITE_FILENAME))
        engine = sa.create_engine(url)
    else:
        # pre_ping: a gateway outlives database restarts and failovers; a stale
        # pooled connection must not fail the first request after one.
        engine = sa.create_engine(database_url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        _private_sqlite_file(engine.url.database)
        event.listen(engine, "connect", _sqlite_pragmas)
    bind(engine, Chain(state_dir))
    return engine


def _private_sqlite_file(database: str | None) -> None:
    """Create the database file 0600, or take group and other access off an existing
    one (SQLite would create it with the umask's mode, typically 0644)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for existing in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            with contextlib.suppress(OSError):  # not ours, or gone: leave it
                if existing.stat().st_mode & 0o077:
                    existing.chmod(0o600)
        return
    os.close(fd)


def open_engine(database_url: str | None, state_dir: Path) -> sa.Engine:
    """Connect to the state database and make sure it holds this gpugate's schema.

    The embedded default (``database_url`` ``None``: SQLite in ``state_dir``) is
    created or upgraded here. A database named by URL may be shared by several
    gateways, so an older schema there is refused (:class:`SchemaBehindError`, which
    says to run ``gpugate db upgrade``) rather than changed under the others; an
    empty one gets the schema. A schema newer than this gpugate's is always refused
    (:class:`SchemaAheadError`). Safe to call from several processes starting at once.
    """
    engine = make_engine(database_url, state_dir)
    try:
        ensure_schema(engine, upgrade=database_url is None)
    except BaseException:
        engine.dispose()
        raise
    return engine


def sqlite_synchronous() -> str:
    """``NORMAL`` (the default) or ``FULL``, from ``$GPUGATE_SQLITE_SYNCHRONOUS``."""
    value = os.environ.get(SQLITE_SYNCHRONOUS_ENV, "normal").strip().upper()
    if value not in ("FULL", "NORMAL"):
        raise ValueError(f"{SQLITE_SYNCHRONOUS_ENV} must be full or normal, not {value!r}")
    return value


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL needs a brief exclusive lock that
        # another process opening the same file may hold.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        # WAL lets the gateway's readers run while the CLI or another worker writes.
        # NORMAL survives process crashes; FULL fsyncs the WAL at every commit, so a
        # committed row also survives a power cut, at a price on the request path that
        # docs/state.md measures (the reason it is not the default).
        _set_wal(cursor)
        cursor.execute(f"PRAGMA synchronous = {sqlite_synchronous()}")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _set_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode = WAL``, tried again while SQLite answers SQLITE_BUSY, for
    as long as the busy timeout.

    The busy timeout does not cover this statement. On a file not yet in WAL mode (a new
    one), the switch reads the header under a shared lock, then asks for the write lock
    to rewrite it; if another connection is making the same switch at that moment,
    SQLite refuses at once rather than wait (waiting while holding the shared lock could
    deadlock with the other writer), and the statement fails with "database is locked".
    Processes or threads opening a new database together meet this. The failed statement
    holds no lock, so trying again is safe; on a file already in WAL mode the statement
    changes nothing and takes no write lock.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    pause = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
