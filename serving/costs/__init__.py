"""GPU cost attribution at rest: pricing, the ledger of record (every batch's charge
and its per-tenant split, replica reservations), finance's reports and monthly invoices.
"""

from serving.costs.formats import COLUMNS, cell_text, render_report
from serving.costs.invoice import Invoice, Statement, build_invoice, month_bounds
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
    Report,
    ReportError,
    Row,
    build_report,
    parse_when,
    report_for_query,
)
from serving.costs.service import LedgerReports

__all__ = [
    "COLUMNS",
    "GROUP_KEYS",
    "IDLE",
    "NANOS",
    "NS_PER_HOUR",
    "Invoice",
    "Ledger",
    "LedgerReports",
    "LedgerWriter",
    "Price",
    "Pricing",
    "Report",
    "ReportError",
    "Reservations",
    "Row",
    "Statement",
    "as_utc",
    "build_invoice",
    "build_report",
    "cell_text",
    "from_unix_ns",
    "gateway_id",
    "money",
    "month_bounds",
    "parse_when",
    "render_report",
    "report_for_query",
]
