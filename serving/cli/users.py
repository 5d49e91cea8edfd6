"""``gpugate users``: users of the admin API and their roles; ``users bootstrap`` makes
the first admin of a database that has none."""

from __future__ import annotations

import argparse
from typing import Any

from serving.cli.client import AdminClient, add_client_options, add_json_option, emit
from serving.cli.local import LOCAL_NOTE, add_database_options, database_of, local

# serving.tenancy.ROLES; the gateway refuses any other role.
ROLES = ("admin", "deployer", "approver", "finance", "auditor")


def cmd_create(args: argparse.Namespace) -> int:
    made = AdminClient.of(args).post("/users", {"name": args.name, "role": args.role})
    emit(
        args,
        made,
        lambda d: f"user {d['user']} ({d['role']}) created; token (shown once): {d['token']}",
    )
    return 0


def _listing(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{u['user']:<24} {u['role']:<9} created {u['created_at']} by {u['created_by']}"
        for u in rows
    )


def cmd_list(args: argparse.Namespace) -> int:
    emit(args, AdminClient.of(args).get("/users"), _listing)
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from serving.state import open_engine
    from serving.tenancy import UserStore

    url, state_dir = database_of(args)
    engine = open_engine(url, state_dir)
    try:
        token = UserStore(engine).bootstrap(args.name)
    finally:
        engine.dispose()
    made = {"user": args.name, "role": "admin", "token": token}
    emit(args, made, lambda d: f"admin {d['user']} created; token (shown once): {d['token']}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = sub.add_parser("users", help="users of the admin API and CLI, and their roles")
    usub = users.add_subparsers(dest="users_command", required=True)

    create = usub.add_parser("create", help="create a user and print its token once (admin)")
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=ROLES)
    create.set_defaults(func=cmd_create)
    listing = usub.add_parser("list", help="list users and roles, never tokens (admin, auditor)")
    listing.set_defaults(func=cmd_list)
    for p in (create, listing):
        add_client_options(p)
        add_json_option(p)

    bootstrap = usub.add_parser(
        "bootstrap",
        help="create the first admin of a database that has none (admin only, direct "
        "database access)",
        description="Create the admin user of a state database that has no admin yet and "
        "print its token once; refused once any admin exists (admins create further users "
        "with 'gpugate users create'). 'gpugate serve' does the same on its first start and "
        "keeps the token in STATE_DIR/admin.token. " + LOCAL_NOTE,
    )
    bootstrap.add_argument("--name", default="admin", help="the admin's user name (default admin)")
    add_database_options(bootstrap)
    add_json_option(bootstrap)
    bootstrap.set_defaults(func=local(cmd_bootstrap))
