"""``gpugate serve``: the server, embedded. A thin driver: start or join Ray, deploy the
``gpugate`` Serve application (the control loop and the gateways; the control loop
deploys one application per model version and follows the registry), print one line
when the gateways serve, and on SIGTERM/SIGINT stop the control loop, drain in-flight
requests, shut down, exit 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.cli.client import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from serving.config import GatewayConfig


# The control loop's first pass deploys every served version (each within 180 s, or it
# is skipped and audited) before the gateways get the set.
FIRST_PASS_TIMEOUT_S = 900.0


def state_dir_of(arg: str | None, config: GatewayConfig) -> Path:
    chosen = arg or os.environ.get("GPUGATE_STATE_DIR") or config.state_dir or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().resolve()


def database_url_of(arg: str | None, config: GatewayConfig) -> str | None:
    return arg or os.environ.get("GPUGATE_DATABASE_URL") or config.database_url


def fail(message: str, code: int = 2) -> int:
    print(f"gpugate: error: {message}", file=sys.stderr)
    return code


def _check_port_free(host: str, port: int, what: str) -> None:
    from serving.config import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{what} port {host}:{port} is not available: {exc}") from None


def _stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def first_pass(
    cluster: Any, handle: Any, stop: threading.Event, timeout_s: float
) -> dict[str, Any] | None:
    """Wait until the control loop has deployed what the registry serves and sent it to
    the gateways; its status, or None if a signal came first."""
    deadline = time.monotonic() + timeout_s
    while not stop.wait(0.2):
        status: dict[str, Any] = cluster.call(handle, "status", timeout_s=30)
        if status["passes"] > 0:
            return status
        if time.monotonic() > deadline:
            why = f": {status['error']}" if status["error"] else ""
            raise TimeoutError(f"the control loop made no pass in {timeout_s:.0f}s{why}")
    return None


def _drain(cluster: Any, control: Any, timeout_s: float) -> dict[str, Any]:
    """Stop the control loop, then drain every gateway; the sum of their reports."""
    try:
        cluster.call(control, "stop", timeout_s=60)
        reports = cluster.broadcast(
            cluster.gateway_handle(), "drain", timeout_s, timeout_s=timeout_s + 30
        )
        return {
            "completed": all(r["completed"] for r in reports),
            "in_flight_at_drain": sum(r["in_flight_at_drain"] for r in reports),
        }
    except Exception as exc:  # a gateway died or hung: still shut down cleanly
        print(f"gpugate: drain failed: {exc}", file=sys.stderr, flush=True)
        return {"completed": False, "in_flight_at_drain": "unknown"}


def _stopped_during_start() -> int:
    print("gpugate stopped during start-up", flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # From the first moment: a signal during start-up (Ray's start takes seconds) stops
    # the start cleanly, with exit code 0, as one while serving does.
    stop = threading.Event()
    _stop_on_signals(stop)
    # Imported here so that the client commands start quickly (no torch, no Ray).
    from serving.config import NODE_HOST, ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "http_port": args.http_port,
            "grpc_port": args.grpc_port,
            "metrics_port": args.metrics_port,
        }.items()
        if v is not None
    }
    server = config.server.model_copy(update=overrides)
    state_dir = state_dir_of(args.state_dir, config)
    database_url = database_url_of(args.database_url, config)

    from serving.cluster import runtime as cluster
    from serving.gateway import build_app, prepare
    from serving.registry import RegistryError
    from serving.state import AuditKeyError, SchemaError
    from serving.tenancy import ADMIN_TOKEN_FILE, TenantError

    try:
        # The gateways' metrics ports: metrics_port + their rank on this node.
        metrics_ports = [server.metrics_port + i for i in range(server.gateway_replicas)]
        # With host "node" each gateway binds its own node's address: nothing to check here.
        checked = (
            ()
            if server.host == NODE_HOST
            else (
                ("HTTP", server.http_port),
                ("gRPC", server.grpc_port),
                *(("metrics", p) for p in (metrics_ports if server.metrics_port else [])),
            )
        )
        for what, port in checked:
            _check_port_free(server.host, port, what)
        prepared = prepare(config, state_dir, database_url)
    except (ConfigError, TenantError, RegistryError, AuditKeyError) as exc:
        return fail(str(exc))
    except SchemaError as exc:  # refused: the database's schema does not fit this gpugate
        return fail(str(exc), code=1)

    if stop.is_set():
        return _stopped_during_start()
    try:
        started_ray = cluster.connect()
    except cluster.StartInterrupted:
        return _stopped_during_start()
    _stop_on_signals(stop)  # again: ray.init installs handlers that would end the driver
    handle = None
    try:
        if stop.is_set():
            return _stopped_during_start()
        # The control loop (a Serve deployment of the application) deploys the model
        # versions and follows the registry; the replicas get the model's config and the
        # cluster secret only: no database URL (their reservation rows are the control
        # loop's to write).
        try:
            handle = cluster.deploy(
                build_app(prepared.config, server, state_dir, database_url, prepared.secret)
            )
            status = first_pass(cluster, handle, stop, FIRST_PASS_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as exc:
            return fail(str(exc), code=1)
        if status is None:  # a signal during the deploy: nothing was served yet
            return _stopped_during_start()
        if prepared.demo_key is not None:
            print(
                f"demo model digits:1 (sklearn digits, test accuracy "
                f"{prepared.demo_accuracy:.3f}); demo tenant key: {prepared.demo_key}",
                flush=True,
            )
        if prepared.admin_token is not None:
            print(f"admin token in {state_dir / ADMIN_TOKEN_FILE} (mode 0600)", flush=True)
        names = ",".join(m.rsplit(":", 1)[0] for m in status["served"] if m.endswith(":production"))
        print(
            f"gpugate ready http={server.host}:{server.http_port} "
            f"grpc={server.host}:{server.grpc_port} metrics={server.host}:{server.metrics_port} "
            f"models={names} state={state_dir}",
            flush=True,
        )
        stop.wait()
        print("gpugate draining", flush=True)
        report = _drain(cluster, handle, server.drain_timeout_s)
        print(
            f"gpugate drained completed={report['completed']} "
            f"in_flight={report['in_flight_at_drain']}",
            flush=True,
        )
    finally:
        cluster.shutdown(started_ray)
    print("gpugate stopped", flush=True)
    return 0


def server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config file (see docs/config.md)")
    p.add_argument(
        "--state-dir",
        help=f"state folder (SQLite, demo model, demo key, admin token); default "
        f"$GPUGATE_STATE_DIR or ./{DEFAULT_STATE_DIR}",
    )
    p.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the state database (default: SQLite in the state folder; "
        "$GPUGATE_DATABASE_URL)",
    )


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="start Ray (or join RAY_ADDRESS), deploy the models and serve",
        description="Start a local Ray (or join the cluster at RAY_ADDRESS), deploy one Ray "
        "Serve deployment per model version plus the gateway, and serve KServe v2 over HTTP "
        "and gRPC. Without --config (or with no models in it) serves the demo digits "
        "classifier and prints the demo tenant's API key. Prints one 'gpugate ready' line "
        "when serving; SIGTERM/SIGINT drains in-flight requests and exits 0.",
    )
    server_options(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="KServe v2 HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, help="KServe v2 gRPC port (default 8001)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002)")
    serve.set_defaults(func=cmd_serve)
