"""``gpugate users``: users of the admin API, their roles and their tokens' life
(create, list, disable, enable, rotate, delete); ``users bootstrap`` makes the first
admin of a database that has none."""

from __future__ import annotations

import argparse
import re
from datetime import datetime
from typing import Any

from serving.cli.client import AdminClient, add_client_options, add_json_option, emit, path_of
from serving.cli.local import LOCAL_NOTE, add_database_options, database_of, local

# serving.tenancy.ROLES; the gateway refuses any other role.
ROLES = ("admin", "deployer", "approver", "finance", "auditor")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def duration_s(text: str) -> int:
    """A duration such as ``90s``, ``15m``, ``12h`` or ``30d``, in seconds."""
    found = re.fullmatch(r"([1-9][0-9]{0,9})([smhd])", text.strip())
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 12h, 30d")
    return int(found.group(1)) * _UNITS[found.group(2)]


def instant(text: str) -> str:
    """An ISO 8601 time; one without a zone is this machine's local time."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return (when if when.tzinfo is not None else when.astimezone()).isoformat()


def _expiry(args: argparse.Namespace) -> dict[str, Any]:
    if args.expires_in is not None:
        return {"expires_in_s": args.expires_in}
    if args.expires_at is not None:
        return {"expires_at": args.expires_at}
    return {}


def _token_line(what: str, d: dict[str, Any]) -> str:
    expiry = f", expires {d['expires_at']}" if d.get("expires_at") else ""
    return f"user {d['user']} ({d['role']}{expiry}) {what}; token (shown once): {d['token']}"


def cmd_create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "role": args.role, **_expiry(args)}
    made = AdminClient.of(args).post("/users", body)
    emit(args, made, lambda d: _token_line("created", d))
    return 0


def _listing(rows: list[dict[str, Any]]) -> str:
    lines = []
    for u in rows:
        line = (
            f"{u['user']:<24} {u['role']:<9} {u['status']:<8} created {u['created_at']} "
            f"by {u['created_by']}"
        )
        if u.get("expires_at"):
            line += f", expires {u['expires_at']}"
        lines.append(line)
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    emit(args, AdminClient.of(args).get("/users"), _listing)
    return 0


def _change(action: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        body = {"reason": args.reason} if args.reason else None
        done = AdminClient.of(args).post(path_of("users", args.name, action), body)
        emit(args, done, lambda d: f"user {d['user']} ({d['role']}) is {d['status']}")
        return 0

    return run


def cmd_rotate(args: argparse.Namespace) -> int:
    body: dict[str, Any] = _expiry(args)
    if args.no_expiry:
        body["never_expires"] = True
    if args.reason:
        body["reason"] = args.reason
    made = AdminClient.of(args).post(path_of("users", args.name, "rotate"), body)
    emit(args, made, lambda d: _token_line("has a new token; the old one no longer works", d))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    done = AdminClient.of(args).delete(path_of("users", args.name))
    emit(args, done, lambda d: f"user {d['user']} deleted; its token no longer works")
    return 0


def _add_expiry(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--expires-in",
        type=duration_s,
        metavar="DURATION",
        help="the token stops working this long after now, e.g. 12h or 90d",
    )
    group.add_argument(
        "--expires-at",
        type=instant,
        metavar="TIME",
        help="the token stops working at this ISO 8601 time (local if no zone)",
    )
    return group


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
    _add_expiry(create)
    create.set_defaults(func=cmd_create)
    listing = usub.add_parser(
        "list", help="list users, roles and status, never tokens (admin, auditor)"
    )
    listing.set_defaults(func=cmd_list)
    disable = usub.add_parser(
        "disable",
        help="refuse a user's token until enabled again; not the last enabled admin (admin)",
    )
    disable.set_defaults(func=_change("disable"))
    enable = usub.add_parser("enable", help="accept a disabled user's token again (admin)")
    enable.set_defaults(func=_change("enable"))
    rotate = usub.add_parser(
        "rotate",
        help="give a user a new token, printed once; the old one stops working (admin)",
        description="Give a user a new token and print it once; the old token stops working. "
        "The expiry is kept unless --expires-in, --expires-at or --no-expiry is given.",
    )
    _add_expiry(rotate).add_argument(
        "--no-expiry", action="store_true", help="the new token does not expire"
    )
    rotate.set_defaults(func=cmd_rotate)
    delete = usub.add_parser(
        "delete", help="delete a user and its token; not the last enabled admin (admin)"
    )
    delete.set_defaults(func=cmd_delete)
    for p in (disable, enable, rotate, delete):
        p.add_argument("name")
    for p in (disable, enable, rotate):
        p.add_argument("--reason", help="why (kept in the audit record)")
    for p in (create, listing, disable, enable, rotate, delete):
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
