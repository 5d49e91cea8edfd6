"""``gpugate tenant``: what a tenant sees of itself, asked with its own API key.

The key is not an admin token: the command reads ``GET /tenant`` on the gateway's HTTP
port (the data plane, like inference), never the admin API.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from serving.cli.client import DEFAULT_URL, AdminClient, CommandError, add_json_option, emit

KEY_ENV = "GPUGATE_KEY"


def _rate(rate: dict[str, float] | None, unit: str) -> str:
    if rate is None:
        return f"no {unit} quota"
    return f"{rate['per_s']:g} {unit}/s (burst {rate['burst']:g})"


def _cap(cap: dict[str, Any], unit: str) -> str:
    source = "server default" if cap["server_default"] else "own"
    return f"{cap['limit']} {unit} ({source})"


def _card(card: dict[str, Any]) -> str:
    metrics = ", ".join(f"{k}={v:g}" for k, v in sorted(card["metrics"].items())) or "no metrics"
    decided = [f"{a['decision']} by {a['approver']}: {a['reason']}" for a in card["approvals"]]
    approvals = "; ".join(decided) or "no approvals"
    inputs = ", ".join(
        f"{t['name']}:{t['datatype']}:{','.join(map(str, t['shape']))}"
        for t in card["signature"]["inputs"]
    )
    return f"version {card['version']} ({inputs}; {metrics}; {approvals})"


def _more(shown: int, total: int) -> str:
    return f" ({total - shown} more not shown)" if total > shown else ""


def summary(v: dict[str, Any]) -> str:
    """A short readable account of a tenant's view."""
    status = v["status"]
    if v.get("suspended_reason"):
        status += f" since {v['suspended_at']}: {v['suspended_reason']}"
    lines = [
        f"tenant {v['tenant']}: {status}",
        f"weight {v['weight']:g}; priority levels {', '.join(map(str, v['priorities']))}; "
        f"models {', '.join(v['models'])}",
        "in flight: at most "
        + _cap(v["max_requests_in_flight"], "requests")
        + ", "
        + _cap(v["max_bytes_in_flight"], "bytes"),
    ]
    quotas = v["quotas"]["quotas"]
    if not quotas:
        lines.append("rate quotas: none")
    for q in quotas:
        scope = f"model {q['model']}" if q["model"] else "every model"
        lines.append(
            f"rate quota, {scope}: {_rate(q['requests'], 'requests')}, {_rate(q['rows'], 'rows')}"
        )
    keys = v["keys"]
    lines.append(f"keys: {keys['total']}" + _more(len(keys["keys"]), keys["total"]))
    for k in keys["keys"]:
        expires = k["expires_at"] or "never"
        used = k["last_used_at"] or "never"
        lines.append(
            f"  {k['key_id']:>5} {k['label']:<16} {k['fingerprint']} {k['status']:<8} "
            f"created {k['created_at']}, expires {expires}, last used {used}"
        )
    u = v["usage"]
    if "error" in u:
        lines.append(f"usage this month: {u['error']}")
    else:
        lines.append(
            f"usage {u['from']} .. {u['to']}: {u['requests']} requests, {u['rows']} rows, "
            f"{u['gpu_hours']:.6g} device-hours, {u['cost']} {u['currency']}"
        )
    cards = v["model_cards"]
    lines.append("models:" + _more(len(cards["models"]), cards["total"]))
    for m in cards["models"]:
        production = _card(m["production"]) if m["production"] else "none"
        lines.append(f"  {m['model']}: production {production}")
        for s in m["staging"]:
            lines.append(f"  {m['model']}: staging {_card(s)}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get(KEY_ENV)
    if not key:
        raise CommandError(f"no API key: pass --key or set {KEY_ENV}")
    emit(args, AdminClient(args.url, key, prefix="").get("/tenant"), summary)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tenant = sub.add_parser(
        "tenant", help="a tenant's own view, with its API key (not an admin token)"
    )
    tsub = tenant.add_subparsers(dest="tenant_command", required=True)
    status = tsub.add_parser(
        "status",
        help="the tenant's status, grants, caps, quotas, keys, usage and models",
        description="What the gateway holds about the tenant whose API key is given: status "
        "(a suspended tenant too), weight, priority levels, in-flight caps, rate quotas, keys "
        "(never the keys themselves), this UTC month's usage and cost, and the models it may "
        "use with their production and staging versions' model cards. Reads GET /tenant on "
        "the gateway's HTTP port with the key.",
    )
    status.add_argument(
        "--key", help=f"the tenant's API key (default ${KEY_ENV}); not an admin token"
    )
    status.add_argument(
        "--url",
        default=os.environ.get("GPUGATE_URL", DEFAULT_URL),
        help=f"the gateway's HTTP address (default $GPUGATE_URL, else {DEFAULT_URL})",
    )
    add_json_option(status)
    status.set_defaults(func=cmd_status)
