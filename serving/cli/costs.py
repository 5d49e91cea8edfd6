"""``gpugate costs report``: finance's report from the ledger, through the admin API,
as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import io
import json
from datetime import UTC, date, datetime
from typing import Any

from serving.cli.client import AdminClient, add_client_options

COLUMNS = ("requests", "rows", "used_ns", "idle_ns", "gpu_seconds", "gpu_hours", "cost", "currency")


def render(data: dict[str, Any], fmt: str) -> str:
    """A report's JSON (``GET /admin/costs``) as ``table``, ``csv`` or ``json``; the last
    row is the TOTAL."""
    if fmt == "json":
        return json.dumps(data, indent=2)
    group_by = list(data["group_by"])
    header = [*group_by, *COLUMNS]
    body = [[r.get(h, "") for h in header] for r in data["rows"]]
    totals = data["totals"]
    total_line = ["TOTAL", *[""] * (len(group_by) - 1)] if group_by else []
    total_line += [totals[h] for h in COLUMNS]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
        writer.writerow(total_line)
        return buf.getvalue()
    text_rows = [header, *[[_fmt(c) for c in row] for row in body], [_fmt(c) for c in total_line]]
    widths = [max(len(row[i]) for row in text_rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in text_rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    lines.append(
        f"window {data['from']} .. {data['to']}; reserved "
        f"{totals['reserved_gpu_seconds']:.3f} device-s (used + idle)"
    )
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


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
    print(render(data, "json" if args.json else args.format))
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
