"""``gpugate tenants budget``: a tenant's budget, its spend and alerts, through the admin
API (finance and admins set it; auditors read it)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from serving.cli.client import (
    AdminClient,
    UsageError,
    add_client_options,
    add_json_option,
    emit,
    path_of,
    positive_number,
)


def _thresholds(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated percentages") from None


def _describe(d: dict[str, Any]) -> str:
    budget, spend = d["budget"], d["spend"]
    if budget is None:
        return f"tenant {d['tenant']} has no budget"
    unit = "device-hours" if budget["unit"] == "device_hours" else "(currency)"
    lines = [
        f"budget of {d['tenant']}: {budget['amount']} {unit} per "
        + ("month" if budget["period"] == "month" else "period")
        + f"; alerts at {', '.join(f'{t}%' for t in budget['thresholds'])}; "
        f"at 100%: {budget['action']}"
        + (f"; webhook {budget['webhook_url']}" if budget["webhook_url"] else ""),
        f"period {spend['from']} .. {spend['to']}: spent {spend['spent']} ({spend['percent']:g}%), "
        f"forecast {spend['forecast']}" + (" - exhausted" if spend["exhausted"] else ""),
    ]
    for a in d["alerts"]:
        delivered = [x for x in a["deliveries"] if x["ok"]]
        state = (
            f"delivered (attempt {delivered[0]['attempt']})"
            if delivered
            else f"{len(a['deliveries'])} failed attempts"
            if a["deliveries"]
            else "no webhook"
        )
        lines.append(f"  {a['threshold']}% crossed at {a['crossed_at']} ({a['spent']}): {state}")
    return "\n".join(lines)


def cmd_budget(args: argparse.Namespace) -> int:
    client = AdminClient.of(args)
    path = path_of("tenants", args.name, "budget")
    if args.clear:
        emit(
            args,
            client.delete(path),
            lambda d: f"budget of {d['tenant']} " + ("removed" if d["deleted"] else "was not set"),
        )
        return 0
    setting = args.amount is not None
    if not setting:
        if any(
            v is not None
            for v in (args.unit, args.start, args.days, args.thresholds, args.action, args.webhook)
        ):
            raise UsageError("tenants budget: setting a budget needs --amount")
        emit(args, client.get(path), _describe)
        return 0
    body: dict[str, Any] = {"unit": args.unit or "currency", "amount": args.amount}
    if (args.start is None) != (args.days is None):
        raise UsageError("tenants budget: a fixed period needs --from and --days")
    if args.start is not None:
        body["period"] = {"from": args.start, "days": args.days}
    if args.thresholds is not None:
        body["thresholds"] = args.thresholds
    if args.action is not None:
        body["action"] = args.action
    if args.webhook is not None:
        secret = os.environ.get(args.webhook_secret_env or "")
        if not secret:
            raise UsageError(
                "tenants budget: --webhook needs --webhook-secret-env VAR, a variable holding "
                "the signing secret (16 characters or more)"
            )
        body["webhook"] = {"url": args.webhook, "secret": secret}
    emit(args, client.put(path, body), _describe)
    return 0


def add_commands(tsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Under ``gpugate tenants``."""
    budget = tsub.add_parser(
        "budget",
        help="show a tenant's budget, spend and alerts; with --amount, set it (finance, admin)",
    )
    budget.add_argument("name")
    budget.add_argument("--amount", type=positive_number, help="per period, in the unit")
    budget.add_argument(
        "--unit",
        choices=["currency", "device_hours"],
        help="currency (the configured prices' currency; default) or device_hours",
    )
    budget.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        help="a fixed period's start, e.g. 2026-12-01T00:00:00Z (default: each calendar month)",
    )
    budget.add_argument("--days", type=int, help="a fixed period's length in days")
    budget.add_argument(
        "--thresholds",
        type=_thresholds,
        metavar="PCTS",
        help="alert percentages, e.g. 50,80,100 (default)",
    )
    budget.add_argument(
        "--action",
        choices=["notify", "reject", "best-effort"],
        help="at 100%%: notify only (default), reject every request (403), or best-effort "
        "(the least urgent priority level and a minimal weight)",
    )
    budget.add_argument("--webhook", metavar="URL", help="POST each alert here, signed")
    budget.add_argument(
        "--webhook-secret-env",
        metavar="VAR",
        help="the environment variable holding the webhook's signing secret",
    )
    budget.add_argument("--clear", action="store_true", help="remove the budget")
    budget.set_defaults(func=cmd_budget)
    add_client_options(budget)
    add_json_option(budget)
