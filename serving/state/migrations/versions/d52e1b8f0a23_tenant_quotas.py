"""Tenants get rate quotas.

``tenant_quotas``: a tenant's token buckets of requests and rows per second, with their
bursts, over every model (``model`` '') and per model. No existing tenant has one, so
nothing is limited until an operator sets a quota.

Revision ID: d52e1b8f0a23
Revises: c41f0a7d9e12
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "d52e1b8f0a23"
down_revision = "c41f0a7d9e12"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_quotas",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("requests_per_s", sa.Float(), nullable=True),
        sa.Column("requests_burst", sa.Float(), nullable=True),
        sa.Column("rows_per_s", sa.Float(), nullable=True),
        sa.Column("rows_burst", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenant_quotas")),
        sa.UniqueConstraint("tenant_id", "model", name=op.f("uq_tenant_quotas_tenant_id")),
        sa.CheckConstraint(
            "(requests_per_s IS NULL OR requests_per_s > 0)"
            " AND (requests_burst IS NULL OR requests_burst >= 1)"
            " AND (rows_per_s IS NULL OR rows_per_s > 0)"
            " AND (rows_burst IS NULL OR rows_burst >= 1)",
            name=op.f("ck_tenant_quotas_positive"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_tenant_quotas_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    # The quotas are lost: the previous gpugate has none.
    op.drop_table("tenant_quotas")
