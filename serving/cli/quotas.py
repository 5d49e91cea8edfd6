"""``gpugate tenants quota`` and ``tenants quotas``: a tenant's rate quotas, through the
admin API."""

from __future__ import annotations

import argparse
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


def _describe(q: dict[str, Any]) -> str:
    scope = f"model {q['model']}" if q["model"] else "every model"
    parts = []
    for kind in ("requests", "rows"):
        rate = q[kind]
        if rate is not None:
            burst = rate["burst"] or max(1.0, rate["per_s"])
            parts.append(f"{kind}={rate['per_s']:g}/s burst {burst:g}")
    return f"{scope:<24} " + (" ".join(parts) or "no quota")


def rates(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The quota's rates given by :func:`add_rate_options`' flags (none: empty)."""
    body: dict[str, Any] = {}
    for kind in ("requests", "rows"):
        per_s, burst = getattr(args, f"{kind}_per_s"), getattr(args, f"{kind}_burst")
        if burst is not None and per_s is None:
            raise UsageError(f"{command}: --{kind}-burst needs --{kind}-per-s")
        if per_s is not None:
            body[kind] = {"per_s": per_s, "burst": burst}
    return body


def cmd_set(args: argparse.Namespace) -> int:
    body = rates(args, "tenants quota")
    if not body and not args.clear:
        raise UsageError(
            "tenants quota: give --requests-per-s and/or --rows-per-s (with their bursts), "
            "or --clear to remove the quota"
        )
    if body and args.clear:
        raise UsageError("tenants quota: --clear takes no rates")
    if args.model:
        body["model"] = args.model
    stored = AdminClient.of(args).put(path_of("tenants", args.name, "quotas"), body)
    emit(
        args,
        stored,
        lambda d: f"quota of {args.name} (takes effect within seconds)\n{_describe(d)}",
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    quotas = AdminClient.of(args).get(path_of("tenants", args.name, "quotas"))
    emit(args, quotas, lambda rows: "\n".join(map(_describe, rows)) or "no quotas")
    return 0


def add_rate_options(parser: argparse.ArgumentParser) -> None:
    """--requests-per-s, --requests-burst, --rows-per-s, --rows-burst."""
    parser.add_argument(
        "--requests-per-s", type=positive_number, metavar="R", help="requests per second"
    )
    parser.add_argument(
        "--requests-burst",
        type=positive_number,
        metavar="N",
        help="requests at once after idling (default: one second's worth)",
    )
    parser.add_argument("--rows-per-s", type=positive_number, metavar="R", help="rows per second")
    parser.add_argument(
        "--rows-burst",
        type=positive_number,
        metavar="N",
        help="rows at once after idling; a larger request is refused 413 "
        "(default: one second's worth)",
    )


def add_commands(tsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Under ``gpugate tenants``."""
    quota = tsub.add_parser(
        "quota",
        help="set a tenant's rate quota over every model or for one model; over it, requests "
        "are refused 429 with Retry-After (takes effect within seconds)",
    )
    quota.add_argument("name")
    quota.add_argument("--model", help="the model it is for (default: every model together)")
    add_rate_options(quota)
    quota.add_argument("--clear", action="store_true", help="remove the quota")
    quota.set_defaults(func=cmd_set)

    quotas = tsub.add_parser("quotas", help="list a tenant's rate quotas")
    quotas.add_argument("name")
    quotas.set_defaults(func=cmd_list)
    for p in (quota, quotas):
        add_client_options(p)
        add_json_option(p)
