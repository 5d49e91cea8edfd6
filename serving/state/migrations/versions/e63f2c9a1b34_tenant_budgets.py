"""Tenants get budgets, with alerts and their deliveries.

``tenant_budgets``: a tenant's budget (an amount of currency or device time per calendar
month or fixed period), its alert thresholds and what happens at 100%.
``budget_alerts``: each threshold crossed, once per tenant, period and threshold.
``budget_deliveries``: each attempt to deliver an alert to the tenant's webhook. No
existing tenant has a budget.

Revision ID: e63f2c9a1b34
Revises: d52e1b8f0a23
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "e63f2c9a1b34"
down_revision = "d52e1b8f0a23"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenant_budgets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("period_start", _TS, nullable=True),
        sa.Column("period_end", _TS, nullable=True),
        sa.Column("thresholds", sa.Text(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("webhook_secret", sa.Text(), nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenant_budgets")),
        sa.UniqueConstraint("tenant_id", name=op.f("uq_tenant_budgets_tenant_id")),
        sa.CheckConstraint(
            "unit IN ('currency', 'device_hours') AND amount > 0"
            " AND action IN ('notify', 'reject', 'best-effort')",
            name=op.f("ck_tenant_budgets_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_tenant_budgets_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "budget_alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("period_start", _TS, nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("spend", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("crossed_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_alerts")),
        sa.UniqueConstraint(
            "tenant_id", "period_start", "threshold", name=op.f("uq_budget_alerts_tenant_id")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_budget_alerts_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "budget_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_deliveries")),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["budget_alerts.id"],
            name=op.f("fk_budget_deliveries_alert_id_budget_alerts"),
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        op.f("ix_budget_deliveries_alert_id"), "budget_deliveries", ["alert_id"], unique=False
    )


def downgrade() -> None:
    # Budgets, their alerts and deliveries are lost: the previous gpugate has none.
    op.drop_index(op.f("ix_budget_deliveries_alert_id"), table_name="budget_deliveries")
    op.drop_table("budget_deliveries")
    op.drop_table("budget_alerts")
    op.drop_table("tenant_budgets")
