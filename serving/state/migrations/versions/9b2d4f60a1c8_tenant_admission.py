"""Tenants get priority grants and in-flight caps.

``tenants.priorities``: JSON list of the priority levels the tenant may ask for;
every existing tenant gets ``[2]``, the default level only, so a level above it is a
grant an operator gives. ``tenants.max_requests_in_flight`` and
``tenants.max_bytes_in_flight``: the tenant's own caps, NULL (the server's default)
for every existing tenant.

Revision ID: 9b2d4f60a1c8
Revises: 7a3c5e91d2b4
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "9b2d4f60a1c8"
down_revision = "7a3c5e91d2b4"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column("priorities", sa.Text(), nullable=False, server_default="[2]"),
        sa.Column("max_requests_in_flight", sa.Integer(), nullable=True),
        sa.Column("max_bytes_in_flight", sa.BigInteger(), nullable=True),
    ]


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        _rebuild_on_sqlite()
    else:
        for column in _columns():
            op.add_column("tenants", column)


def _rebuild_on_sqlite() -> None:
    """The table made anew, as a fresh database makes it, and its rows copied.

    SQLite's ADD COLUMN writes the column after the table's constraints, and Alembic's
    batch rebuild reorders the constraints: either way the schema would read differently
    from a fresh database's.
    """
    old = ["id", "name", "weight", "models", "key_hash", "source", "created_at", "updated_at"]
    op.rename_table("tenants", "_old_tenants")
    op.drop_index(op.f("ix_tenants_key_hash"), table_name="_old_tenants")
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.CHAR(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        *_columns(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.CheckConstraint("source IN ('config', 'cli')", name=op.f("ck_tenants_source")),
        sa.CheckConstraint("weight > 0", name=op.f("ck_tenants_weight_positive")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    names = ", ".join(old)
    op.execute(f"INSERT INTO tenants ({names}) SELECT {names} FROM _old_tenants")
    op.drop_table("_old_tenants")
    op.create_index(op.f("ix_tenants_key_hash"), "tenants", ["key_hash"], unique=True)


def downgrade() -> None:
    # Grants and caps are lost: every tenant is back at the default level and the
    # server's caps, which the previous gpugate does not have.
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("max_bytes_in_flight")
        batch.drop_column("max_requests_in_flight")
        batch.drop_column("priorities")
