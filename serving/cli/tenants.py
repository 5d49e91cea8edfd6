"""``gpugate tenants``: tenants, their lifecycle (suspend, resume, delete, restore) and
their API keys, through the admin API."""

from __future__ import annotations

import argparse
from typing import Any

import serving.cli.budgets as budgets
import serving.cli.quotas as quotas
import serving.cli.tenant_keys as tenant_keys
from serving.cli.client import (
    AdminClient,
    UsageError,
    add_client_options,
    add_json_option,
    emit,
    path_of,
    positive_number,
)


def _models(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _levels(text: str) -> list[int]:
    """``--priorities``: comma-separated levels, e.g. 1,2."""
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated priority levels, e.g. 1,2"
        ) from None


def _cap(text: str) -> int | None:
    """A cap: a non-negative integer, or ``default`` for the server's default."""
    if text == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a non-negative integer or 'default'")
    return value


def _admission(args: argparse.Namespace) -> dict[str, Any]:
    """The admission fields given on the command line (none: left as they are)."""
    body: dict[str, Any] = {}
    if args.priorities is not None:
        body["priorities"] = args.priorities
    if args.max_requests_in_flight is not None:
        body["max_requests_in_flight"] = args.max_requests_in_flight
    if args.max_bytes_in_flight is not None:
        body["max_bytes_in_flight"] = args.max_bytes_in_flight
    return body


