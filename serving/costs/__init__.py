"""GPU cost attribution at rest: pricing, the ledger of record (every batch's charge
and its per-tenant split, replica reservations) and finance's reports.
"""

from serving.costs.ledger import (
    NANOS,
    NS_PER_HOUR,
    Ledger,
    LedgerWriter,
    Price,
    Pricing,
    Reservations,
    as_utc,
    from_unix_ns,
    gateway_id,
    money,
)
from serving.costs.report import (
    GROUP_KEYS,
    IDLE,
    LedgerReports,
    Report,
    ReportError,
    Row,
    build_report,
    parse_when,
    report_for_query,
)

__all__ = [
    "GROUP_KEYS",
    "IDLE",
    "NANOS",
    "NS_PER_HOUR",
    "Ledger",
    "LedgerReports",
    "LedgerWriter",
    "Price",
    "Pricing",
    "Report",
    "ReportError",
    "Reservations",
    "Row",
    "as_utc",
    "build_report",
    "from_unix_ns",
    "gateway_id",
    "money",
    "parse_when",
    "report_for_query",
]
