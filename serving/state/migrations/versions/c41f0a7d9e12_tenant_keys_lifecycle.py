"""Tenants get several API keys, suspension and soft deletion.

``tenant_keys``: a tenant's keys, each with a label, a creation time, an optional
expiry, a revocation time and a last-used time. Every existing tenant's key moves
there as its key labelled ``default`` (created at the tenant's creation), so every key
handed out before keeps working; ``tenants.key_hash`` and its index are dropped.

``tenants.suspended_at`` / ``suspended_reason``: a suspended tenant's requests are
refused 403 with the reason. ``tenants.deleted_at``: a deleted tenant's row stays (its
name is not reused). All three NULL for every existing tenant.

Both dialects rebuild ``tenants`` so that its columns read as a fresh database's do
(PostgreSQL keeps a dropped column's position; SQLite writes an added column after the
constraints). The old table is renamed away before ``tenant_keys`` exists: renaming a
table that another table refers to would, on SQLite, carry the reference to the
renamed table along with it.

Revision ID: c41f0a7d9e12
Revises: 9b2d4f60a1c8
Create Date: 2026-12-15
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "c41f0a7d9e12"
down_revision = "9b2d4f60a1c8"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)
_KEPT = [
    "id",
    "name",
    "weight",
    "models",
    "source",
    "created_at",
    "updated_at",
    "priorities",
    "max_requests_in_flight",
    "max_bytes_in_flight",
]


def _tenant_columns(*, with_key_hash: bool) -> list[sa.Column[object]]:
    key: list[sa.Column[object]] = []
    if with_key_hash:
        key.append(sa.Column("key_hash", sa.CHAR(64), nullable=False))
    return [
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        *key,
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("priorities", sa.Text(), nullable=False, server_default="[2]"),
        sa.Column("max_requests_in_flight", sa.Integer(), nullable=True),
        sa.Column("max_bytes_in_flight", sa.BigInteger(), nullable=True),
    ]


def _rebuild_tenants(
    columns: list[sa.Column[object]], copied: list[str], extra: dict[str, str] | None = None
) -> None:
    """``tenants`` made anew with ``columns``, the ``copied`` columns' values and the
    ``extra`` columns' SQL expressions; the old table stays as ``_old_tenants``."""
    postgres = op.get_context().dialect.name == "postgresql"
    op.rename_table("tenants", "_old_tenants")
    if postgres:
        # Index-backed constraint names and the id sequence are per schema there.
        for name in ("pk_tenants", "uq_tenants_name"):
            op.execute(f"ALTER TABLE _old_tenants RENAME CONSTRAINT {name} TO _old_{name}")
        op.execute("ALTER SEQUENCE tenants_id_seq RENAME TO _old_tenants_id_seq")
    op.create_table(
        "tenants",
        *columns,
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.CheckConstraint("source IN ('config', 'cli')", name=op.f("ck_tenants_source")),
        sa.CheckConstraint("weight > 0", name=op.f("ck_tenants_weight_positive")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    extra = extra or {}
    names = ", ".join([*copied, *extra])
    values = ", ".join([*copied, *extra.values()])
    op.execute(f"INSERT INTO tenants ({names}) SELECT {values} FROM _old_tenants")
    if postgres:
        op.execute(
            "SELECT setval('tenants_id_seq', (SELECT COALESCE(MAX(id), 0) + 1 FROM tenants), false)"
        )


def upgrade() -> None:
    op.drop_index(op.f("ix_tenants_key_hash"), table_name="tenants")
    _rebuild_tenants(
        [
            *_tenant_columns(with_key_hash=False),
            sa.Column("suspended_at", _TS, nullable=True),
            sa.Column("suspended_reason", sa.Text(), nullable=True),
            sa.Column("deleted_at", _TS, nullable=True),
        ],
        _KEPT,
    )
    op.create_table(
        "tenant_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("key_hash", sa.CHAR(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=True),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.Column("last_used_at", _TS, nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_tenant_keys_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenant_keys")),
    )
    op.execute(
        "INSERT INTO tenant_keys (tenant_id, label, key_hash, created_at) "
        "SELECT id, 'default', key_hash, created_at FROM _old_tenants ORDER BY id"
    )
    op.drop_table("_old_tenants")
    op.create_index(op.f("ix_tenant_keys_key_hash"), "tenant_keys", ["key_hash"], unique=True)
    op.create_index(op.f("ix_tenant_keys_tenant_id"), "tenant_keys", ["tenant_id"], unique=False)


def downgrade() -> None:
    """Back to one key per tenant: the newest usable key of each tenant. Deleted tenants
    are removed (the previous gpugate deleted rows); a suspended tenant, or one with no
    usable key, gets a hash no key has, so it stays refused. Labels, expiries and
    last-used times are lost."""
    conn = op.get_bind()
    now = datetime.now(UTC)
    keys = sa.table(
        "tenant_keys",
        sa.column("id"),
        sa.column("tenant_id"),
        sa.column("key_hash"),
        sa.column("expires_at", _TS),
        sa.column("revoked_at", _TS),
    )
    tenants = sa.table("tenants", sa.column("id"), sa.column("deleted_at"))
    live: dict[int, str] = {}
    for row in conn.execute(
        sa.select(keys.c.tenant_id, keys.c.key_hash)
        .where(
            keys.c.revoked_at.is_(None),
            sa.or_(keys.c.expires_at.is_(None), keys.c.expires_at > now),
        )
        .order_by(keys.c.id)
    ):
        live[row.tenant_id] = row.key_hash.strip()  # the newest wins
    suspended = set(
        conn.execute(sa.text("SELECT id FROM tenants WHERE suspended_at IS NOT NULL")).scalars()
    )
    op.drop_index(op.f("ix_tenant_keys_tenant_id"), table_name="tenant_keys")
    op.drop_index(op.f("ix_tenant_keys_key_hash"), table_name="tenant_keys")
    op.drop_table("tenant_keys")
    conn.execute(tenants.delete().where(tenants.c.deleted_at.is_not(None)))
    # A placeholder first (the column is NOT NULL and unique), replaced just below.
    placeholder = (
        "md5(random()::text) || md5(random()::text)"
        if conn.dialect.name == "postgresql"
        else "lower(hex(randomblob(32)))"
    )
    _rebuild_tenants(_tenant_columns(with_key_hash=True), _KEPT, {"key_hash": placeholder})
    for tenant_id in conn.execute(sa.text("SELECT id FROM tenants")).scalars():
        key_hash = live.get(tenant_id) if tenant_id not in suspended else None
        if key_hash is None:
            key_hash = hashlib.sha256(secrets.token_bytes(32)).hexdigest()
        conn.execute(
            sa.text("UPDATE tenants SET key_hash = :h WHERE id = :id"),
            {"h": key_hash, "id": tenant_id},
        )
    op.drop_table("_old_tenants")
    op.create_index(op.f("ix_tenants_key_hash"), "tenants", ["key_hash"], unique=True)
