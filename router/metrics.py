"""Prometheus series of the request path (names: gpugate_ prefix, base units).

Tenant is a label: tens to hundreds of tenants are fine; thousands would make
each histogram family large enough to slow scrapes (document before growing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler import BatchRecord

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Load(Protocol):
    requests: int
    bytes: int


class _TenantLoads(Collector):
    """Per-tenant requests and input bytes in flight, read at scrape time (nothing is
    done per request). A tenant with nothing in flight has no sample."""

    def __init__(self) -> None:
        self.loads: Callable[[], Mapping[str, Load]] = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        requests = GaugeMetricFamily(
            "gpugate_tenant_requests_in_flight",
            "A tenant's admitted inference requests not yet answered (its in-flight cap "
            "counts these); tenants with none are absent.",
            labels=["tenant"],
        )
        size = GaugeMetricFamily(
            "gpugate_tenant_bytes_in_flight",
            "Input tensor bytes of a tenant's requests in flight (its byte cap counts these).",
            labels=["tenant"],
        )
        for tenant, load in sorted(self.loads().items()):
            requests.add_metric([tenant], load.requests)
            size.add_metric([tenant], load.bytes)
        yield requests
        yield size


class RouterMetrics:
    """All series live in one registry; ``None`` makes a private one (tests)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[Any, ...], Any] = {}
        r = self.registry
        self.requests = Counter(
            "gpugate_requests",
            "Inference requests by model, version, tenant and HTTP-equivalent status code.",
            ["model", "version", "tenant", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "gpugate_request_duration_seconds",
            "Inference request latency inside the gateway, from decode to response.",
            ["model", "version", "tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "gpugate_batch_size_rows",
            "Rows per batch sent to a replica.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "gpugate_queue_wait_seconds",
            "Time a request waited in its tenant queue before its batch was sent.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "gpugate_batch_duration_seconds",
            "Round trip of a batch from dispatch to result (Ray hop + forward).",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.device_seconds = Counter(
            "gpugate_batch_device_seconds",
            "Measured device time of batches (forward pass), by model and version.",
            ["model", "version", "device"],
            registry=r,
        )
        self.lane_batches = Counter(
            "gpugate_lane_batches",
            "Latency-lane batches: small urgent batches of lightly loaded tenants sent "
            "while every ordinary batch slot was taken.",
            ["model", "version"],
            registry=r,
        )
        self.batch_failures = Counter(
            "gpugate_batch_failures",
            "Batches the replica failed to run.",
            ["model", "version"],
            registry=r,
        )
        self.tenant_device_seconds = Counter(
            "gpugate_tenant_device_seconds",
            "Device time charged to tenants (batch device time x device share, split by rows).",
            ["tenant", "model", "version", "device"],
            registry=r,
        )
        self.tenant_cost = Counter(
            "gpugate_tenant_cost",
            "Cost charged to tenants at the configured device-hour prices.",
            ["tenant", "model", "version", "currency"],
            registry=r,
        )
        self.replicas = Gauge(
            "gpugate_replicas",
            "Model replicas per version that this gateway sends batches to.",
            ["model", "version"],
            registry=r,
        )
        self.reserved_devices = Gauge(
            "gpugate_reserved_devices",
            "Devices held by a version's replicas (replicas x device share), as last reported "
            "by a batch; with tenant device seconds it gives the idle share.",
            ["model", "version", "device"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "gpugate_shadow_requests",
            "Mirrored requests to a rollout's candidate, by outcome: compared (answer "
            "compared with production's), error (the candidate failed it), dropped (not sent).",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.shadow_agreement = Gauge(
            "gpugate_shadow_agreement_ratio",
            "Share of mirrored rows whose candidate answer agreed with production's, in the "
            "rollout's last analysis window.",
            ["model", "version"],
            registry=r,
        )
        self.rollout_step = Gauge(
            "gpugate_rollout_step",
            "Current step (1-based) of a model's rollout; 0 once it ended.",
            ["model", "candidate"],
            registry=r,
        )
        self.rollout_weight = Gauge(
            "gpugate_rollout_weight_ratio",
            "Share of a model's default traffic routed to each version by its rollout.",
            ["model", "version"],
            registry=r,
        )
        self.budget_amount = Gauge(
            "gpugate_tenant_budget_amount",
            "A tenant's budget per period, in its unit (a currency code, or device_hours).",
            ["tenant", "unit"],
            registry=r,
        )
        self.budget_spent = Gauge(
            "gpugate_tenant_budget_spent",
            "A tenant's spend so far this budget period, in the budget's unit.",
            ["tenant", "unit"],
            registry=r,
        )
        self.budget_forecast = Gauge(
            "gpugate_tenant_budget_forecast",
            "A tenant's spend at the end of its budget period at the rate so far.",
            ["tenant", "unit"],
            registry=r,
        )
        self.budget_alerts = Gauge(
            "gpugate_tenant_budget_alert",
            "1 for each budget threshold (percent) a tenant has crossed in its current period.",
            ["tenant", "threshold"],
            registry=r,
        )
        self.rollout_state = Gauge(
            "gpugate_rollout_state",
            "1 for the rollout's current state (running, paused, succeeded, failed, aborted).",
            ["model", "candidate", "state"],
            registry=r,
        )
        self.rollout_analyses = Counter(
            "gpugate_rollout_analyses",
            "Rollout analyses by verdict: pass (advance), fail, wait (too few requests).",
            ["model", "candidate", "verdict"],
            registry=r,
        )
        self.queued_rows = Gauge(
            "gpugate_queue_rows",
            "Rows waiting per model version.",
            ["model", "version"],
            registry=r,
        )
        self.admission_refusals = Counter(
            "gpugate_admission_refusals",
            "Requests a tenant sent that admission refused, by reason: requests_in_flight "
            "and bytes_in_flight (the tenant's caps, 429), queue_full (the version's or the "
            "tenant's queue, 429), request_bytes (one request larger than the tenant's byte "
            "cap, 413), priority (a level not granted to the tenant, 403).",
            ["tenant", "reason"],
            registry=r,
        )
        self._tenant_loads = _TenantLoads()
        r.register(self._tenant_loads)
        # Read at scrape time from the service's counter (set_function): nothing per request.
        self.requests_in_flight = Gauge(
            "gpugate_requests_in_flight",
            "Inference requests inside the gateway now: admitted and not yet answered, "
            "over every front door (queued, batched or running).",
            registry=r,
        )
        self.refusals_held = Gauge(
            "gpugate_refusals_held",
            "gRPC calls refused for load whose answer is being held now "
            "(server.grpc_refusal_hold_s), all tenants.",
            registry=r,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: ``labels()`` takes a lock and builds
        its key on every call, and these are looked up per request. Only series that
        are never removed go through here (removed gauges would stay cached)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def watch_tenant_loads(self, loads: Callable[[], Mapping[str, Load]]) -> None:
        """Where the per-tenant in-flight gauges read from (the service's loads)."""
        self._tenant_loads.loads = loads

    def refused(self, tenant: str, reason: str) -> None:
        self._child(self.admission_refusals, tenant, reason).inc()

    def observe_request(
        self, model: str, version: str, tenant: str, code: str, seconds: float
    ) -> None:
        self._child(self.requests, model, version, tenant, code).inc()
        if code == "200":
            self._child(self.latency, model, version, tenant).observe(seconds)

    def observe_batch(self, record: BatchRecord) -> None:
        self.batch_rows.labels(record.model, record.version).observe(record.rows)
        self.batch_duration.labels(record.model, record.version).observe(record.duration_s)
        if record.urgent:
            self.lane_batches.labels(record.model, record.version).inc()
        wait = self.queue_wait.labels(record.model, record.version)
        for w in record.queue_wait_s:
            wait.observe(w)
        if record.result is None:
            self.batch_failures.labels(record.model, record.version).inc()
        else:
            self.device_seconds.labels(record.model, record.version, record.result.device).inc(
                record.result.device_ns / 1e9
            )

    def observe_charges(
        self, record: BatchRecord, currency: str, cost_of: Callable[[int], float]
    ) -> None:
        """Per-tenant device seconds and cost of a batch that ran (from its exact split)."""
        if record.result is None:
            return
        m, v, device = record.model, record.version, record.result.device
        for tenant, share in record.by_tenant.items():
            ns = share.charge_ns
            self._child(self.tenant_device_seconds, tenant, m, v, device).inc(ns / 1e9)
            self._child(self.tenant_cost, tenant, m, v, currency).inc(cost_of(ns))
