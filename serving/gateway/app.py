"""The gateway: router + scheduler, hosted in a Ray Serve deployment of its own.

Like Ray Serve's "direct ingress", the replica opens the HTTP, gRPC and metrics
ports itself, and the router restarts under Ray's fault tolerance. Model
versions are Serve applications of their own, which the ``gpugate serve``
driver adds and removes as the registry's stages change (serving.cluster.deployer);
the gateway reaches them by name and swaps its model table in one step.
Batches are formed here, before the Ray hop, so one handle call carries a
whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
from prometheus_client import CollectorRegistry, start_http_server
from ray import serve

import serving.gateway.gc_tuning as gc_tuning
from router.metrics import RouterMetrics
from router.model_table import LiveModelTable
from router.quota import REBALANCE_S, Key, rebalance
from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings, ServedModel
from router.tracing import batch_span_observer
from scheduler import BatchPolicy, BatchRecord, ModelBatcher
from serving.admin import AdminServices, admin_app
from serving.budgets import BudgetStore, publish
from serving.cluster import (
    CONTROL_DEPLOYMENT,
    GATEWAY_DEPLOYMENT,
    Control,
    batch_backend,
    check_state_host,
)
from serving.config import NODE_HOST, CostsConfig, GatewayConfig, ModelConfig, ServerConfig
from serving.console import console_app
from serving.costs import Ledger, LedgerReports, LedgerWriter, Price, Pricing, from_unix_ns
from serving.dataplane import ClusterSecret, DirectBatchBackend
from serving.gateway.bootstrap import from_args
from serving.gateway.telemetry import configure_tracing, otel_env
from serving.registry import Registry, Stages
from serving.replica import deployment_name
from serving.rollout import RolloutController, Rollouts, Taken
from serving.state import audit, open_engine
from serving.tenancy import (
    QuotaStore,
    ServerCaps,
    SessionStore,
    TenantDirectory,
    TenantStore,
    TenantViews,
)

log = logging.getLogger(__name__)

# The budget gauges' spend and forecast are read every this many budget checks.
BUDGET_SPEND_EVERY = 6


REFUSAL_LINGER_S = 0.5
# Ray's own resource of the head node (1 there, absent elsewhere).
HEAD_NODE_RESOURCE = "node:__internal_head__"


def _depth_of(batcher: ModelBatcher) -> Callable[[], float]:
    return lambda: float(batcher.queued_rows)


def _replicas_of(backend: object, model: ModelConfig) -> Callable[[], float]:
    """The replicas the gateway sends to (the direct data plane knows them, autoscaled
    ones included), else the configured count."""
    if isinstance(backend, DirectBatchBackend):
        return lambda: float(len(backend.addresses) or model.replicas)
    return lambda: float(model.replicas)


def _node_address() -> str:
    """The address this gateway's Ray node was started with (``--node-ip-address``)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return str(node["NodeManagerAddress"])
    return str(ray.util.get_node_ip_address())


def _rank() -> tuple[int, int]:
    """This gateway replica's rank among the gateways, and among those on its node."""
    rank = serve.get_replica_context().rank
    return rank.rank, rank.local_rank


