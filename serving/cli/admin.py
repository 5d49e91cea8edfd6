"""`gpugate users` and `gpugate audit`, and how every admin command finds its user.

A command acts as the user whose token is given with ``--token`` or
``$GPUGATE_TOKEN``; without either it uses the state folder's admin token file
(created with the admin on a fresh state). Each command names one action and is
checked against :data:`serving.tenancy.users.PERMISSIONS` before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from router.admin import Principal
from serving.config import ConfigError, GatewayConfig, load_config


class CommandError(Exception):
    """Printed as ``gpugate: error: ...``; exit status 2."""


@dataclass
class Context:
    engine: sa.Engine
    state_dir: Path
    principal: Principal
    config: GatewayConfig


def add_common(p: argparse.ArgumentParser) -> None:
    """The state options every command shares, plus the user token admin commands act with."""
    from serving.cli.main import _common

    _common(p)
    p.add_argument(
        "--token",
        help="user token to act with (default $GPUGATE_TOKEN, else the state folder's admin.token)",
    )


def open_context(args: argparse.Namespace, action: str) -> Context:
    """Open the state database and authenticate and authorize the caller for ``action``."""
    from serving.cli.main import _database_url, _state_dir
    from serving.state import open_engine
    from serving.tenancy import Forbidden, UserStore, check, ensure_admin

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    state_dir = _state_dir(args.state_dir, config)
    engine = open_engine(_database_url(args.database_url, config), state_dir)
    store = UserStore(engine)
    token = getattr(args, "token", None) or os.environ.get("GPUGATE_TOKEN")
    if not token:
        token = ensure_admin(store, state_dir)
        if token is None:
            raise CommandError(
                f"no token: pass --token or set GPUGATE_TOKEN (no usable admin token in "
                f"{state_dir})"
            )
    principal = store.authenticate(token)
    if principal is None:
        raise CommandError("unknown user token")
    try:
        check(principal, action)
    except Forbidden as exc:
        raise CommandError(str(exc)) from None
    return Context(engine, state_dir, principal, config)


def run(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the expected errors of an admin command into ``gpugate: error:`` and exit 2."""
    from serving.registry import RegistryError
    from serving.tenancy import TenantError, UserError

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (CommandError, ConfigError, TenantError, UserError, RegistryError, ValueError) as e:
            print(f"gpugate: error: {e}", file=sys.stderr)
            return 2

    return wrapped


# ------------------------------------------------------------------------- users


def cmd_users_create(args: argparse.Namespace) -> int:
    from serving.tenancy import UserStore

    ctx = open_context(args, "users.create")
    token = UserStore(ctx.engine).create(args.name, args.role, actor=ctx.principal.name)
    if args.json:
        print(json.dumps({"user": args.name, "role": args.role, "token": token}))
    else:
        print(f"user {args.name} ({args.role}) created; token (shown once): {token}")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    from serving.tenancy import UserStore

    ctx = open_context(args, "users.list")
    rows = UserStore(ctx.engine).list()
    items = [
        {
            "user": u.name,
            "role": u.role,
            "created_by": u.created_by,
            "created_at": u.created_at.isoformat(),
        }
        for u in rows
    ]
    if args.json:
        print(json.dumps(items))
    else:
        for i in items:
            print(f"{i['user']:<24} {i['role']:<9} created {i['created_at']} by {i['created_by']}")
    return 0


# ------------------------------------------------------------------------- audit


def cmd_audit_log(args: argparse.Namespace) -> int:
    from serving.admin import parse_since
    from serving.state import audit

    ctx = open_context(args, "audit.read")
    records = audit.read(
        ctx.engine,
        target_prefix=f"model:{args.model}" if args.model else None,
        since=parse_since(args.since),
    )
    if args.json:
        print(json.dumps([r.as_json() for r in records]))
        return 0
    for r in records:
        line = f"{r.seq:>6} {r.at.isoformat(timespec='seconds')} {r.actor:<12} {r.action:<20} "
        line += r.target
        if r.reason:
            line += f"  reason: {r.reason}"
        print(line)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from serving.state import audit

    ctx = open_context(args, "audit.read")
    result = audit.verify(ctx.engine)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": result.ok,
                    "records": result.records,
                    "problem": result.problem,
                    "first_bad_seq": result.first_bad_seq,
                }
            )
        )
    elif result.ok:
        print(f"audit chain intact: {result.records} records")
    else:
        print(f"audit chain BROKEN: {result.problem}")
    return 0 if result.ok else 1


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from serving.tenancy import ROLES

    users = sub.add_parser("users", help="manage users of the admin CLI and API")
    usub = users.add_subparsers(dest="users_command", required=True)
    create = usub.add_parser("create", help="create a user and print its token once (admin)")
    add_common(create)
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--json", action="store_true", help='print {"user", "role", "token"}')
    create.set_defaults(func=run(cmd_users_create))
    listing = usub.add_parser("list", help="list users and roles (never tokens)")
    add_common(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=run(cmd_users_list))

    aud = sub.add_parser("audit", help="read and verify the tamper-evident audit log")
    asub = aud.add_subparsers(dest="audit_command", required=True)
    log = asub.add_parser("log", help="list audit records, oldest first (admin, auditor)")
    add_common(log)
    log.add_argument("--model", help="only records about this model")
    log.add_argument("--since", help="only records at or after this ISO 8601 time")
    log.add_argument("--json", action="store_true")
    log.set_defaults(func=run(cmd_audit_log))
    verify = asub.add_parser(
        "verify",
        help="recompute the hash chain; exit 1 naming the first changed, inserted or "
        "removed record",
    )
    add_common(verify)
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=run(cmd_audit_verify))
