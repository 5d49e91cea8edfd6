"""`gpugate models ...`: register, inspect, approve, promote and roll back versions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from serving.cli.admin import Context, add_common, open_context, run


def _registry(ctx: Context) -> Any:
    from serving.registry import Registry

    return Registry(ctx.engine, ctx.state_dir, ctx.config)


def _metrics(pairs: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--metric {pair!r} must be NAME=NUMBER")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--metric {pair!r}: {value!r} is not a number") from None
    return out


def _show(row: Any, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    data = {**row.as_json(), **(extra or {})}
    if as_json:
        print(json.dumps(data))
        return
    print(
        f"{row.name}:{row.version}  stage={row.stage}  author={row.author}  "
        f"format={row.format}  sha256={row.digest}"
    )
    for key in ("metrics", "lineage", "signature"):
        print(f"  {key}: {json.dumps(data[key])}")
    if extra:
        for key, value in extra.items():
            print(f"  {key}: {json.dumps(value)}")


def cmd_register(args: argparse.Namespace) -> int:
    from serving.registry import Candidate, Signature, git_revision, parse_tensor

    ctx = open_context(args, "models.register")
    if bool(args.input) != bool(args.output):
        raise ValueError("give both --input and --output, or neither (to inherit the signature)")
    signature = (
        Signature(tuple(map(parse_tensor, args.input)), tuple(map(parse_tensor, args.output)))
        if args.input
        else None
    )
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError("--model-kwargs must be a JSON object")
    artifact = Path(args.artifact).expanduser().resolve()
    cand = Candidate(
        name=args.name,
        artifact=artifact,
        format=args.format,
        signature=signature,
        model_class=args.model_class,
        model_kwargs=kwargs,
        metrics=_metrics(args.metric or []),
        parent_version=args.parent,
        source_uri=args.source,
        dataset_digest=args.dataset_digest,
        code_revision=args.code_revision or git_revision(Path.cwd()),
        version=args.version,
    )
    row = _registry(ctx).register(ctx.principal.name, cand)
    _show(row, args.json)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    ctx = open_context(args, "models.read")
    rows = _registry(ctx).list(args.name)
    if args.json:
        print(json.dumps([r.as_json() for r in rows]))
        return 0
    for r in rows:
        metrics = ",".join(f"{k}={v:g}" for k, v in sorted(r.metrics.items()))
        print(
            f"{r.name:<20} {r.version:<8} {r.stage:<10} {r.author:<10} "
            f"{r.created_at.isoformat(timespec='seconds')} {metrics}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from serving.registry import Stages

    ctx = open_context(args, "models.read")
    reg = _registry(ctx)
    row = reg.get(args.name, args.version)
    _show(row, args.json, {"approvals": Stages(reg).approvals(args.name, args.version)})
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    ctx = open_context(args, "models.read")
    reg = _registry(ctx)
    chain = reg.lineage(args.name, args.version)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "version": r.version,
                        "parent_version": r.parent_version,
                        "stage": r.stage,
                        "author": r.author,
                        "source_uri": r.source_uri,
                        "dataset_digest": r.dataset_digest,
                        "code_revision": r.code_revision,
                    }
                    for r in chain
                ]
            )
        )
        return 0
    # Root first, each child indented under its parent.
    for depth, r in enumerate(reversed(chain)):
        lead = "" if depth == 0 else "  " * (depth - 1) + "└─ "
        facts = [f"stage={r.stage}", f"author={r.author}"]
        facts += [
            f"{k}={v}"
            for k, v in (
                ("source", r.source_uri),
                ("dataset", r.dataset_digest),
                ("code", r.code_revision),
            )
            if v
        ]
        print(f"{lead}{r.name}:{r.version}  {' '.join(facts)}")
    return 0


def _decide(args: argparse.Namespace, decision: str) -> int:
    from serving.registry import Stages

    ctx = open_context(args, "models.approve")
    row = Stages(_registry(ctx)).decide(
        ctx.principal.name, args.name, args.version, decision, args.reason
    )
    if args.json:
        print(json.dumps(row.as_json()))
    else:
        print(f"{decision}d {row.name}:{row.version} by {ctx.principal.name}; stage {row.stage}")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, "approve")


def cmd_reject(args: argparse.Namespace) -> int:
    return _decide(args, "reject")


def cmd_promote(args: argparse.Namespace) -> int:
    from serving.registry import Stages

    ctx = open_context(args, "models.promote")
    row = Stages(_registry(ctx)).promote(ctx.principal.name, args.name, args.version, args.to)
    if args.json:
        print(json.dumps(row.as_json()))
    else:
        print(f"{row.name}:{row.version} is now {row.stage}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from serving.registry import Stages

    ctx = open_context(args, "models.promote")
    row = Stages(_registry(ctx)).rollback(ctx.principal.name, args.name, args.reason or "")
    if args.json:
        print(json.dumps(row.as_json()))
    else:
        print(f"{row.name}:{row.version} is production again")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="model registry: versions, approvals, stages")
    msub = models.add_subparsers(dest="models_command", required=True)

    reg = msub.add_parser(
        "register",
        help="register a new immutable version (deployer, admin); runs the guardrails",
        description="Copy the artifact into content-addressed storage and record a new "
        "version with its signature, metrics and lineage. Refused (exit 2, audited) for a "
        "format outside the allowlist or any pickle payload, an artifact over the size "
        "limit, a signature incompatible with production, metrics worse than production "
        "beyond the model's policy, or a failing smoke test.",
    )
    add_common(reg)
    reg.add_argument("name")
    reg.add_argument("--artifact", required=True, help="model file to register (copied)")
    reg.add_argument("--format", required=True, choices=("torchscript", "export", "safetensors"))
    reg.add_argument(
        "--class",
        dest="model_class",
        help="for safetensors: 'package.module:Class' (an importable nn.Module)",
    )
    reg.add_argument("--model-kwargs", help="JSON object of keyword arguments for --class")
    reg.add_argument(
        "--input",
        action="append",
        metavar="NAME:DATATYPE:DIMS",
        help="an input tensor, e.g. pixels:FP32:64 (repeat; default: the "
        "parent's or production's signature)",
    )
    reg.add_argument(
        "--output",
        action="append",
        metavar="NAME:DATATYPE:DIMS",
        help="an output tensor, e.g. logits:FP32:10 (repeat)",
    )
    reg.add_argument("--parent", help="the version this one was derived from")
    reg.add_argument("--source", help="URI of the run that produced it (e.g. an MLflow run)")
    reg.add_argument("--dataset-digest", help="digest of the training data")
    reg.add_argument("--code-revision", help="code revision (default: git HEAD of the cwd)")
    reg.add_argument(
        "--metric",
        action="append",
        metavar="NAME=VALUE",
        help="an evaluation metric, e.g. accuracy=0.97 (repeat)",
    )
    reg.add_argument("--version", help="version label (default: the next integer)")
    reg.add_argument("--json", action="store_true")
    reg.set_defaults(func=run(cmd_register))

    listing = msub.add_parser("list", help="list versions and their stages")
    add_common(listing)
    listing.add_argument("name", nargs="?")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=run(cmd_list))

    for cmd, fn, text in (
        ("show", cmd_show, "one version: signature, metrics, lineage, approvals"),
        ("lineage", cmd_lineage, "a version's ancestry as a tree"),
    ):
        p = msub.add_parser(cmd, help=text)
        add_common(p)
        p.add_argument("name")
        p.add_argument("version")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=run(fn))

    for cmd, fn, text in (
        ("approve", cmd_approve, "approve a version (approver; never its author)"),
        ("reject", cmd_reject, "reject a version (approver; never its author)"),
    ):
        p = msub.add_parser(cmd, help=text)
        add_common(p)
        p.add_argument("name")
        p.add_argument("version")
        p.add_argument("--reason", required=True)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=run(fn))

    promote = msub.add_parser(
        "promote",
        help="approved -> staging (deployed, no tenant traffic) -> production (deployer, admin)",
    )
    add_common(promote)
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--to", required=True, choices=("staging", "production"))
    promote.add_argument("--json", action="store_true")
    promote.set_defaults(func=run(cmd_promote))

    rollback = msub.add_parser(
        "rollback", help="bring back the previous production version (deployer, admin)"
    )
    add_common(rollback)
    rollback.add_argument("name")
    rollback.add_argument("--reason")
    rollback.add_argument("--json", action="store_true")
    rollback.set_defaults(func=run(cmd_rollback))
