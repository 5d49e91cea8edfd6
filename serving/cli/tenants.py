"""``gpugate tenants``: tenants and their API keys, through the admin API."""

from __future__ import annotations

import argparse
from typing import Any

from serving.cli.client import AdminClient, add_client_options, add_json_option, emit, path_of


def cmd_create(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else ["*"]
    made = AdminClient.of(args).post(
        "/tenants", {"name": args.name, "weight": args.weight, "models": models}
    )
    emit(
        args, made, lambda d: f"tenant {d['tenant']} created; API key (shown once): {d['api_key']}"
    )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    gone = AdminClient.of(args).delete(path_of("tenants", args.name))
    emit(
        args, gone, lambda d: f"tenant {d['tenant']} deleted; its key stops working within seconds"
    )
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    rotated = AdminClient.of(args).post(path_of("tenants", args.name, "rotate"))
    emit(
        args,
        rotated,
        lambda d: f"tenant {d['tenant']} has a new API key (shown once): {d['api_key']}",
    )
    return 0


def _listing(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{r['tenant']:<24} weight={r['weight']:<6g} models={','.join(r['models'])}" for r in rows
    )


def cmd_list(args: argparse.Namespace) -> int:
    emit(args, AdminClient.of(args).get("/tenants"), _listing)
    return 0


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
    create.set_defaults(func=cmd_create)

    delete = tsub.add_parser(
        "delete",
        help="delete a tenant, revoking its key (a config tenant returns at the next start)",
    )
    delete.add_argument("name")
    delete.set_defaults(func=cmd_delete)

    rotate = tsub.add_parser(
        "rotate", help="give a CLI tenant a new key, printed once; the old one stops working"
    )
    rotate.add_argument("name")
    rotate.set_defaults(func=cmd_rotate)

    listing = tsub.add_parser("list", help="list tenants (never keys)")
    listing.set_defaults(func=cmd_list)

    for p in (create, delete, rotate, listing):
        add_client_options(p)
        add_json_option(p)
