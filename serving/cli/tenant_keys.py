"""``gpugate tenants keys``: a tenant's API keys (create, list, revoke, rotate with a
grace), through the admin API."""

from __future__ import annotations

import argparse
import re
from typing import Any

from serving.cli.client import AdminClient, add_client_options, add_json_option, emit, path_of
from serving.cli.users import duration_s, instant

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def grace_s(text: str) -> int:
    """A grace such as ``0``, ``30s``, ``15m``, ``1h`` or ``7d``, in seconds."""
    found = re.fullmatch(r"(0|[1-9][0-9]{0,9})([smhd]?)", text.strip())
    if found is None or (found.group(2) == "" and found.group(1) != "0"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a grace like 0, 30s, 15m, 1h, 7d")
    return int(found.group(1)) * _UNITS.get(found.group(2), 1)


def _expiry(args: argparse.Namespace) -> dict[str, Any]:
    if args.expires_in is not None:
        return {"expires_in_s": args.expires_in}
    if args.expires_at is not None:
        return {"expires_at": args.expires_at}
    return {}


def _issued(what: str, d: dict[str, Any]) -> str:
    expiry = f", expires {d['expires_at']}" if d.get("expires_at") else ""
    return (
        f"tenant {d['tenant']}: {what} key {d['key_id']} ({d['label']}{expiry}); "
        f"API key (shown once): {d['api_key']}"
    )


def cmd_create(args: argparse.Namespace) -> int:
    body = {"label": args.label, **_expiry(args)}
    made = AdminClient.of(args).post(path_of("tenants", args.name, "keys"), body)
    emit(args, made, lambda d: _issued("new", d))
    return 0


def _when(value: str | None) -> str:
    return value or "-"


def _listing(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no keys"
    lines = [
        f"{'ID':>6}  {'LABEL':<16} {'FINGERPRINT':<12}  {'STATUS':<8} {'CREATED':<32} "
        f"{'EXPIRES':<32} {'LAST USED':<32} REVOKED"
    ]
    for k in rows:
        lines.append(
            f"{k['key_id']:>6}  {k['label']:<16} {k['fingerprint']:<12}  {k['status']:<8} "
            f"{k['created_at']:<32} {_when(k['expires_at']):<32} "
            f"{_when(k['last_used_at']):<32} {_when(k['revoked_at'])}"
        )
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    emit(args, AdminClient.of(args).get(path_of("tenants", args.name, "keys")), _listing)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else None
    path = path_of("tenants", args.name, "keys", str(args.key_id), "revoke")
    done = AdminClient.of(args).post(path, body)
    emit(
        args,
        done,
        lambda d: (
            f"tenant {d['tenant']}: key {d['key_id']} ({d['label']}) revoked; "
            "refused within seconds"
        ),
    )
    return 0


def _rotated(d: dict[str, Any]) -> str:
    old = d["old_key"]
    if old["status"] == "revoked":
        ends = f"old key {old['key_id']} revoked"
    else:
        ends = f"old key {old['key_id']} works until {old['expires_at']}"
    return _issued("rotated to", d) + f"\n{ends}"


def cmd_rotate(args: argparse.Namespace) -> int:
    body = {"grace_s": args.grace, **_expiry(args)}
    path = path_of("tenants", args.name, "keys", str(args.key_id), "rotate")
    emit(args, AdminClient.of(args).post(path, body), _rotated)
    return 0


def _key_id(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) < 2**31:
        raise argparse.ArgumentTypeError(f"{text!r} is not a key id (see tenants keys list)")
    return int(text)


def _add_expiry(p: argparse.ArgumentParser, what: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--expires-in",
        type=duration_s,
        metavar="DURATION",
        help=f"{what} stops working this long after now, e.g. 12h or 90d",
    )
    group.add_argument(
        "--expires-at",
        type=instant,
        metavar="TIME",
        help=f"{what} stops working at this ISO 8601 time (local if no zone)",
    )


def add_commands(tsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = tsub.add_parser(
        "keys", help="a tenant's API keys: create, list, revoke, rotate (admin; auditor lists)"
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True)

    create = ksub.add_parser(
        "create",
        help="give a CLI tenant another key, printed once (works at once)",
        description="Give a CLI tenant another API key and print it once. A tenant may hold "
        "several keys, e.g. one per client or environment, each with a label.",
    )
    create.add_argument("--label", default="default", help="what the key is for (default: default)")
    _add_expiry(create, "the key")
    create.set_defaults(func=cmd_create)

    listing = ksub.add_parser(
        "list",
        help="a tenant's keys: id, label, fingerprint, status, created, expires, last used, "
        "revoked (never the keys)",
    )
    listing.set_defaults(func=cmd_list)

    revoke = ksub.add_parser(
        "revoke", help="refuse a key from now on (within seconds on every gateway)"
    )
    revoke.add_argument("--reason", help="why (kept in the audit record)")
    revoke.set_defaults(func=cmd_revoke)

    rotate = ksub.add_parser(
        "rotate",
        help="issue a new key with the same label, printed once; the old one works for --grace",
        description="Issue a new key with the old key's label and print it once. The old key "
        "keeps working for --grace (default 0: refused at once), so that clients can switch "
        "without a failed request. The new key does not expire unless --expires-in or "
        "--expires-at is given.",
    )
    rotate.add_argument(
        "--grace",
        type=grace_s,
        default=0,
        metavar="DURATION",
        help="how long the old key keeps working, e.g. 1h (default 0; at most 30d)",
    )
    _add_expiry(rotate, "the new key")
    rotate.set_defaults(func=cmd_rotate)

    for p in (create, listing, revoke, rotate):
        p.add_argument("name", help="the tenant")
        add_client_options(p)
        add_json_option(p)
    for p in (revoke, rotate):
        p.add_argument("key_id", type=_key_id, help="the key's id (tenants keys list)")
