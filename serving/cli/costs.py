"""``gpugate costs report`` and ``gpugate costs invoice``: finance's report and monthly
invoice from the ledger, through the admin API, as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from serving.cli.client import AdminClient, add_client_options
from serving.costs import COLUMNS, cell_text, render_report


def when(text: str) -> str:
    """``--from``/``--to``: a day as it is, or an ISO time (UTC if it has no zone) in the
    RFC 3339 form the gateway takes."""
    try:
        if len(text) == 10:
            return date.fromisoformat(text).isoformat()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a day (2026-11-01) or ISO time"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def cmd_report(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "from": args.from_,
        "to": args.to,
        "group_by": args.group_by,
        "share_idle": "true" if args.share_idle else "false",
    }
    if args.tenant:
        params["tenant"] = args.tenant
    data = AdminClient.of(args).get("/costs", params)
    text = render_report(data, "json" if args.json else args.format)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


INVOICE_KEYS = ("period", "tenant", "model", "version", "device")
TOTAL = "TOTAL"
IDLE = "(idle)"  # serving.costs.IDLE
# On a tenant's TOTAL row, when it has a monthly budget.
BUDGET_COLUMNS = ("budget_unit", "budget", "budget_spent", "budget_overrun")
NO_BUDGET = ("",) * len(BUDGET_COLUMNS)


def _budget_cells(budget: dict[str, Any]) -> list[str]:
    return [budget["unit"], budget["amount"], budget["spent"], budget["overrun"]]


def render_invoice(data: dict[str, Any], fmt: str) -> str:
    """An invoice's JSON (``GET /admin/costs/invoice``) as ``table``, ``csv`` or ``json``.
    CSV: a row per tenant, model, version and device, each tenant's TOTAL row (model
    ``TOTAL``), the idle capacity no tenant is billed for (tenant ``(idle)``), and the
    invoice's TOTAL row (tenant ``TOTAL``)."""
    if fmt == "json":
        return json.dumps(data, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*INVOICE_KEYS, *COLUMNS, *BUDGET_COLUMNS])
        for name, section in _sections(data):
            for line in section["lines"]:
                keys = [data["period"], name, line["model"], line["version"], line["device"]]
                writer.writerow([*keys, *(line[c] for c in COLUMNS), *NO_BUDGET])
            totals = section["totals"]
            budget = section.get("budget")
            writer.writerow(
                [
                    data["period"], name, TOTAL, "", "", *(totals[c] for c in COLUMNS),
                    *(_budget_cells(budget) if budget else NO_BUDGET),
                ]
            )  # fmt: skip
        totals = data["totals"]
        writer.writerow(
            [data["period"], TOTAL, "", "", "", *(totals[c] for c in COLUMNS), *NO_BUDGET]
        )
        return buf.getvalue()
    header = ["model", "version", "device", *COLUMNS[:-1]]
    idle = "idle shared by use" if data["share_idle"] else "idle not billed to tenants"
    state = "closed" if data["closed"] else "open: figures still grow"
    out = [
        f"invoice {data['period']} ({data['from']} .. {data['to']}; {state}); "
        f"costs in {data['currency']}; {idle}"
    ]
    for name, section in _sections(data):
        lines = [[line[h] for h in header] for line in section["lines"]]
        total = [TOTAL, "", "", *(section["totals"][c] for c in COLUMNS[:-1])]
        out += [
            "",
            f"{'idle capacity' if name == IDLE else 'tenant ' + name}",
            _table(header, lines, total),
        ]
        budget = section.get("budget")
        if budget:
            out.append(
                f"budget {budget['amount']} {budget['unit']}: spent {budget['spent']}, "
                f"overrun {budget['overrun']}"
            )
    totals = data["totals"]
    out += ["", _table(["", *COLUMNS[:-1]], [], [TOTAL, *(totals[c] for c in COLUMNS[:-1])])]
    return "\n".join(out)


def _sections(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    sections = [(s["tenant"], s) for s in data["statements"]]
    return sections + ([(IDLE, data["idle"])] if data["idle"] else [])


def _table(header: list[str], body: list[list[Any]], total: list[Any]) -> str:
    rows = [header, *[[cell_text(c) for c in row] for row in body], [cell_text(c) for c in total]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    text = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join([text[0], rule, *text[1:-1], *([rule] if body else []), text[-1]])


_PERIOD = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def period(text: str) -> str:
    """``--period``: a calendar month, YYYY-MM."""
    if not _PERIOD.fullmatch(text) or text.startswith("0000"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a month (YYYY-MM, e.g. 2026-11)")
    return text


def cmd_invoice(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "period": args.period,
        "share_idle": "true" if args.share_idle else "false",
    }
    if args.tenant:
        params["tenant"] = args.tenant
    data = AdminClient.of(args).get("/costs/invoice", params)
    text = render_invoice(data, "json" if args.json else args.format)
    text = text if text.endswith("\n") else text + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    costs = sub.add_parser("costs", help="cost reports from the ledger (finance, admin)")
    csub = costs.add_subparsers(dest="costs_command", required=True)
    report = csub.add_parser(
        "report",
        help="device time and cost per group, with idle capacity",
        description="Device-seconds, device-hours (GPU-hours on GPUs, CPU-hours on CPU "
        "replicas) and cost per group over [--from, --to), from the gateway's ledger, priced "
        "by the gateway's config. Idle reserved capacity (replica uptime x share minus use) "
        "is the pseudo-tenant '(idle)', or is spread over tenants by use with --share-idle. "
        "The last line/row is the TOTAL; tenants + idle = reserved. Needs a finance or admin "
        "token.",
    )
    report.add_argument(
        "--from",
        dest="from_",
        metavar="FROM",
        type=when,
        required=True,
        help="start: a UTC day (2026-11-01) or ISO time",
    )
    report.add_argument(
        "--to",
        type=when,
        required=True,
        help="end: a UTC day (included whole) or ISO time (excluded)",
    )
    report.add_argument(
        "--group-by",
        default="tenant",
        help="comma list of tenant,model,version,device,day (default tenant)",
    )
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.add_argument("--json", action="store_true", help="the same as --format json")
    report.add_argument("--share-idle", action="store_true", help="spread idle over tenants")
    report.add_argument("--tenant", help="only this tenant's usage (no idle)")
    add_client_options(report)
    report.set_defaults(func=cmd_report)

    invoice = csub.add_parser(
        "invoice",
        help="a calendar month's statement per tenant",
        description="One statement per tenant for a calendar month (UTC): requests, rows, "
        "device-seconds, device-hours (gpu_seconds, gpu_hours) and cost per model, version "
        "and device, and the tenant's totals. Built from the same rows as 'costs report' "
        "over the month: a statement's TOTAL equals the tenant's row of the report, and the "
        "invoice's TOTAL the report's, to the nano-unit. Idle capacity is billed to no "
        "tenant (its own '(idle)' section), or spread over tenants by use with "
        "--share-idle. A month not yet over is marked open. Needs a finance or admin token.",
    )
    invoice.add_argument(
        "--period", type=period, required=True, help="the month, YYYY-MM (UTC), e.g. 2026-11"
    )
    invoice.add_argument(
        "--tenant", help="only this tenant's statement (with its idle share under --share-idle)"
    )
    invoice.add_argument(
        "--share-idle", action="store_true", help="bill each tenant its share of idle capacity"
    )
    invoice.add_argument("--format", choices=("table", "csv", "json"), default="table")
    invoice.add_argument("--json", action="store_true", help="the same as --format json")
    invoice.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    add_client_options(invoice)
    invoice.set_defaults(func=cmd_invoice)
