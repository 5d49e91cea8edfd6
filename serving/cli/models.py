"""``gpugate models``: register (an upload of the artifact), inspect, approve, promote
and roll back versions, through the admin API. The gateway runs the guardrails and the
smoke test and applies its own policy; this command sends the file, its sha256 and its
lineage."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from serving.cli.client import (
    AdminClient,
    CommandError,
    UsageError,
    add_client_options,
    add_json_option,
    emit,
    path_of,
)

FORMATS = ("torchscript", "export", "safetensors")
# How long registering may take: the upload, then the gateway's smoke test, which loads
# the model in a process of its own (the policy's smoke_timeout_s bounds that part).
REGISTER_TIMEOUT_S = 900.0


def git_revision(where: Path) -> str | None:
    """The git commit of the folder the model came from, if it is in a repository."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0:
            return out.stdout.strip() or None
    return None


def _kwargs(text: str) -> str:
    try:
        parsed = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return text


def _metric(pair: str) -> str:
    key, sep, value = pair.partition("=")
    try:
        float(value)
    except ValueError:
        sep = ""
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{pair!r} must be NAME=NUMBER")
    return pair


def _describe(data: dict[str, Any]) -> str:
    lines = [
        f"{data['name']}:{data['version']}  stage={data['stage']}  author={data['author']}  "
        f"format={data['format']}  sha256={data['sha256']}"
    ]
    for key in ("metrics", "lineage", "signature", "approvals"):
        if key in data:
            lines.append(f"  {key}: {json.dumps(data[key])}")
    return "\n".join(lines)


def cmd_register(args: argparse.Namespace) -> int:
    artifact = Path(args.artifact).expanduser()
    if not artifact.is_file():
        raise CommandError(f"artifact {artifact} is not a file")
    if bool(args.input) != bool(args.output):
        raise UsageError("give both --input and --output, or neither (to inherit the signature)")
    with artifact.open("rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    params: dict[str, Any] = {
        "sha256": sha256,
        "format": args.format,
        "model_class": args.model_class,
        "model_kwargs": args.model_kwargs,
        "input": args.input or [],
        "output": args.output or [],
        "metric": args.metric or [],
        "parent": args.parent,
        "source": args.source,
        "dataset_digest": args.dataset_digest,
        "code_revision": args.code_revision or git_revision(Path.cwd()),
        "version": args.version,
    }
    params = {k: v for k, v in params.items() if v not in (None, [])}
    made = AdminClient.of(args).upload(
        path_of("models", args.name, "versions"),
        params,
        artifact,
        read_timeout_s=REGISTER_TIMEOUT_S,
    )
    emit(args, made, _describe)
    return 0


def _versions(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        metrics = ",".join(f"{k}={v:g}" for k, v in sorted(r["metrics"].items()))
        lines.append(
            f"{r['name']:<20} {r['version']:<8} {r['stage']:<10} {r['author']:<10} "
            f"{r['created_at'][:19]} {metrics}"
        )
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    params = {"name": args.name} if args.name else None
    emit(args, AdminClient.of(args).get("/models", params), _versions)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    shown = AdminClient.of(args).get(path_of("models", args.name, "versions", args.version))
    emit(args, shown, _describe)
    return 0


def _tree(chain: list[dict[str, Any]]) -> str:
    """Root first, each child indented under its parent."""
    lines = []
    for depth, r in enumerate(reversed(chain)):
        lead = "" if depth == 0 else "  " * (depth - 1) + "└─ "
        lineage = r["lineage"]
        facts = [f"stage={r['stage']}", f"author={r['author']}"]
        facts += [
            f"{k}={v}"
            for k, v in (
                ("source", lineage["source_uri"]),
                ("dataset", lineage["dataset_digest"]),
                ("code", lineage["code_revision"]),
            )
            if v
        ]
        lines.append(f"{lead}{r['name']}:{r['version']}  {' '.join(facts)}")
    return "\n".join(lines)


def cmd_lineage(args: argparse.Namespace) -> int:
    path = path_of("models", args.name, "versions", args.version, "lineage")
    emit(args, AdminClient.of(args).get(path), _tree)
    return 0


def _decide(args: argparse.Namespace, decision: str) -> int:
    path = path_of("models", args.name, "versions", args.version, decision)
    row = AdminClient.of(args).post(path, {"reason": args.reason})
    emit(args, row, lambda d: f"{decision}d {d['name']}:{d['version']}; stage {d['stage']}")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, "approve")


