"""Users can be disabled and expire; the audit chain switches to a keyed MAC.

``users.disabled_at`` and ``users.expires_at``: a user whose token is refused. Both
NULL for every existing user, so every token handed out before keeps working.

``audit_head.legacy_seq``: records up to this sequence number were chained with the
plain sha256 rule, those after it with HMAC-SHA256 under a key kept outside the
database (serving.state.audit). The migration sets it to the chain's length, so the
records written before it keep verifying by the rule they were written with.
``audit_head.key_id`` names (without revealing) the key the MAC records are made
with, so that a gateway holding another key refuses to append instead of forking
the chain into records nobody can verify. ``audit_head.legacy_mac`` seals
``legacy_seq`` with that key (set with ``key_id`` at the first keyed append), so a
writer of the database cannot move the boundary to re-chain records by the plain rule.

Revision ID: 7a3c5e91d2b4
Revises: 236a4da9c857
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "7a3c5e91d2b4"
down_revision = "236a4da9c857"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def _users_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("disabled_at", _TS, nullable=True),
        sa.Column("expires_at", _TS, nullable=True),
    ]


def _head_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("legacy_seq", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("legacy_mac", sa.String(64), nullable=True),
    ]


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        _rebuild_on_sqlite()
    else:
        for column in _users_columns():
            op.add_column("users", column)
        for column in _head_columns():
            op.add_column("audit_head", column)
    op.execute("UPDATE audit_head SET legacy_seq = seq")


def _rebuild_on_sqlite() -> None:
    """Both tables made anew, as a fresh database makes them, and their rows copied.

    SQLite's ADD COLUMN writes the column after the table's constraints, and Alembic's
    batch rebuild reorders the constraints: either way the schema would read differently
    from a fresh database's. Here the CREATE statements are the ones a fresh database
    holds (columns in the metadata's order, constraints as the baseline wrote them).
    """
    users_old = ["id", "name", "role", "token_hash", "created_by", "created_at"]
    op.rename_table("users", "_old_users")
    op.drop_index(op.f("ix_users_token_hash"), table_name="_old_users")
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.CHAR(64), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        *_users_columns(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.CheckConstraint(
            "role IN ('admin', 'deployer', 'approver', 'finance', 'auditor')",
            name=op.f("ck_users_role"),
        ),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    _copy("_old_users", "users", users_old)
    op.create_index(op.f("ix_users_token_hash"), "users", ["token_hash"], unique=True)

    op.rename_table("audit_head", "_old_audit_head")
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.CHAR(64), nullable=False),
        *_head_columns(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_head_single_row")),
    )
    _copy("_old_audit_head", "audit_head", ["id", "seq", "hash"])


def _copy(source: str, target: str, columns: list[str]) -> None:
    names = ", ".join(columns)
    op.execute(f"INSERT INTO {target} ({names}) SELECT {names} FROM {source}")
    op.drop_table(source)


def downgrade() -> None:
    # The records after legacy_seq stay in the log; the previous gpugate checks them by
    # the plain rule, so its `audit verify` reports the first of them as changed.
    with op.batch_alter_table("audit_head") as batch:
        batch.drop_column("legacy_mac")
        batch.drop_column("key_id")
        batch.drop_column("legacy_seq")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("expires_at")
        batch.drop_column("disabled_at")
