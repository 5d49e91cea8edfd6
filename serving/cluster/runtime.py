"""The one thin wrapper around Ray and Ray Serve.

Everything in gpugate that touches Ray goes through here: starting or joining
the cluster, deploying the Serve application, the per-batch handle call, and
shutting down. Tests of the router and scheduler never import this module.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from scheduler import (
    Backend,
    BackendError,
    BackendUnavailableError,
    BatchResult,
    Share,
    Tensors,
)
from serving.dataplane import ClusterSecret, DirectBatchBackend

log = logging.getLogger(__name__)

APP_NAME = "gpugate"
GATEWAY_DEPLOYMENT = "gateway"
CONTROL_DEPLOYMENT = "control"
# Credentials the driver has read by the time it starts Ray, and that a local Ray's
# workers (model replicas: model code) would otherwise inherit from its environment.
# The gateway gets what it needs as deployment arguments.
PRIVATE_ENV = ("GPUGATE_DATABASE_URL", "GPUGATE_CLUSTER_SECRET")


class RayBatchBackend:
    """scheduler.Backend over a Ray Serve handle: one handle call per batch.

    ``transport="grpc"`` sends each batch over Ray Serve's inter-deployment gRPC
    transport (``_by_reference=False``) instead of a Ray actor call, which is faster
    per call (docs/benchmarks.md). A dead replica still surfaces as
    ActorUnavailableError.
    """

    def __init__(self, handle: DeploymentHandle, transport: str = "grpc") -> None:
        self._handle = handle.options(_by_reference=False) if transport == "grpc" else handle

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        # ``urgent`` and ``shares`` cannot reorder a Serve handle's calls at the replica:
        # a lane batch still goes out at once, and batches run in the order the replica
        # takes its calls (fair within each gateway, not across gateways).
        try:
            result: BatchResult = await self._handle.run_batch.remote(inputs)
        except (RayActorError, ActorUnavailableError) as exc:
            log.warning("replica unavailable: %s", _short(exc))
            raise BackendUnavailableError("no model replica is available") from exc
        except Exception as exc:  # task errors, the model's own exception
            # The detail (paths, model internals) goes to the log, not to the caller.
            log.warning("batch failed on the replica: %s", _short(exc))
            raise BackendError("the model failed to run the batch") from exc
        return result


def check_state_host(database_url: str | None, state_host: str | None) -> None:
    """Refuse to run a gateway or the control loop on another host than the embedded
    SQLite state it would use: that file is on ``state_host`` (where the application was
    built), and a copy made here would serve other tenants, keys and models, and keep
    a ledger of its own. A cluster of several hosts needs a shared database."""
    here = socket.gethostname()
    if database_url is None and state_host is not None and state_host != here:
        raise RuntimeError(
            f"the embedded SQLite state is on host {state_host!r}, and this replica runs on "
            f"{here!r}: a cluster of several hosts needs a shared database; set "
            "GPUGATE_DATABASE_URL (PostgreSQL) where the application is deployed"
        )


def batch_backend(
    handle: DeploymentHandle,
    transport: str,
    replicas: int = 1,
    secret: ClusterSecret | None = None,
) -> Backend:
    """The backend of one model version's batcher for ``server.replica_transport``.

    ``direct``: Serve runs the replicas and tells each one's data-plane address
    (a handle call), the batches go there over TCP after the handshake that proves
    ``secret`` (serving.dataplane).
    """
    if transport != "direct":
        return RayBatchBackend(handle, transport)
    if secret is None:
        raise ValueError("the direct data plane needs the cluster secret")
    node_id = ray.get_runtime_context().get_node_id()

    async def discover() -> str:
        try:
            address: str = await handle.data_endpoint.remote(node_id)
        except (RayActorError, ActorUnavailableError) as exc:
            raise BackendUnavailableError("no model replica is available") from exc
        return address

    return DirectBatchBackend(discover, secret, expected_replicas=replicas)


def _short(exc: BaseException) -> str:
    # Ray wraps the replica's traceback into the message; callers need the last line.
    text = str(exc).strip().splitlines()
    return text[-1][:500] if text else type(exc).__name__


class StartInterrupted(Exception):
    """SIGTERM arrived while Ray was starting; what had started is stopped again."""


def connect(num_cpus: int | None = None, address: str | None = None) -> bool:
    """Join the cluster at ``address`` (else RAY_ADDRESS), or start a local one. True if
    we started it.

    ``ray.init`` installs a SIGTERM handler that ends the driver with
    ``sys.exit(SIGTERM)`` wherever it is; that exit is turned into
    :class:`StartInterrupted` after Ray is shut down, so the caller can stop cleanly.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's own dashboard and usage stats are not part of the gateway's contract.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        options: dict[str, Any] = {"address": address}
    else:
        options = {"num_cpus": num_cpus, "include_dashboard": False}
        for name in PRIVATE_ENV:
            os.environ.pop(name, None)
        # Ray starts workers at nice 15, below the clients on the same host; for a
        # serving system the workers (gateway, replicas) are the work.
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(**options, logging_level=logging.WARNING, log_to_driver=False)
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        ray.shutdown()
        raise StartInterrupted("SIGTERM while Ray was starting") from None
    return not address