def cmd_reject(args: argparse.Namespace) -> int:
    return _decide(args, "reject")


def cmd_promote(args: argparse.Namespace) -> int:
    path = path_of("models", args.name, "versions", args.version, "promote")
    row = AdminClient.of(args).post(path, {"to": args.to})
    emit(args, row, lambda d: f"{d['name']}:{d['version']} is now {d['stage']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    path = path_of("models", args.name, "rollback")
    row = AdminClient.of(args).post(path, {"reason": args.reason or ""})
    emit(args, row, lambda d: f"{d['name']}:{d['version']} is production again")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="model registry: versions, approvals, stages")
    msub = models.add_subparsers(dest="models_command", required=True)

    reg = msub.add_parser(
        "register",
        help="upload a new immutable version (deployer, admin); the gateway runs the guardrails",
        description="Upload the artifact to the gateway (streamed, with its sha256), which "
        "stores it in content-addressed storage and records a new version with its "
        "signature, metrics and lineage. The gateway refuses it (exit 1, audited) for a "
        "format outside the allowlist or any pickle payload, an artifact over its policy's "
        "size limit, a signature incompatible with production, metrics worse than "
        "production beyond its policy, or a failing smoke test.",
    )
    reg.add_argument("name")
    reg.add_argument("--artifact", required=True, help="model file to upload")
    reg.add_argument("--format", required=True, choices=FORMATS)
    reg.add_argument(
        "--class",
        dest="model_class",
        help="for safetensors: 'package.module:Class' (an nn.Module the gateway can import)",
    )
    reg.add_argument(
        "--model-kwargs", type=_kwargs, help="JSON object of keyword arguments for --class"
    )
    reg.add_argument(
        "--input",
        action="append",
        metavar="NAME:DATATYPE:DIMS",
        help="an input tensor, e.g. pixels:FP32:64 (repeat; default: the parent's or "
        "production's signature)",
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
        type=_metric,
        metavar="NAME=VALUE",
        help="an evaluation metric, e.g. accuracy=0.97 (repeat)",
    )
    reg.add_argument("--version", help="version label (default: the next integer)")
    reg.set_defaults(func=cmd_register)

    listing = msub.add_parser("list", help="list versions and their stages")
    listing.add_argument("name", nargs="?")
    listing.set_defaults(func=cmd_list)

    commands = [reg, listing]
    for cmd, fn, text in (
        ("show", cmd_show, "one version: signature, metrics, lineage, approvals"),
        ("lineage", cmd_lineage, "a version's ancestry as a tree"),
    ):
        p = msub.add_parser(cmd, help=text)
        p.add_argument("name")
        p.add_argument("version")
        p.set_defaults(func=fn)
        commands.append(p)

    for cmd, fn, text in (
        ("approve", cmd_approve, "approve a version (approver, admin; never its author)"),
        ("reject", cmd_reject, "reject a version (approver, admin; never its author)"),
    ):
        p = msub.add_parser(cmd, help=text)
        p.add_argument("name")
        p.add_argument("version")
        p.add_argument("--reason", required=True)
        p.set_defaults(func=fn)
        commands.append(p)

    promote = msub.add_parser(
        "promote",
        help="approved -> staging (deployed, no tenant traffic) -> production (deployer, admin)",
    )
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--to", required=True, choices=("staging", "production"))
    promote.set_defaults(func=cmd_promote)

    rollback = msub.add_parser(
        "rollback", help="bring back the previous production version (deployer, admin)"
    )
    rollback.add_argument("name")
    rollback.add_argument("--reason")
    rollback.set_defaults(func=cmd_rollback)

    for p in (*commands, promote, rollback):
        add_client_options(p)
        add_json_option(p)
