"""``gpugate serve``: the server. A thin driver: start or join Ray, deploy the Serve
application (gateway + one deployment per model version), print one line when ready,
and on SIGTERM/SIGINT drain in-flight requests, shut down, exit 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from serving.cli.client import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from serving.config import GatewayConfig

RECONCILE_INTERVAL_S = 0.25


def _state_dir(arg: str | None, config: GatewayConfig) -> Path:
    chosen = arg or os.environ.get("GPUGATE_STATE_DIR") or config.state_dir or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().resolve()


def _database_url(arg: str | None, config: GatewayConfig) -> str | None:
    return arg or os.environ.get("GPUGATE_DATABASE_URL") or config.database_url


def _fail(message: str, code: int = 2) -> int:
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


def _stopped_during_start() -> int:
    print("gpugate stopped during start-up", flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # From the first moment: a signal during start-up (Ray's start takes seconds) stops
    # the start cleanly, with exit code 0, as one while serving does.
    stop = threading.Event()
    _stop_on_signals(stop)
    # Imported here so that the client commands start quickly (no torch, no Ray).
    from serving.config import ConfigError, ModelConfig, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
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
    state_dir = _state_dir(args.state_dir, config)
    database_url = _database_url(args.database_url, config)

    from serving.cluster import Deployer
    from serving.cluster import runtime as cluster
    from serving.dataplane import cluster_secret
    from serving.demo import demo_accuracy, ensure_demo_model
    from serving.gateway import build_app
    from serving.registry import Registry, RegistryError, Stages
    from serving.state import AuditKeyError, SchemaError, audit, open_engine
    from serving.tenancy import (
        ADMIN_TOKEN_FILE,
        TenantError,
        TenantStore,
        UserStore,
        ensure_admin,
        ensure_demo_tenant,
    )

    try:
        # The gateways' metrics ports: metrics_port + their rank on this node.
        metrics_ports = [server.metrics_port + i for i in range(server.gateway_replicas)]
        for what, port in (
            ("HTTP", server.http_port),
            ("gRPC", server.grpc_port),
            *(("metrics", p) for p in (metrics_ports if server.metrics_port else [])),
        ):
            _check_port_free(server.host, port, what)
        engine = open_engine(database_url, state_dir)
        audit.configure(engine, state_dir, **config.audit.model_dump())
        store = TenantStore(engine)
        store.upsert_from_config(config.tenants, os.environ)
        admin_token = ensure_admin(UserStore(engine), state_dir)
        models: list[ModelConfig] = list(config.models)
        demo_key = None
        if not models:
            models = [ensure_demo_model(state_dir)]
            demo_key = ensure_demo_tenant(store, state_dir)
        missing = [str(m.artifact) for m in models if not m.artifact.is_file()]
        if missing:
            raise ConfigError(f"artifact not found: {', '.join(missing)}")
        registry = Registry(engine, state_dir, config.model_copy(update={"models": models}))
        metrics = {"digits:1": {"accuracy": demo_accuracy(state_dir)}} if demo_key else {}
        Stages(registry).adopt_config_models(models, metrics)
        try:
            secret = cluster_secret(config.security.cluster_secret_file, state_dir, os.environ)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cluster secret: {exc}") from None
    except (ConfigError, TenantError, RegistryError, AuditKeyError) as exc:
        return _fail(str(exc))
    except SchemaError as exc:  # refused: the database's schema does not fit this gpugate
        return _fail(str(exc), code=1)

    if stop.is_set():
        return _stopped_during_start()
    try:
        started_ray = cluster.connect()
    except cluster.StartInterrupted:
        return _stopped_during_start()
    _stop_on_signals(stop)  # again: ray.init installs handlers that would end the driver
    deployer: Deployer | None = None
    try:
        if stop.is_set():
            return _stopped_during_start()
        # The replicas get the model's config and the cluster secret only: no database
        # URL (their reservation rows are the deployer's to write).
        deployer = Deployer(registry, secret, heartbeat_s=config.costs.reservation_heartbeat_s)
        try:
            served = deployer.prepare()
            handle = cluster.deploy(
                build_app(
                    server,
                    state_dir,
                    database_url,
                    served,
                    config.costs,
                    registry.config,
                    cluster_secret=secret,
                )
            )
        except (RuntimeError, TimeoutError) as exc:
            return _fail(str(exc), code=1)
        if stop.is_set():  # during the deploy: nothing was served yet, so nothing to drain
            return _stopped_during_start()
        if demo_key is not None:
            accuracy = demo_accuracy(state_dir)
            print(
                f"demo model digits:1 (sklearn digits, test accuracy {accuracy:.3f}); "
                f"demo tenant key: {demo_key}",
                flush=True,
            )
        if admin_token is not None:
            print(f"admin token in {state_dir / ADMIN_TOKEN_FILE} (mode 0600)", flush=True)
        names = ",".join(
            f"{m['config']['name']}:{m['config']['version']}"
            for m in served
            if m["stage"] == "production"
        )
        print(
            f"gpugate ready http={server.host}:{server.http_port} "
            f"grpc={server.host}:{server.grpc_port} metrics={server.host}:{server.metrics_port} "
            f"models={names} state={state_dir}",
            flush=True,
        )
        # The registry decides what serves: stage changes made with the CLI or the
        # admin API are deployed and routed by this loop while the gateway runs.
        while not stop.wait(RECONCILE_INTERVAL_S):
            try:
                deployer.reconcile(handle)
            except Exception as exc:  # keep serving what runs; try again next pass
                print(f"gpugate: reconcile failed: {exc}", file=sys.stderr, flush=True)
        print("gpugate draining", flush=True)
        try:
            reports = cluster.broadcast(
                handle, "drain", server.drain_timeout_s, timeout_s=server.drain_timeout_s + 30
            )
            report = {
                "completed": all(r["completed"] for r in reports),
                "in_flight_at_drain": sum(r["in_flight_at_drain"] for r in reports),
            }
        except Exception as exc:  # a gateway died or hung: still shut down cleanly
            print(f"gpugate: drain failed: {exc}", file=sys.stderr, flush=True)
            report = {"completed": False, "in_flight_at_drain": "unknown"}
        print(
            f"gpugate drained completed={report['completed']} "
            f"in_flight={report['in_flight_at_drain']}",
            flush=True,
        )
    finally:
        try:
            cluster.shutdown(started_ray)
        finally:
            if deployer is not None:  # the replicas are gone: end their reservations
                deployer.close()
    print("gpugate stopped", flush=True)
    return 0


def _server_options(p: argparse.ArgumentParser) -> None:
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
    _server_options(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="KServe v2 HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, help="KServe v2 gRPC port (default 8001)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002)")
    serve.set_defaults(func=cmd_serve)
