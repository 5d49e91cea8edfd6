"""Baseline: the schema of the first versioned gpugate, table by table.

Written out in full rather than derived from ``serving.state.db.metadata``, so that
later changes to the metadata never rewrite it: they get revisions of their own.
Every name is final (``op.f``), independent of the metadata's naming convention.
A database created before migrations holds exactly this schema and is stamped with
this revision instead of running it.

Revision ID: 236a4da9c857
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "236a4da9c857"
down_revision = None
branch_labels = None
depends_on = None

# BIGINT on PostgreSQL; SQLite's INTEGER PRIMARY KEY must stay INTEGER to autoincrement.
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("approver", sa.String(128), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
        sa.UniqueConstraint(
            "name", "version", "approver", name=op.f("uq_approvals_name_version_approver")
        ),
        sa.CheckConstraint("decision IN ('approve', 'reject')", name=op.f("ck_approvals_decision")),
    )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.CHAR(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_head_single_row")),
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("before", sa.Text(), nullable=False),
        sa.Column("after", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.CHAR(64), nullable=False),
        sa.Column("hash", sa.CHAR(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    op.create_index(op.f("ix_audit_log_target"), "audit_log", ["target"])
    op.create_table(
        "ledger_batches",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("gateway", sa.String(128), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("device", sa.String(128), nullable=False),
        sa.Column("device_share", sa.Float(), nullable=False),
        sa.Column("device_ns", sa.BigInteger(), nullable=False),
        sa.Column("charge_ns", sa.BigInteger(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=False),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("price_nanos_per_hour", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_batches")),
    )
    op.create_index(op.f("ix_ledger_batches_finished_at"), "ledger_batches", ["finished_at"])
    op.create_table(
        "ledger_reservations",
        sa.Column("replica", sa.String(128), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("device", sa.String(128), nullable=False),
        sa.Column("device_share", sa.Float(), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("last_seen_at", _TS, nullable=False),
        sa.Column("ended_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("replica", name=op.f("pk_ledger_reservations")),
    )
    op.create_index(
        op.f("ix_ledger_reservations_last_seen_at"), "ledger_reservations", ["last_seen_at"]
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("digest", sa.CHAR(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("model_class", sa.String(300), nullable=True),
        sa.Column("model_kwargs", sa.Text(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.Column("parent_version", sa.String(128), nullable=True),
        sa.Column("source_uri", sa.Text(), nullable=True),
        sa.Column("dataset_digest", sa.String(200), nullable=True),
        sa.Column("code_revision", sa.String(200), nullable=True),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("stage_changed_at", _TS, nullable=False),
        sa.Column("promoted_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_model_versions_name_version")),
        sa.CheckConstraint(
            "stage IN ('registered', 'approved', 'rejected', 'staging', 'production', 'archived')",
            name=op.f("ck_model_versions_stage"),
        ),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("candidate", sa.String(128), nullable=False),
        sa.Column("baseline", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_analysis", sa.Text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("active_model", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
        sa.CheckConstraint(
            "state IN ('running', 'paused', 'succeeded', 'failed', 'aborted')",
            name=op.f("ck_rollouts_state"),
        ),
        sa.UniqueConstraint("active_model", name=op.f("uq_rollouts_active_model")),
    )
    op.create_index(op.f("ix_rollouts_model"), "rollouts", ["model"])
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
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.CheckConstraint("source IN ('config', 'cli')", name=op.f("ck_tenants_source")),
        sa.CheckConstraint("weight > 0", name=op.f("ck_tenants_weight_positive")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_index(op.f("ix_tenants_key_hash"), "tenants", ["key_hash"], unique=True)
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.CHAR(64), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.CheckConstraint(
            "role IN ('admin', 'deployer', 'approver', 'finance', 'auditor')",
            name=op.f("ck_users_role"),
        ),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_index(op.f("ix_users_token_hash"), "users", ["token_hash"], unique=True)
    op.create_table(
        "ledger_allocations",
        sa.Column("batch_id", _BIG_ID, autoincrement=False, nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("charge_ns", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", "tenant", name=op.f("pk_ledger_allocations")),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["ledger_batches.id"],
            name=op.f("fk_ledger_allocations_batch_id_ledger_batches"),
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "rollout_events",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("at", _TS, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("figures", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_events")),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_rollout_events_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
    )
    op.create_index(op.f("ix_rollout_events_rollout_id"), "rollout_events", ["rollout_id"])


def downgrade() -> None:
    # Below the baseline there is no gpugate schema: going there would drop every table,
    # the ledger and the audit log included.
    raise RuntimeError("the baseline cannot be downgraded: it would drop every gpugate table")