def deploy(app: Any, blocking_timeout_s: float = 300.0, name: str = APP_NAME) -> DeploymentHandle:
    """Start Serve without its HTTP/gRPC proxy (the gateway opens the ports) and run the
    application ``name``, waiting until it is running."""
    serve.start(proxy_location="Disabled")
    deadline = time.monotonic() + blocking_timeout_s
    try:
        handle: DeploymentHandle = serve.run(app, name=name, route_prefix=None, blocking=False)
    except RuntimeError as exc:
        raise RuntimeError(f"{_short(exc)}{_failure_detail(name)}") from None
    while True:
        status = serve.status().applications.get(name)
        state = str(status.status) if status else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return handle
        if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
            message = status.message if status else state
            raise RuntimeError(f"deploy of {name} failed: {message}{_failure_detail(name)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not running after {blocking_timeout_s:.0f}s: {state}")
        time.sleep(0.2)


def _failure_detail(name: str) -> str:
    """Why the replicas of an application failed: the last line of each deployment's
    message (the replica constructor's exception), which Serve's own error omits."""
    status = serve.status().applications.get(name)
    if status is None:
        return ""
    parts = []
    for deployment, info in status.deployments.items():
        lines = [line for line in str(info.message).strip().splitlines() if line.strip()]
        if lines:
            parts.append(f"{deployment}: {lines[-1].strip()[:500]}")
    return ("; " + "; ".join(parts)) if parts else ""


def gateway_handle() -> DeploymentHandle:
    """The gateway deployment of the ``gpugate`` application."""
    return serve.get_deployment_handle(GATEWAY_DEPLOYMENT, app_name=APP_NAME)


def delete(name: str) -> None:
    """Remove one application and wait until its replicas are gone."""
    serve.delete(name, _blocking=True)


def applications(prefix: str) -> list[str]:
    return sorted(a for a in serve.status().applications if a.startswith(prefix))


def call(handle: DeploymentHandle, method: str, *args: Any, timeout_s: float = 60.0) -> Any:
    """Call a gateway method from the driver and wait for the answer."""
    return getattr(handle, method).remote(*args).result(timeout_s=timeout_s)


def broadcast(
    handle: DeploymentHandle, method: str, *args: Any, timeout_s: float = 60.0
) -> list[Any]:
    """Call ``method`` on every replica of the deployment (each gateway) and wait for
    every answer; the first replica's failure is raised."""
    answers: list[Any] = handle.broadcast(method, *args).results(timeout_s=timeout_s)
    return answers


def call_spread(handle: DeploymentHandle, method: str, calls: int, timeout_s: float) -> list[Any]:
    """``calls`` concurrent calls of ``method``, which Serve spreads over the
    deployment's replicas; the answers that came, failures left out (logged)."""
    responses = [getattr(handle, method).remote() for _ in range(calls)]
    answers = []
    for response in responses:
        try:
            answers.append(response.result(timeout_s=timeout_s))
        except Exception as exc:  # a replica stopping or not ready: asked again later
            log.info("%s on a replica failed: %s", method, _short(exc))
    return answers


_REPLICA_ACTOR = "SERVE_REPLICA::"


def replica_ids(app: str, deployment: str) -> set[str]:
    """Serve's ids of the live replicas of one deployment: its replicas are named
    actors ``SERVE_REPLICA::<app>#<deployment>#<id>``, listed while alive."""
    prefix = f"{_REPLICA_ACTOR}{app}#{deployment}#"
    return {
        a["name"][len(prefix) :]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    }


def disconnect() -> None:
    """Leave the cluster; what was deployed stays (Serve's controller owns it)."""
    ray.shutdown()


def shutdown(started_ray: bool) -> None:
    """Remove our application; with a local Ray we started, stop Serve and Ray too."""
    try:
        if started_ray:
            serve.shutdown()
        else:
            # The model versions are applications of their own (serving.cluster.deployer).
            for name in [APP_NAME, *applications(APP_NAME + "-")]:
                serve.delete(name)
    finally:
        if started_ray:
            ray.shutdown()
