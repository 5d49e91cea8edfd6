"""Tenants' budgets: the amount, its spend from the cost ledger, threshold alerts (audit
records and signed webhook deliveries) and what happens at 100%."""

from serving.budgets.monitor import (
    CHECK_INTERVAL_S,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    BudgetMonitor,
    publish,
    signature,
)
from serving.budgets.store import (
    ACTIONS,
    DEFAULT_THRESHOLDS,
    UNITS,
    Alert,
    Budget,
    BudgetStore,
    Spend,
)

__all__ = [
    "ACTIONS",
    "CHECK_INTERVAL_S",
    "DEFAULT_THRESHOLDS",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "UNITS",
    "Alert",
    "Budget",
    "BudgetMonitor",
    "BudgetStore",
    "Spend",
    "publish",
    "signature",
]
