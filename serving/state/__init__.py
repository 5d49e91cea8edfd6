"""The state database (SQLAlchemy Core: SQLite by default, PostgreSQL on a cluster),
its schema, and the tamper-evident audit log (``audit``).
"""

from serving.state import audit
from serving.state.db import (
    SQLITE_FILENAME,
    approvals,
    audit_head,
    audit_log,
    create_schema,
    ledger_allocations,
    ledger_batches,
    ledger_reservations,
    metadata,
    model_versions,
    open_engine,
    rollout_events,
    rollouts,
    tenants,
    users,
    utcnow,
)

__all__ = [
    "SQLITE_FILENAME",
    "approvals",
    "audit",
    "audit_head",
    "audit_log",
    "create_schema",
    "ledger_allocations",
    "ledger_batches",
    "ledger_reservations",
    "metadata",
    "model_versions",
    "open_engine",
    "rollout_events",
    "rollouts",
    "tenants",
    "users",
    "utcnow",
]