async def _models_from_control(timeout_s: float) -> list[dict[str, Any]] | None:
    """The model set the control loop has sent the gateways, once it has made its first
    pass; None if it has not within ``timeout_s`` (the next sync brings it)."""
    context = serve.get_replica_context()
    control = serve.get_deployment_handle(CONTROL_DEPLOYMENT, app_name=context.app_name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found: list[dict[str, Any]] | None = await control.models.remote()
        except Exception as exc:  # not running yet, or being replaced
            log.info("waiting for the control loop: %s", exc)
            found = None
        if found is not None:
            return found
        await asyncio.sleep(0.5)
    log.warning(
        "no model set from the control loop in %.0fs; not ready until it sends one", timeout_s
    )
    return None


class GatewayPeers:
    """The gateway replicas of one deployment, seen from one of them: the one of rank 0
    leads the rollout analysis, gathering every replica's windows with a Serve
    broadcast (serving.rollout.controller.Peers)."""

    GATHER_TIMEOUT_S = 10.0

    def leads(self) -> bool:
        return _rank()[0] == 0

    async def gather(self, model: str, versions: tuple[str, str]) -> list[Taken]:
        context = serve.get_replica_context()
        handle = serve.get_deployment_handle(context.deployment, app_name=context.app_name)
        answers = await handle.broadcast("take_windows", model, versions).results_async(
            timeout_s=self.GATHER_TIMEOUT_S, return_exceptions=True
        )
        taken: list[Taken] = []
        for answer in answers:
            if isinstance(answer, BaseException):  # a replica stopping: its window is lost
                log.warning("rollout windows of a gateway replica not gathered: %s", answer)
            else:
                taken.append(answer)
        return taken

    async def _broadcast(self, method: str, *args: Any) -> list[Any]:
        context = serve.get_replica_context()
        handle = serve.get_deployment_handle(context.deployment, app_name=context.app_name)
        answers: list[Any] = await handle.broadcast(method, *args).results_async(
            timeout_s=self.GATHER_TIMEOUT_S, return_exceptions=True
        )
        return [a for a in answers if not isinstance(a, BaseException)]

    async def share_quotas(self) -> None:
        """Every gateway's demand on each rate quota since the last call, then each one's
        share in proportion (router.quota.rebalance): led by rank 0."""
        demands: list[tuple[int, dict[Key, float]]] = await self._broadcast("quota_demand")
        if not demands:
            return
        shares = rebalance(demand for _, demand in demands)
        await self._broadcast(
            "quota_shares", {rank: share for (rank, _), share in zip(demands, shares, strict=True)}
        )


class Gateway:
    """Owns the servers, batchers and tenant cache of one gateway replica."""

    async def __init__(  # type: ignore[misc]  # Ray Serve supports async constructors
        self,
        server: dict[str, Any],
        state_dir: str,
        database_url: str | None,
        models: list[dict[str, Any]],
        costs: dict[str, Any],
        otel: dict[str, str],
        registry: dict[str, Any] | None = None,
        cluster_secret: ClusterSecret | None = None,
        state_host: str | None = None,
    ) -> None:
        check_state_host(database_url, state_host)
        self._cluster_secret = cluster_secret  # proves the gateway to the replicas
        self.server_config = ServerConfig.model_validate(server)
        cfg = self.server_config
        self._drained: dict[str, Any] | None = None
        self._tracer_provider = configure_tracing(otel)
        engine = open_engine(database_url, Path(state_dir))
        self._pricing = Pricing(CostsConfig.model_validate(costs))
        self._budgets = budgets = BudgetStore(engine, self._pricing)
        self._tenants = TenantDirectory(
            TenantStore(engine), QuotaStore(engine), guard=budgets.guard
        )
        self._registry = CollectorRegistry()
        self.metrics = RouterMetrics(self._registry)
        self._ledger = LedgerWriter(Ledger(engine, self._pricing))
        self._trace_batch = batch_span_observer(self._batch_cost)
        self._served: dict[tuple[str, str], ServedModel] = {}
        self._stages: dict[tuple[str, str], str] = {}
        # Each version's replica count: live where the backend knows its replicas.
        self._replicas: dict[tuple[str, str], Callable[[], float]] = {}
        self._table = LiveModelTable()
        self._sync_lock = asyncio.Lock()
        if not models:
            # Deployed by the control loop: serve what the other gateways serve before
            # opening the ports, so that a gateway that starts beside running ones (a
            # scale-up, a rolling restart) takes no connection it cannot serve.
            models = await _models_from_control(self.server_config.drain_timeout_s * 10) or []
        await self.sync_models(models)
        self.service = InferenceService(
            self._table,
            self._tenants,
            RouterSettings(
                cfg.max_request_bytes,
                cfg.default_timeout_ms / 1000,
                tenant_max_requests_in_flight=cfg.tenant_max_requests_in_flight,
                tenant_max_bytes_in_flight=cfg.tenant_max_bytes_in_flight,
                grpc_body_timeout_s=cfg.grpc_body_timeout_s,
                refusal_hold_s=cfg.grpc_refusal_hold_s,
                refusal_hold_max_per_tenant=cfg.grpc_refusal_hold_max_per_tenant,
            ),
            self.metrics,
        )
        # Not ready until the control loop sends a set, if it had none to give yet.
        self.service.has_models = bool(models)
        # The registry's rules are the gateway's own config: every register, approval and
        # promotion, from the admin API or the rollout controller, follows its policies.
        registry_config = GatewayConfig.model_validate(registry or {})
        audit.configure(engine, Path(state_dir), **registry_config.audit.model_dump())
        stages = Stages(Registry(engine, Path(state_dir), registry_config))
        # Several gateways: one analyses (rank 0), on every gateway's windows.
        peers = GatewayPeers() if cfg.gateway_replicas > 1 else None
        self._rollouts = RolloutController(
            Rollouts(stages), self._table, self.service.windows, self.metrics, peers=peers
        )
        self._rollouts.start()
        self._budget_task = asyncio.create_task(
            self._watch_budgets(CostsConfig.model_validate(costs).budget_check_s),
            name="gpugate-budget-alerts",
        )
        # Several gateways share each rate quota: an even split until the first rebalance.
        self.service.quotas.default_share = 1 / cfg.gateway_replicas
        self._quota_task = (
            asyncio.create_task(_share_quotas(peers), name="gpugate-quota-shares")
            if peers is not None
            else None
        )
        services = AdminServices.open(
            engine,
            Path(state_dir),
            registry_config,
            self._pricing,
            on_tenants_changed=self._tenants.invalidate,
        )
        apps: dict[str, Any] = {"/admin": admin_app(services)}
        if cfg.console.enabled:
            ttl = timedelta(seconds=cfg.console.session_ttl_s)
            sessions = SessionStore(engine, services.directory, ttl=ttl)
            apps["/console"] = console_app(
                apps["/admin"], sessions, secure_cookies=cfg.console.secure_cookies
            )
        reports = LedgerReports(engine, self._pricing)
        caps = ServerCaps(cfg.tenant_max_requests_in_flight, cfg.tenant_max_bytes_in_flight)
        # "node": the address of the Ray node this gateway runs on (one gateway per node,
        # each behind the balancer on its own address).
        self.host = _node_address() if cfg.host == NODE_HOST else cfg.host
        self._doors = FrontDoors(
            self.service,
            self.host,
            cfg.max_request_bytes,
            apps,
            reports,
            grpc_server=cfg.grpc_server,
            tls=cfg.tls.files() if cfg.tls is not None else None,
            max_concurrent_streams=cfg.grpc_max_concurrent_streams,
            max_concurrent_calls=cfg.grpc_max_concurrent_calls,
            http_limits=cfg.http.door_limits(),
            # Several gateways on one node share the ports, and a replacement can start
            # beside the replica it replaces. Only then: SO_REUSEPORT would as gladly
            # share a port with any other server of the same user. `gpugate serve`
            # checks the ports are free first.
            reuse_port=cfg.gateway_replicas > 1,
            tenant_view=TenantViews.open(engine, stages, reports, caps, budget=budgets.summary),
        )
        await self._doors.start(cfg.http_port, cfg.grpc_port)
        # Each gateway on a node scrapes apart: metrics_port + its rank on the node.
        self.metrics_port = cfg.metrics_port + _rank()[1] if cfg.metrics_port else 0
        self._metrics_server, self._metrics_thread = start_http_server(
            self.metrics_port, self.host, registry=self._registry
        )
        if cfg.gc_tuning:
            gc_tuning.settle()
        log.info(
            "gateway serving http=%s grpc=%s metrics=%s (%s)",
            cfg.http_port,
            cfg.grpc_port,
            self.metrics_port,
            self._doors.grpc_server,
        )

    def _start_batcher(self, model: ModelConfig, app: str) -> ServedModel:
        policy = BatchPolicy(
            max_batch_size=model.max_batch_size,
            max_queue_delay_s=model.max_queue_delay_ms / 1000,
            # An autoscaled version gets the slots of its most replicas: the rows these
            # put at the replicas are what makes Serve add replicas.
            max_in_flight=model.max_replicas * model.batches_in_flight_per_replica,
            max_queued_rows=model.max_queued_rows,
            max_queued_rows_per_tenant=model.max_queued_rows_per_tenant,
            latency_lane_rows=model.latency_lane_rows,
        )
        handle = serve.get_deployment_handle(deployment_name(model), app_name=app)
        backend = batch_backend(
            handle, self.server_config.replica_transport, model.max_replicas, self._cluster_secret
        )
        batcher = ModelBatcher(
            model.name,
            model.version,
            backend,
            policy,
            observer=self._observe_batch,
            ledger=self._ledger,
        )
        batcher.start()
        replicas = self._replicas[(model.name, model.version)] = _replicas_of(backend, model)
        self.metrics.replicas.labels(model.name, model.version).set_function(replicas)
        self.metrics.queued_rows.labels(model.name, model.version).set_function(_depth_of(batcher))
        return ServedModel(
            model.name,
            model.version,
            model.signature(),
            batcher,
            replicas=model.replicas,
            gpus_per_replica=model.num_gpus,
        )

    async def sync_models(self, models: list[dict[str, Any]]) -> list[str]:
        """Serve exactly ``models`` ({"config", "stage", "app"} each) from now on.

        New versions get a batcher first; then the table is swapped in one step, so
        every request after it routes to the new production version; then the
        versions no longer wanted are drained (their queued and running batches
        finish) before this returns and the driver removes their deployments.
        """
        async with self._sync_lock:
            wanted: dict[tuple[str, str], tuple[ModelConfig, str, str]] = {}
            for item in models:
                cfg = ModelConfig.model_validate(item["config"])
                wanted[(cfg.name, cfg.version)] = (cfg, item["stage"], item["app"])
            for key, (cfg, stage, app) in list(wanted.items()):
                if key not in self._served:
                    try:
                        self._served[key] = self._start_batcher(cfg, app)
                    except Exception as exc:
                        # E.g. a restarted gateway replica given its first, stale set:
                        # serve the rest; the driver's next sync brings the current set.
                        log.warning("cannot serve %s:%s: %s", cfg.name, cfg.version, exc)
                        del wanted[key]
                        continue
                self._stages[key] = stage
            gone = [self._served.pop(key) for key in list(self._served) if key not in wanted]
            for served in gone:
                self._stages.pop((served.name, served.version), None)
            self._table.swap(
                [m for k, m in self._served.items() if self._stages[k] == "production"],
                [m for k, m in self._served.items() if self._stages[k] == "staging"],
            )
            for served in gone:
                await served.batcher.close(drain=True)
                for gauge in (self.metrics.replicas, self.metrics.queued_rows):
                    with contextlib.suppress(KeyError):
                        gauge.remove(served.name, served.version)
                self._replicas.pop((served.name, served.version), None)
                log.info("model %s:%s removed from the gateway", served.name, served.version)
            if hasattr(self, "service"):  # not the first set, given to the constructor
                self.service.has_models = True
            return sorted(f"{n}:{v}:{self._stages[(n, v)]}" for n, v in self._served)

    def _price(self, record: BatchRecord) -> Price:
        assert record.result is not None
        return self._pricing.price(record.result.device, from_unix_ns(record.finished_at_ns).date())

    def _batch_cost(self, record: BatchRecord) -> float:
        return self._price(record).cost(record.charge_ns)

    def _observe_batch(self, record: BatchRecord) -> None:
        self.metrics.observe_batch(record)
        if record.result is not None:
            price = self._price(record)
            self.metrics.observe_charges(record, price.currency, price.cost)
            self.metrics.reserved_devices.labels(
                record.model, record.version, record.result.device
            ).set(self._replicas[(record.model, record.version)]() * record.result.device_share)
        self._trace_batch(record)

    async def _watch_budgets(self, every_s: float) -> None:
        """The budget gauges (serving.budgets.publish): the thresholds crossed each
        ``every_s`` (the control loop records them), the amounts, spend and forecasts
        every :data:`BUDGET_SPEND_EVERY` passes (each reads the ledger per budget)."""
        passes = 0
        while True:
            try:
                spend_too = passes % BUDGET_SPEND_EVERY == 0
                await asyncio.to_thread(publish, self._budgets, self.metrics, spend_too)
            except Exception as exc:  # the state database is down: try again later
                log.warning("budget gauges not updated: %s", exc)
            passes += 1
            await asyncio.sleep(every_s)

    def quota_demand(self) -> tuple[int, dict[Key, float]]:
        """This gateway's rank and the demand on each rate quota since the last call."""
        return _rank()[0], self.service.quotas.take_demand()

    def quota_shares(self, by_rank: dict[int, dict[Key, float]]) -> None:
        """This gateway's shares of the rate quotas, from the leader's rebalance."""
        shares = by_rank.get(_rank()[0])
        if shares is not None:
            self.service.quotas.set_shares(shares, 1 / max(1, len(by_rank)))

    def take_windows(self, model: str, versions: tuple[str, str]) -> Taken:
        """This gateway's rollout window of ``versions`` since the last take, which
        starts a new one (the leader's :class:`GatewayPeers` gathers them)."""
        return self.service.windows.take(model, versions)

    def check_health(self) -> None:
        """Serve's health probe: a dead front door makes the replica restart."""
        if not self._doors.healthy:
            raise RuntimeError("HTTP server stopped")

    async def __del__(self) -> None:
        """Serve calls this on graceful shutdown (rollouts, scale-down, restarts)."""
        await self.drain(self.server_config.drain_timeout_s)

    async def drain(self, timeout_s: float) -> dict[str, Any]:
        """Refuse new requests, finish the in-flight ones, then close the servers."""
        if self._drained is not None:
            return self._drained
        await self._rollouts.stop()
        if self._quota_task is not None:
            self._quota_task.cancel()
        self._budget_task.cancel()
        await self.service.cancel_shadows()  # mirrored work is optional; clients' is not
        in_flight_before = self.service.in_flight
        completed = await self.service.drain(timeout_s)
        # Keep answering 503 / UNAVAILABLE a moment before closing the sockets, so
        # clients racing the shutdown get an explicit, retryable refusal, not a reset.
        await asyncio.sleep(REFUSAL_LINGER_S)
        for batcher in [m.batcher for m in self._served.values()]:
            # Past the drain budget, queued work is failed (503), not waited for.
            await batcher.close(drain=completed)
        await self._doors.stop()
        await self._tenants.close()  # the keys' last-used times noted since the last write
        # Every batch above has committed (or failed) by now; this ends the thread.
        await asyncio.to_thread(self._ledger.close)
        if self._tracer_provider is not None:
            await asyncio.to_thread(self._tracer_provider.shutdown)
        await asyncio.to_thread(self._metrics_server.shutdown)  # waits up to its poll interval
        self._drained = {"completed": completed, "in_flight_at_drain": in_flight_before}
        return self._drained


async def _share_quotas(peers: GatewayPeers) -> None:
    """The leader's rebalance of the rate quotas, every REBALANCE_S, for good."""
    while True:
        await asyncio.sleep(REBALANCE_S)
        if not peers.leads():
            continue
        try:
            await peers.share_quotas()
        except Exception as exc:  # the next round tries again; shares stay as they are
            log.warning("rate quota shares not rebalanced: %s", exc)


def gateway_actor_options(server: ServerConfig) -> dict[str, Any]:
    """The gateway is I/O and Python: it holds no CPU a model needs. Its custom
    resources (``server.gateway_resources``) pin it to the node whose pod serves
    the ports."""
    options: dict[str, Any] = {"num_cpus": 0}
    if server.gateway_resources:
        options["resources"] = dict(server.gateway_resources)
    return options


def build_app(
    config: GatewayConfig,
    server: ServerConfig,
    state_dir: Path,
    database_url: str | None,
    cluster_secret: ClusterSecret,
) -> Any:
    """The ``gpugate`` Serve application: the control loop (its ingress, one replica)
    and ``server.gateway_replicas`` gateways. The gateways start with no models and are
    not ready until the control loop sends them the set it has deployed; each model
    version is an application of its own, which the control loop adds and removes
    (serving.cluster.deployer), so versions come and go without redeploying this one.
    ``config``'s models (serving knobs) and policies are the rules the registry applies
    to what the admin API registers, approves and promotes."""
    wanted = {"models", "policies", "audit"}
    registry_config = config.model_dump(mode="json", include=wanted)
    # The embedded SQLite state is a file on this host: replicas elsewhere refuse it.
    state_host = socket.gethostname() if database_url is None else None
    gateway = (
        serve.deployment(Gateway)
        .options(
            name=GATEWAY_DEPLOYMENT,
            num_replicas=server.gateway_replicas,
            ray_actor_options=gateway_actor_options(server),
            max_ongoing_requests=16,
            graceful_shutdown_timeout_s=server.drain_timeout_s,
        )
        .bind(
            server.model_dump(mode="json"),
            str(state_dir),
            database_url,
            [],
            config.costs.model_dump(mode="json"),
            otel_env(),
            registry_config,
            cluster_secret,
            state_host,
        )
    )
    return (
        serve.deployment(Control)
        .options(
            name=CONTROL_DEPLOYMENT,
            num_replicas=1,
            # On the head node, which holds the state database's credentials (and
            # takes no gateway resource from the gateways).
            ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
            max_ongoing_requests=8,
        )
        .bind(
            gateway,
            config.model_dump(mode="json"),
            str(state_dir),
            database_url,
            cluster_secret,
            state_host=state_host,
        )
    )


def application(args: dict[str, Any]) -> Any:
    """Ray Serve's entry point for a Serve config (``serve deploy``, a RayService's
    ``serveConfigV2``; ``gpugate config render`` writes one): ``args`` are ``config``
    (the gpugate config as a mapping) and ``state_dir``. The state is brought in line
    first (serving.gateway.bootstrap); the database URL and the cluster secret come from
    this process's environment or the files the config names, never from the args."""
    prepared = from_args(args)
    config = prepared.config
    return build_app(
        config, config.server, prepared.state_dir, prepared.database_url, prepared.secret
    )