def cmd_create(args: argparse.Namespace) -> int:
    models = _models(args.models) if args.models else ["*"]
    body = {"name": args.name, "weight": args.weight, "models": models, **_admission(args)}
    rates = quotas.rates(args, "tenants create")
    if rates:
        body["quotas"] = {"*": rates}
    if args.budget is not None:
        body["budget"] = {
            "amount": args.budget,
            "unit": args.budget_unit,
            "action": args.budget_action,
        }
    made = AdminClient.of(args).post("/tenants", body)
    emit(
        args, made, lambda d: f"tenant {d['tenant']} created; API key (shown once): {d['api_key']}"
    )
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    body = _admission(args)
    rates = quotas.rates(args, "tenants update")
    if rates:
        body["quotas"] = {"*": rates}
    if args.weight is not None:
        body["weight"] = args.weight
    if args.models is not None:
        body["models"] = _models(args.models)
    if not body:
        raise UsageError(
            "tenants update: give at least one of --weight, --models, --priorities, "
            "--max-requests-in-flight, --max-bytes-in-flight, --requests-per-s, --rows-per-s"
        )
    row = AdminClient.of(args).patch(path_of("tenants", args.name), body)
    emit(args, row, lambda d: f"tenant updated (takes effect within seconds)\n{_listing([d])}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    gone = AdminClient.of(args).delete(path_of("tenants", args.name))
    emit(
        args,
        gone,
        lambda d: (
            f"tenant {d['tenant']} deleted; its keys stop working within seconds (its "
            "usage stays on record under its name)"
        ),
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    made = AdminClient.of(args).post(path_of("tenants", args.name, "restore"))
    emit(
        args,
        made,
        lambda d: f"tenant {d['tenant']} restored; API key (shown once): {d['api_key']}",
    )
    return 0


def cmd_suspend(args: argparse.Namespace) -> int:
    row = AdminClient.of(args).post(
        path_of("tenants", args.name, "suspend"), {"reason": args.reason}
    )
    emit(
        args,
        row,
        lambda d: (
            f"tenant {d['tenant']} suspended (its requests are refused within seconds)"
            f"\n{_listing([d])}"
        ),
    )
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else None
    row = AdminClient.of(args).post(path_of("tenants", args.name, "resume"), body)
    emit(args, row, lambda d: f"tenant {d['tenant']} is served again\n{_listing([d])}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    rotated = AdminClient.of(args).post(path_of("tenants", args.name, "rotate"))
    emit(
        args,
        rotated,
        lambda d: f"tenant {d['tenant']} has a new API key (shown once): {d['api_key']}",
    )
    return 0


def _or_default(value: int | None) -> str:
    return "default" if value is None else str(value)


def _status(r: dict[str, Any]) -> str:
    status = r.get("status", "active")
    if status == "suspended":
        return f" suspended: {r.get('suspended_reason')}"
    if status == "deleted":
        return f" deleted {r.get('deleted_at')}"
    return ""


def _listing(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{r['tenant']:<24} weight={r['weight']:<6g} models={','.join(r['models'])} "
        f"priorities={','.join(map(str, r['priorities']))} "
        f"max_requests={_or_default(r['max_requests_in_flight'])} "
        f"max_bytes={_or_default(r['max_bytes_in_flight'])}{_status(r)}"
        for r in rows
    )


def cmd_list(args: argparse.Namespace) -> int:
    path = "/tenants?all=true" if args.all else "/tenants"
    emit(args, AdminClient.of(args).get(path), _listing)
    return 0


def _add_admission_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--priorities",
        type=_levels,
        metavar="LEVELS",
        help="priority levels the tenant may ask for, e.g. 1,2 (1 is the most urgent; the "
        "default level 2 is always granted; default: 2 only)",
    )
    parser.add_argument(
        "--max-requests-in-flight",
        type=_cap,
        metavar="N|default",
        help="cap on the tenant's requests in flight (default: the server's)",
    )
    parser.add_argument(
        "--max-bytes-in-flight",
        type=_cap,
        metavar="BYTES|default",
        help="cap on the input bytes of the tenant's requests in flight (default: the server's)",
    )


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tenants = sub.add_parser("tenants", help="tenants and their API keys (admin; auditor lists)")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True)

    create = tsub.add_parser(
        "create", help="create a tenant and print its API key once (takes effect at once)"
    )
    create.add_argument("name")
    create.add_argument("--weight", type=float, default=1.0, help="fair-share weight (default 1)")
    create.add_argument(
        "--models", help="comma-separated models the tenant may call (default: all)"
    )
    _add_admission_options(create)
    quotas.add_rate_options(create)
    create.add_argument(
        "--budget",
        type=positive_number,
        metavar="AMOUNT",
        help="a monthly budget in --budget-unit (alerts at 50/80/100%%; 'tenants budget' "
        "changes it and adds a webhook)",
    )
    create.add_argument("--budget-unit", choices=["currency", "device_hours"], default="currency")
    create.add_argument(
        "--budget-action", choices=["notify", "reject", "best-effort"], default="notify"
    )
    create.set_defaults(func=cmd_create)

    update = tsub.add_parser(
        "update",
        help="change a CLI tenant's weight, models, priority grants or caps; the key stays "
        "(takes effect within seconds)",
    )
    update.add_argument("name")
    update.add_argument("--weight", type=float, help="fair-share weight")
    update.add_argument("--models", help="comma-separated models the tenant may call")
    _add_admission_options(update)
    quotas.add_rate_options(update)
    update.set_defaults(func=cmd_update)

    delete = tsub.add_parser(
        "delete",
        help="delete a CLI tenant: its keys stop working; it and its usage stay on record and "
        "its name is not reused (a config tenant: remove it from the config file)",
    )
    delete.add_argument("name")
    delete.set_defaults(func=cmd_delete)

    restore = tsub.add_parser(
        "restore", help="bring a deleted CLI tenant back with a new key, printed once"
    )
    restore.add_argument("name")
    restore.set_defaults(func=cmd_restore)

    suspend = tsub.add_parser(
        "suspend",
        help="refuse every request of a tenant (403 with the reason) until resumed; its keys "
        "stay (takes effect within seconds)",
    )
    suspend.add_argument("name")
    suspend.add_argument(
        "--reason", required=True, help="why; every refused request of the tenant is told it"
    )
    suspend.set_defaults(func=cmd_suspend)

    resume = tsub.add_parser("resume", help="serve a suspended tenant again")
    resume.add_argument("name")
    resume.add_argument("--reason", help="why (kept in the audit record)")
    resume.set_defaults(func=cmd_resume)

    rotate = tsub.add_parser(
        "rotate",
        aliases=["rotate-key"],
        help="replace a CLI tenant's one key with a new one, printed once; the old one stops "
        "working (several keys: tenants keys rotate)",
    )
    rotate.add_argument("name")
    rotate.set_defaults(func=cmd_rotate)

    listing = tsub.add_parser("list", help="list tenants and their status (never keys)")
    listing.add_argument("--all", action="store_true", help="deleted tenants too")
    listing.set_defaults(func=cmd_list)
    tenant_keys.add_commands(tsub)
    quotas.add_commands(tsub)
    budgets.add_commands(tsub)

    for p in (create, update, delete, restore, suspend, resume, rotate, listing):
        add_client_options(p)
        add_json_option(p)
