"""The gateway: router + scheduler, hosted in a Ray Serve deployment of its own.

Like Ray Serve's "direct ingress", the replica opens the HTTP, gRPC and metrics
ports itself, so the whole system is one Serve application (``serve deploy``
and a KubeRay RayService can run it) and the router restarts under Ray's fault
tolerance. Batches are formed here, before the Ray hop, so one handle call
carries a whole batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from ray import serve
from ray.serve.handle import DeploymentHandle

from router.admin import build_admin_app
from router.metrics import RouterMetrics
from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings, ServedModel, StaticModelTable
from router.tracing import batch_span_observer
from scheduler import BatchPolicy, BatchRecord, ModelBatcher
from serving.admin_api import UserBackend, core_routes
from serving.cluster import GATEWAY_DEPLOYMENT, RayBatchBackend
from serving.config import CostsConfig, ModelConfig, ServerConfig
from serving.ledger import Ledger, LedgerWriter, Price, Pricing, from_unix_ns
from serving.replica import deployment_name, model_deployment
from serving.state import open_engine
from serving.telemetry import configure_tracing, otel_env
from serving.tenants import TenantDirectory, TenantStore

log = logging.getLogger(__name__)


REFUSAL_LINGER_S = 0.5


def _depth_of(batcher: ModelBatcher) -> Callable[[], float]:
    return lambda: float(batcher.queued_rows)


class Gateway:
    """Owns the servers, batchers and tenant cache of one gateway replica."""

    async def __init__(  # type: ignore[misc]  # Ray Serve supports async constructors
        self,
        server: dict[str, Any],
        state_dir: str,
        database_url: str | None,
        models: list[dict[str, Any]],
        handles: dict[str, DeploymentHandle],
        costs: dict[str, Any],
        otel: dict[str, str],
    ) -> None:
        self.server_config = ServerConfig.model_validate(server)
        cfg = self.server_config
        self._drained: dict[str, Any] | None = None
        self._tracer_provider = configure_tracing(otel)
        engine = open_engine(database_url, Path(state_dir))
        self._tenants = TenantDirectory(TenantStore(engine))
        self._registry = CollectorRegistry()
        self.metrics = RouterMetrics(self._registry)
        self._pricing = Pricing(CostsConfig.model_validate(costs))
        self._ledger = LedgerWriter(Ledger(engine, self._pricing))
        self._trace_batch = batch_span_observer(self._batch_cost)
        served: list[ServedModel] = []
        self._replicas: dict[tuple[str, str], int] = {}
        for raw in models:
            model = ModelConfig.model_validate(raw)
            self._replicas[(model.name, model.version)] = model.replicas
            policy = BatchPolicy(
                max_batch_size=model.max_batch_size,
                max_queue_delay_s=model.max_queue_delay_ms / 1000,
                max_in_flight=model.replicas * model.batches_in_flight_per_replica,
                max_queued_rows=model.max_queued_rows,
                max_queued_rows_per_tenant=model.max_queued_rows_per_tenant,
            )
            batcher = ModelBatcher(
                model.name,
                model.version,
                RayBatchBackend(handles[deployment_name(model)], cfg.replica_transport),
                policy,
                observer=self._observe_batch,
                ledger=self._ledger,
            )
            batcher.start()
            self.metrics.replicas.labels(model.name, model.version).set(model.replicas)
            self.metrics.queued_rows.labels(model.name, model.version).set_function(
                _depth_of(batcher)
            )
            served.append(ServedModel(model.name, model.version, model.signature(), batcher))
        self._batchers = [s.batcher for s in served]
        self.service = InferenceService(
            StaticModelTable(served),
            self._tenants,
            RouterSettings(cfg.max_request_bytes, cfg.default_timeout_ms / 1000),
            self.metrics,
        )
        admin = build_admin_app(
            UserBackend(engine), core_routes(engine, on_tenants_changed=self._tenants.invalidate)
        )
        self._doors = FrontDoors(self.service, cfg.host, cfg.max_request_bytes, admin)
        await self._doors.start(cfg.http_port, cfg.grpc_port)
        self._metrics_server, self._metrics_thread = start_http_server(
            cfg.metrics_port, cfg.host, registry=self._registry
        )
        log.info("gateway serving http=%s grpc=%s", cfg.http_port, cfg.grpc_port)

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
            ).set(self._replicas[(record.model, record.version)] * record.result.device_share)
        self._trace_batch(record)

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
        in_flight_before = self.service.in_flight
        completed = await self.service.drain(timeout_s)
        # Keep answering 503 / UNAVAILABLE a moment before closing the sockets, so
        # clients racing the shutdown get an explicit, retryable refusal, not a reset.
        await asyncio.sleep(REFUSAL_LINGER_S)
        for batcher in self._batchers:
            # Past the drain budget, queued work is failed (503), not waited for.
            await batcher.close(drain=completed)
        await self._doors.stop()
        # Every batch above has committed (or failed) by now; this ends the thread.
        await asyncio.to_thread(self._ledger.close)
        if self._tracer_provider is not None:
            await asyncio.to_thread(self._tracer_provider.shutdown)
        self._metrics_server.shutdown()
        self._drained = {"completed": completed, "in_flight_at_drain": in_flight_before}
        return self._drained


def build_app(
    server: ServerConfig,
    state_dir: Path,
    database_url: str | None,
    models: list[ModelConfig],
    costs: CostsConfig,
) -> Any:
    """The Serve application: one deployment per model version plus the gateway."""
    store = {
        "state_dir": str(state_dir),
        "database_url": database_url,
        "heartbeat_s": costs.reservation_heartbeat_s,
    }
    handles = {deployment_name(m): model_deployment(m, store) for m in models}
    return (
        serve.deployment(Gateway)
        .options(
            name=GATEWAY_DEPLOYMENT,
            num_replicas=1,
            # The gateway is I/O and Python: do not let it hold a CPU the models need.
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=16,
            graceful_shutdown_timeout_s=server.drain_timeout_s,
        )
        .bind(
            server.model_dump(mode="json"),
            str(state_dir),
            database_url,
            [m.model_dump(mode="json") for m in models],
            handles,
            costs.model_dump(mode="json"),
            otel_env(),
        )
    )
