"""``gpugate audit``: read the audit log and check its MAC chain, through the admin API;
``audit verify --offline`` checks a database directly."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from serving.cli.client import (
    EXIT_FAILED,
    AdminClient,
    UsageError,
    add_client_options,
    add_json_option,
    emit,
)
from serving.cli.local import LOCAL_NOTE, existing_engine, local


def since(text: str) -> str:
    """An ISO 8601 time; one without a zone is this machine's local time."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return (when if when.tzinfo is not None else when.astimezone()).isoformat()


def _records(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        at = datetime.fromisoformat(r["at"]).isoformat(timespec="seconds")
        line = f"{r['seq']:>6} {at} {r['actor']:<12} {r['action']:<20} {r['target']}"
        if r["reason"]:
            line += f"  reason: {r['reason']}"
        lines.append(line)
    return "\n".join(lines)


# Records asked for per request; the gateway answers at most 5000.
PAGE = 1000


def cmd_log(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        k: v
        for k, v in (
            ("model", args.model),
            ("since", args.since),
            ("until", args.until),
            ("actor", args.actor),
            ("action", args.action),
            ("target", args.target),
        )
        if v
    }
    params["order"] = "desc" if args.newest_first else "asc"
    cursor = "before_seq" if args.newest_first else "after_seq"
    client = AdminClient.of(args)
    records: list[dict[str, Any]] = []
    # Page by sequence number until the log (or --limit) is exhausted.
    while args.limit is None or len(records) < args.limit:
        size = PAGE if args.limit is None else min(PAGE, args.limit - len(records))
        page = client.get("/audit", {**params, "limit": size})
        records += page
        if len(page) < size:
            break
        params[cursor] = page[-1]["seq"]
    emit(args, records, _records)
    return 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _verdict(result: dict[str, Any]) -> str:
    if not result["ok"]:
        return f"audit chain BROKEN: {result['problem']}"
    anchored = result.get("anchored_seq")
    where = (
        f"; matches its anchor at record {anchored}"
        if anchored is not None
        else "; unanchored on this host: a deleted tail cannot be detected here"
    )
    others = [w for w in result.get("warnings", []) if not w.startswith("unanchored")]
    return "\n".join(
        [f"audit chain intact: {result['records']} records{where}"]
        + [f"warning: {w}" for w in others]
    )


def cmd_verify(args: argparse.Namespace) -> int:
    if args.offline:
        return local(_verify_offline)(args)
    if args.database_url:
        raise UsageError("--database-url is for --offline: the gateway knows its database")
    result = AdminClient.of(args).get("/audit/verify")
    emit(args, result, _verdict)
    return 0 if result["ok"] else EXIT_FAILED


def _verify_offline(args: argparse.Namespace) -> int:
    from serving.state import audit

    engine = existing_engine(args)
    try:
        found = audit.verify(engine)
    finally:
        engine.dispose()
    result = {
        "ok": found.ok,
        "records": found.records,
        "problem": found.problem,
        "first_bad_seq": found.first_bad_seq,
        "anchored_seq": found.anchored_seq,
        "warnings": list(found.warnings),
    }
    emit(args, result, _verdict)
    return 0 if found.ok else EXIT_FAILED


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    aud = sub.add_parser("audit", help="read and verify the tamper-evident audit log")
    asub = aud.add_subparsers(dest="audit_command", required=True)

    log = asub.add_parser(
        "log",
        help="list audit records, oldest first (admin, auditor)",
        description="List audit records, oldest first (--newest-first: newest first). "
        "--actor, --action and --target take an exact value or, ending in *, a prefix "
        "(literal, case-sensitive; quote it from the shell); each may be repeated for any "
        "of several values, and records must match every option given.",
    )
    log.add_argument("--model", help="only records about this model: its versions and its rollouts")
    log.add_argument(
        "--since", type=since, help="only records at or after this ISO 8601 time (local if no zone)"
    )
    log.add_argument(
        "--until", type=since, help="only records before this ISO 8601 time (local if no zone)"
    )
    log.add_argument(
        "--actor", action="append", help="only records by this user, e.g. ann or 'ci-*'"
    )
    log.add_argument(
        "--action",
        action="append",
        help="only records of this action, e.g. model.rollback or 'model.promote.*'",
    )
    log.add_argument(
        "--target", action="append", help="only records about this target, e.g. 'tenant:*'"
    )
    log.add_argument("--newest-first", action="store_true", help="the newest records first")
    log.add_argument(
        "--limit", type=_count, help="at most this many records (default: every match)"
    )
    add_client_options(log)
    add_json_option(log)
    log.set_defaults(func=cmd_log)

    verify = asub.add_parser(
        "verify",
        help="recompute the MAC chain and check its anchor; exit 1 naming the first "
        "changed, inserted or removed record (admin, auditor)",
        description="Recompute the audit log's MAC chain, check that it matches or extends "
        "the records anchored outside the database, and name the first record that was "
        "changed, inserted or removed (exit 1); exit 0 when intact. Asks the gateway (its "
        "key, its host's anchor file), or with --offline reads a database itself: the "
        "state folder's gpugate.db or --database-url, with $GPUGATE_AUDIT_KEY or the state "
        "folder's audit.key and audit.anchor (the gateway need not run). --offline: " + LOCAL_NOTE,
    )
    verify.add_argument(
        "--offline",
        action="store_true",
        help="read the database directly instead of asking the gateway (admin only)",
    )
    verify.add_argument(
        "--database-url", help="with --offline: SQLAlchemy URL of the database to check"
    )
    add_client_options(verify)
    add_json_option(verify)
    verify.set_defaults(func=cmd_verify)
