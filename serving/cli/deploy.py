"""``gpugate deploy`` (the application onto a running Ray cluster, then return) and
``gpugate config render`` (the same application as a Ray Serve config, for ``serve
deploy`` or a RayService's ``serveConfigV2``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.cli.serve import (
    FIRST_PASS_TIMEOUT_S,
    database_url_of,
    fail,
    first_pass,
    server_options,
    state_dir_of,
)


def cmd_deploy(args: argparse.Namespace) -> int:
    # Imported here so that the client commands start quickly (no torch, no Ray).
    import threading

    from serving.cluster import runtime as cluster
    from serving.config import ConfigError, load_config
    from serving.gateway import build_app, prepare
    from serving.registry import RegistryError
    from serving.state import AuditKeyError, SchemaError
    from serving.tenancy import TenantError

    try:
        config = load_config(args.config)
        state_dir = state_dir_of(args.state_dir, config)
        prepared = prepare(config, state_dir, database_url_of(args.database_url, config))
    except (ConfigError, TenantError, RegistryError, AuditKeyError) as exc:
        return fail(str(exc))
    except SchemaError as exc:
        return fail(str(exc), code=1)
    try:
        cluster.connect(address=args.address)
    except Exception as exc:  # no cluster there, or refused
        return fail(f"cannot join the Ray cluster at {args.address}: {exc}", code=1)
    try:
        app = build_app(
            prepared.config,
            prepared.config.server,
            state_dir,
            prepared.database_url,
            prepared.secret,
        )
        handle = cluster.deploy(app)
        status = first_pass(cluster, handle, threading.Event(), FIRST_PASS_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        return fail(str(exc), code=1)
    finally:
        cluster.disconnect()  # the application stays: Serve owns it now
    assert status is not None
    server = prepared.config.server
    print(
        f"gpugate deployed to {args.address}: {server.gateway_replicas} gateway(s) on "
        f"http={server.host}:{server.http_port} grpc={server.host}:{server.grpc_port}; "
        f"serving {', '.join(status['served']) or 'nothing'}",
        flush=True,
    )
    if prepared.demo_key is not None:
        print(f"demo tenant key: {prepared.demo_key}", flush=True)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from serving.config import ConfigError, load_config
    from serving.gateway import serve_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    text = yaml.safe_dump(
        serve_config(config, state_dir_of(args.state_dir, config)), sort_keys=False
    )
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    deploy = sub.add_parser(
        "deploy",
        help="deploy the gateway application onto a running Ray cluster, and return",
        description="Bring the state in line with the config (schema, tenants, registry), "
        "then deploy the gpugate Serve application (the control loop and "
        "server.gateway_replicas gateways) onto the Ray cluster at --address and return "
        "once the gateways serve. The application belongs to the cluster from then on: "
        "stopping or re-running this command changes nothing for clients, and running it "
        "again with a new config updates the application in place (a rolling restart of "
        "the gateways). The model versions follow the registry, as with 'serve'.",
    )
    server_options(deploy)
    deploy.add_argument(
        "--address",
        required=True,
        help="the Ray cluster: host:port of its GCS, or ray://host:10001 (Ray Client)",
    )
    deploy.set_defaults(func=cmd_deploy)

    config = sub.add_parser("config", help="the config as Ray Serve sees it")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    render = config_sub.add_parser(
        "render",
        help="print the Ray Serve config of the gateway application",
        description="Print the Ray Serve config (YAML) that deploys the gpugate "
        "application from this config: for 'serve deploy' or a KubeRay RayService's "
        "serveConfigV2. It names no secret: the application reads the database URL and "
        "the cluster secret from its environment ($GPUGATE_DATABASE_URL, "
        "$GPUGATE_CLUSTER_SECRET) or the files the config names.",
    )
    render.add_argument("--config", type=Path, help="YAML config file (see docs/config.md)")
    render.add_argument("--state-dir", help="the state folder as the cluster's gateways see it")
    render.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    render.set_defaults(func=cmd_render)
