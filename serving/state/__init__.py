"""The state database (SQLAlchemy Core: SQLite by default, PostgreSQL on a cluster),
its schema and migrations, and the tamper-evident audit log (``audit``, its key and
anchors in ``audit_key``).
"""

from serving.state import audit
from serving.state.audit_key import AuditKeyError
from serving.state.db import (
    SQLITE_FILENAME,
    approvals,
    audit_head,
    audit_log,
    ledger_allocations,
    ledger_batches,
    ledger_reservations,
    make_engine,
    metadata,
    model_versions,
    open_engine,
    rollout_events,
    rollouts,
    tenant_keys,
    tenant_quotas,
    tenants,
    users,
    utcnow,
)
from serving.state.migrate import (
    SchemaAheadError,
    SchemaBehindError,
    SchemaChange,
    SchemaError,
    SchemaStatus,
    head_revision,
    schema_status,
    upgrade_schema,
)

__all__ = [
    "SQLITE_FILENAME",
    "AuditKeyError",
    "SchemaAheadError",
    "SchemaBehindError",
    "SchemaChange",
    "SchemaError",
    "SchemaStatus",
    "approvals",
    "audit",
    "audit_head",
    "audit_log",
    "head_revision",
    "ledger_allocations",
    "ledger_batches",
    "ledger_reservations",
    "make_engine",
    "metadata",
    "model_versions",
    "open_engine",
    "rollout_events",
    "rollouts",
    "schema_status",
    "tenant_keys",
    "tenant_quotas",
    "tenants",
    "upgrade_schema",
    "users",
    "utcnow",
]
