"""``gpugate rollout``: start, watch and steer canary rollouts, through the admin API."""

from __future__ import annotations

import argparse
import re
from typing import Any

from serving.cli.client import AdminClient, add_client_options, add_json_option, emit, path_of

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def steps(text: str) -> list[int]:
    """``--steps``: comma-separated percentages."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated percentages, e.g. 5,25,50,100"
        ) from None


def duration(text: str) -> float:
    """Seconds from ``500ms``, ``30s``, ``2m``, ``1h`` or a plain number of seconds."""
    found = _DURATION.match(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"duration {text!r}: use e.g. 500ms, 30s, 2m, 1h")
    factor = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}[found.group(2)]
    return float(found.group(1)) * factor


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _side(fig: dict[str, Any]) -> str:
    p99 = fig.get("p99_ms")
    shadow = f" ({fig['shadow_requests']} shadow)" if fig.get("shadow_requests") else ""
    return (
        f"{fig['version']}: {fig['requests']} requests{shadow}, {fig['errors']} errors "
        f"({_pct(fig['error_rate'])}), p99 {'-' if p99 is None else f'{p99:.1f} ms'}"
    )


def describe(data: dict[str, Any], history: list[dict[str, Any]]) -> list[str]:
    """The text form of ``rollout status``."""
    s = data["settings"]
    weights = "  ".join(f"{v} {w * 100:g}%" for v, w in data["weights"].items())
    lines = [
        f"rollout {data['id']} of {data['model']}: {data['production']} -> {data['candidate']}  "
        f"state={data['state']}  step {data['step']}/{data['steps']}  "
        f"failures={data['failures']}",
        f"  weights: {weights}",
        f"  steps {','.join(map(str, s['steps']))}, every {s['interval_s']:g}s; max error rate "
        f"{s['max_error_rate']:g}, max p99 ratio {s['max_p99_ratio']:g}, min requests "
        f"{s['min_requests']}, failure threshold {s['failure_threshold']}, sticky "
        f"{s['sticky'] or 'none'}, mirror {s['mirror_pct']:g}%"
        + (f" (min agreement {s['min_agreement']:g})" if s["mirror_pct"] else ""),
    ]
    last = data.get("last_analysis")
    if last:
        lines.append(f"  last analysis: {last['verdict']} over {last['window_s']:g}s")
        lines.append(f"    production {_side(last['production'])}")
        lines.append(f"    candidate  {_side(last['candidate'])}")
        if last.get("shadow"):
            sh = last["shadow"]
            lines.append(
                f"    shadow: {sh['compared']} compared, agreement {_pct(sh['agreement'])}, "
                f"max abs diff {sh['max_abs_diff']:.3g}, max rel diff {sh['max_rel_diff']:.3g}, "
                f"{sh['errors']} errors, {sh['dropped']} dropped"
            )
        for c in last["checks"]:
            mark = "ok  " if c["passed"] else "FAIL"
            lines.append(f"    {mark} {c['check']} {c['value']} (limit {c['limit']})")
    lines.append("  history:")
    for ev in history:
        verdict = ev["figures"].get("verdict") if ev["figures"] else None
        extra = f" [{verdict}]" if verdict and verdict != ev["action"] else ""
        reason = f": {ev['reason']}" if ev["reason"] else ""
        lines.append(
            f"    {ev['at']}  {ev['action']}{extra} by {ev['actor']}, step {ev['step']}, "
            f"candidate {ev['weight'] * 100:g}%{reason}"
        )
    return lines


def cmd_start(args: argparse.Namespace) -> int:
    body = {
        "version": args.version,
        "steps": args.steps,
        "interval_s": args.interval,
        "max_error_rate": args.max_error_rate,
        "max_p99_ratio": args.max_p99_ratio,
        "min_requests": args.min_requests,
        "failure_threshold": args.failure_threshold,
        "sticky": args.sticky,
        "mirror_pct": args.mirror,
        "min_agreement": args.min_agreement,
        "min_deadline_ms": args.min_deadline * 1000,
    }
    ro = AdminClient.of(args).post(path_of("models", args.name, "rollout"), body)

    def text(d: dict[str, Any]) -> str:
        s = d["settings"]
        return (
            f"rollout {d['id']} started: {d['model']} {d['production']} -> {d['candidate']}, "
            f"candidate at {s['steps'][0]}% (steps {','.join(map(str, s['steps']))})"
        )

    emit(args, ro, text)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = AdminClient.of(args).get(path_of("models", args.name, "rollout"))
    emit(args, status, lambda d: "\n".join(describe(d, d["history"])))
    return 0


def _command(action: str) -> Any:
    def cmd(args: argparse.Namespace) -> int:
        path = path_of("models", args.name, "rollout", action)
        ro = AdminClient.of(args).post(path, {"reason": args.reason or ""})

        def text(d: dict[str, Any]) -> str:
            share = d["weights"][d["candidate"]] * 100
            return (
                f"rollout {d['id']} of {d['model']}: {d['state']}, step {d['step']}/"
                f"{d['steps']}, candidate {d['candidate']} at {share:g}%"
            )

        emit(args, ro, text)
        return 0

    return cmd


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = sub.add_parser(
        "rollout",
        help="canary rollouts: weighted sticky splits, shadow traffic, automatic analysis",
    )
    rsub = rollout.add_subparsers(dest="rollout_command", required=True)

    start = rsub.add_parser(
        "start",
        help="start a canary of an approved version against production (deployer, admin)",
        description="Deploy VERSION beside production (approved -> staging) and give it the "
        "first step's share of the model's default traffic. Every --interval the gateway "
        "compares candidate and production over the same window: candidate error rate, p99 "
        "latency ratio, shadow agreement (with --mirror), at least --min-requests each. A pass "
        "advances one step; reaching 100% promotes the candidate to production; "
        "--failure-threshold failures in a row send all traffic back to production and retire "
        "the candidate. Requests naming a version are never split.",
    )
    start.add_argument("name")
    start.add_argument("version")
    start.add_argument(
        "--steps",
        type=steps,
        default="5,25,50,100",
        help="candidate %% per step (default 5,25,50,100)",
    )
    start.add_argument(
        "--interval",
        type=duration,
        default="60s",
        help="analysis interval: 500ms, 30s, 2m (default 60s)",
    )
    start.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="candidate's 500/503/504 share (default 0.01)",
    )
    start.add_argument(
        "--max-p99-ratio",
        type=float,
        default=1.25,
        help="candidate p99 / production p99 (default 1.25)",
    )
    start.add_argument(
        "--min-requests",
        type=int,
        default=100,
        help="requests each version (and shadow comparisons) needs in a window (default 100)",
    )
    start.add_argument(
        "--failure-threshold",
        type=int,
        default=2,
        help="failed analyses in a row that roll back (default 2)",
    )
    start.add_argument(
        "--sticky",
        metavar="tenant|header:NAME",
        help="keep a tenant, or a header's value, on one version (default: spread requests)",
    )
    start.add_argument(
        "--mirror",
        type=float,
        default=0.0,
        metavar="PCT",
        help="also send PCT%% of production's requests to the candidate (answers compared, "
        "not returned, billed to 'shadow')",
    )
    start.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        help="with --mirror: share of mirrored rows that must agree with production (default 0.99)",
    )
    start.add_argument(
        "--min-deadline",
        type=duration,
        default="1s",
        help="a request's deadline expiry (504) counts as the candidate's error only when its "
        "deadline was at least this long; client cancels never count (default 1s)",
    )
    start.set_defaults(func=cmd_start)

    status = rsub.add_parser("status", help="step, weights, last analysis and history")
    status.add_argument("name")
    status.set_defaults(func=cmd_status)
    commands = [start, status]

    for action, text in (
        ("pause", "hold the weights and stop analysing"),
        ("resume", "analyse and advance again"),
        ("promote", "make the candidate production now"),
        ("abort", "send all traffic back to production and retire the candidate"),
    ):
        p = rsub.add_parser(action, help=f"{text} (deployer, admin)")
        p.add_argument("name")
        p.add_argument("--reason")
        p.set_defaults(func=_command(action))
        commands.append(p)

    for p in commands:
        add_client_options(p)
        add_json_option(p)
