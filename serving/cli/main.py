"""The ``gpugate`` command: ``serve`` runs the gateway; every other command is a client of
a gateway's admin API, except the few marked admin only, which open the state database
directly."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

import serving.cli.audit as audit
import serving.cli.costs as costs
import serving.cli.db as db
import serving.cli.deploy as deploy
import serving.cli.models as models
import serving.cli.rollout as rollout
import serving.cli.serve as serve
import serving.cli.tenant_view as tenant_view
import serving.cli.tenants as tenants
import serving.cli.users as users
from serving.cli.client import EXIT_FAILED, EXIT_USAGE, CommandError, UsageError

EPILOG = """\
Every command but 'serve', 'deploy', 'config' and 'tenant' asks a gateway's admin API
(--url, default $GPUGATE_URL or http://127.0.0.1:8000) as the user whose token it is
given (--token, $GPUGATE_TOKEN, else the state folder's admin.token when readable);
'tenant status' reads the tenant's own view with its API key (--key, $GPUGATE_KEY). The
gateway checks the user's role, the approvals and its own policies. Only 'users
bootstrap', 'db upgrade' and 'audit verify --offline' open the state database directly:
they are for an admin who holds its credentials ('serve' and 'deploy' too).

exit codes: 0 done; 1 refused or failed (the gateway's answer, or no answer, is
printed as 'gpugate: error: ...'); 2 usage error (the command line itself).
"""


def _version() -> str:
    try:
        return metadata.version("gpugate")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpugate",
        description="GPU model-serving gateway: KServe v2 over HTTP and gRPC, tenant-fair "
        "dynamic batching, Ray Serve model replicas.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gpugate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_command(sub)
    for group in (deploy, tenants, tenant_view, users, models, rollout, audit, costs, db):
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CommandError as exc:
        print(f"gpugate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
