"""The gateway's configuration: YAML validated by pydantic.

Every field is documented here; docs/config.md is generated from these models
(serving.config.reference). An unknown key anywhere is an error that names it
(``extra="forbid"``).
"""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from router import (
    DATATYPES,
    DEFAULT_PRIORITY_LEVEL,
    MAX_PRIORITY_LEVEL,
    ModelSignature,
    TensorSpec,
)
from router.canary import SHADOW_TENANT
from router.http_protocol import HttpDoorLimits
from router.tls import TlsFiles

ArtifactFormat = Literal["torchscript", "export", "safetensors"]
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Ray refuses these in ``resources`` (they have keywords of their own).
_RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class ConfigError(ValueError):
    """The config file is missing, not YAML, or fails validation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorConfig(_Strict):
    name: str = Field(description="Tensor name as clients send it.")
    datatype: str = Field(description="KServe v2 datatype, e.g. FP32, INT64, BOOL.")
    shape: list[int] = Field(
        description="Shape of ONE row, without the batch dimension; -1 marks a variable dim."
    )

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, v: str) -> str:
        if v not in DATATYPES:
            raise ValueError(f"unknown datatype {v!r}; one of {sorted(DATATYPES)}")
        return v

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d == 0 or d < -1 for d in v):
            raise ValueError("dims must be positive or -1")
        return v

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, tuple(self.shape))


class ModelConfig(_Strict):
    """Config models are registered in the model registry at start-up as versions
    authored by `config` (an artifact that changed under the same version label is
    an error: versions are immutable). A model without a production version gets
    its newest config version as production; versions serve only while they are in
    production (staging versions are deployed but take no tenant traffic), and the
    registry, not the file, decides which version that is ([registry](registry.md))."""

    name: str = Field(description="Model name used in /v2/models/{name}.")
    version: str = Field(default="1", description="Version label of this artifact.")
    artifact: Path = Field(description="Path of the model artifact file.")
    format: ArtifactFormat = Field(
        description="torchscript (torch.jit.save), export (torch.export.save .pt2), "
        "or safetensors (weights; needs model_class)."
    )
    model_class: str | None = Field(
        default=None,
        description="For safetensors: 'package.module:Class', constructed with no "
        "arguments (or model_kwargs) before the weights are loaded.",
    )
    model_kwargs: dict[str, int | float | str | bool] = Field(
        default_factory=dict, description="Keyword arguments for model_class."
    )
    inputs: list[TensorConfig] = Field(min_length=1, description="Input signature.")
    outputs: list[TensorConfig] = Field(min_length=1, description="Output signature.")
    max_batch_size: int = Field(default=32, ge=1, le=65536, description="Rows per batch.")
    max_queue_delay_ms: float = Field(
        default=0.0,
        ge=0,
        le=10_000,
        description="How long the oldest request may wait for a fuller batch while a "
        "replica slot is free. 0 dispatches as soon as a slot is free.",
    )
    replicas: int = Field(default=1, ge=1, description="Ray Serve replicas of this version.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved per replica.")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per replica.")
    batches_in_flight_per_replica: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Batches sent to one replica before the previous returns; 2 hides the "
        "Ray hop behind the forward.",
    )
    latency_lane_rows: int = Field(
        default=4,
        ge=0,
        le=1024,
        description="Latency lane: a request of at most this many rows, from a tenant with "
        "nothing queued and nothing running here when it arrived, does not wait for a free "
        "batch slot behind full batches; it goes out in a small batch of its own beside them "
        "(one lane batch at a time, at most this many rows and max_batch_size), which the "
        "replica runs before the ordinary batches waiting there (replica_transport direct). "
        "Never past a more urgent priority level. 0 turns the lane off.",
    )
    max_queued_rows: int = Field(
        default=4096, ge=1, description="Rows waiting for this version before 429."
    )
    max_queued_rows_per_tenant: int = Field(
        default=1024, ge=1, description="Rows one tenant may have waiting before 429."
    )
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Expected SHA-256 (hex) of the artifact; every replica checks it before "
        "loading and refuses a file that differs. Set by the registry for its versions.",
    )

    @field_validator("name", "version")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_PATTERN.fullmatch(v):
            raise ValueError(f"{v!r} must match {NAME_PATTERN.pattern}")
        return v

    @model_validator(mode="after")
    def _class_for_safetensors(self) -> ModelConfig:
        if self.format == "safetensors" and not self.model_class:
            raise ValueError("format safetensors needs model_class ('module:Class')")
        if min(self.max_queued_rows, self.max_queued_rows_per_tenant) < self.max_batch_size:
            raise ValueError(
                "max_queued_rows and max_queued_rows_per_tenant must be >= max_batch_size, "
                "or a full-size request could never be queued"
            )
        names = [t.name for t in self.inputs] + [t.name for t in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError("input and output names must be unique")
        return self

    def signature(self) -> ModelSignature:
        return ModelSignature(
            inputs=tuple(t.spec() for t in self.inputs),
            outputs=tuple(t.spec() for t in self.outputs),
            max_batch_size=self.max_batch_size,
        )


class TenantConfig(_Strict):
    name: str = Field(description="Tenant name (cost and metrics label).")
    weight: float = Field(default=1.0, gt=0, le=1000, description="Fair-share weight.")
    models: list[str] = Field(
        default_factory=lambda: ["*"], description="Models the tenant may call; '*' = all."
    )
    api_key_env: str = Field(
        description="Environment variable holding the tenant's API key (never the key itself): "
        "16-256 printable ASCII characters without spaces."
    )
    priorities: list[int] = Field(
        default_factory=lambda: [DEFAULT_PRIORITY_LEVEL],
        description=f"Priority levels the tenant may ask for (request parameter `priority`, "
        f"1 most urgent .. {MAX_PRIORITY_LEVEL}); the default level "
        f"{DEFAULT_PRIORITY_LEVEL} is always granted. A more urgent level is served before "
        "fair share, so it is a grant: another level is refused 403 / PERMISSION_DENIED.",
    )
    max_requests_in_flight: int | None = Field(
        default=None,
        ge=0,
        description="The tenant's cap on requests admitted and not yet answered, over every "
        "model; past it 429 / RESOURCE_EXHAUSTED with Retry-After. Unset: "
        "server.tenant_max_requests_in_flight.",
    )
    max_bytes_in_flight: int | None = Field(
        default=None,
        ge=0,
        description="The tenant's cap on the input tensor bytes of its requests in flight; past "
        "it 429 / RESOURCE_EXHAUSTED with Retry-After (one request larger than the cap: 413). "
        "Unset: server.tenant_max_bytes_in_flight.",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return tenant_name(v)

    @field_validator("priorities")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        return priority_levels(v)


def priority_levels(levels: list[int]) -> list[int]:
    """Granted levels, sorted and with the default level; ValueError for a level out of range."""
    for level in levels:
        if isinstance(level, bool) or not 1 <= level <= MAX_PRIORITY_LEVEL:
            raise ValueError(f"priority levels are 1..{MAX_PRIORITY_LEVEL}, got {level!r}")
    return sorted({*levels, DEFAULT_PRIORITY_LEVEL})


def tenant_name(name: str) -> str:
    """A valid tenant name, or ValueError; ``shadow`` is the canary mirror's cost owner."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"tenant name {name!r} must match {NAME_PATTERN.pattern}")
    if name == SHADOW_TENANT:
        raise ValueError(f"tenant name {name!r} is reserved for mirrored canary traffic")
    return name


class PriceConfig(_Strict):
    device: str = Field(
        description="Device type the price applies to: 'cpu', an accelerator name as torch "
        "reports it (e.g. 'NVIDIA A100-SXM4-80GB'), or 'cuda' for any GPU not named."
    )
    per_hour: Decimal = Field(
        ge=0,
        decimal_places=9,
        description="Price of one device-hour (a whole GPU, or one CPU) in the currency.",
    )
    since: date = Field(
        default=date(1970, 1, 1),
        description="First UTC day the price applies; batches keep the price of their day, "
        "so adding a new price later never rewrites history.",
    )


class CostsConfig(_Strict):
    """Every batch's device time (integer ns) times the replica's device share (its
    `num_gpus` on a GPU, its `num_cpus` on a CPU) is split among the batch's tenants
    and committed to the ledger with the price in force on the batch's UTC day, so a
    later price never rewrites history. `gpugate costs report` reads it.

    ```yaml
    costs:
      currency: USD
      prices:
        - {device: cpu, per_hour: 0.04}
        - {device: cuda, per_hour: 2.10}
        - {device: NVIDIA A100-SXM4-80GB, per_hour: 3.00, since: 2026-12-01}
    ```"""

    currency: str = Field(default="USD", min_length=3, max_length=8, description="ISO code.")
    prices: list[PriceConfig] = Field(
        default_factory=list,
        description="Device-hour prices; a device type with no price is recorded at 0.",
    )
    reservation_heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How often `gpugate serve` records which replicas are still up (the "
        "cost ledger's reservations); a replica that dies is counted as reserved until it "
        "was last seen alive.",
    )


class HttpLimits(_Strict):
    """Limits of the HTTP port's connections and request bodies (docs/operations.md#limits).

    ```yaml
    server:
      http: {header_timeout_s: 10, max_connections: 4096, max_json_bytes: 8388608}
    ```"""

    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="A connection must deliver a request's complete head (request line and "
        "headers) within this many seconds of connecting, or of the head's first byte on a "
        "kept-alive connection; otherwise it is closed (answered 408 if a head had begun).",
    )
    keep_alive_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long a connection may stay idle between requests before it is closed.",
    )
    min_body_bytes_per_s: int = Field(
        default=64 * 1024,
        ge=1,
        description="Slowest a request body may arrive: after `header_timeout_s` of grace from "
        "the end of the head, a body that has averaged less than this since then is cut off "
        "(the connection closed), so a trickled body cannot hold a connection and its "
        "request slot. Time the gateway itself stops reading (its buffers full) is not "
        "counted against the client. With TLS, the handshake must also finish within "
        "`header_timeout_s`.",
    )
    max_header_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        le=16 * 2**20,
        description="Largest request head (request line plus headers), counted as it arrives; "
        "a longer one is answered 431 and the connection closed.",
    )
    max_connections: int = Field(
        default=4096,
        ge=1,
        description="Open HTTP connections. At the cap a new connection closes the one that "
        "has waited longest without a request in progress (idle, or its head still arriving); "
        "only when every connection carries a request is the newcomer answered 503. Lowered "
        "at start, with a warning, to three quarters of the process's file limit "
        "(RLIMIT_NOFILE).",
    )
    max_json_bytes: int = Field(
        default=8 * 2**20,
        ge=1024,
        description="Largest JSON part of an inference request, after decompression: the whole "
        "body when it is all JSON, the header part with binary tensor data. Over it: 413. "
        "Binary tensor data is bounded by server.max_request_bytes instead.",
    )
    max_json_containers: int = Field(
        default=2**20,
        ge=16,
        description="Most arrays and objects one JSON request may hold (counted before parsing; "
        "413 past it): each costs far more memory than its bytes, so this bounds what a "
        "document expands to. Tensor data sent flat, as tritonclient does, uses a handful.",
    )
    max_inflate_ratio: float = Field(
        default=200.0,
        ge=1,
        description="A gzip or deflate body is inflated as it arrives and refused (413) once it "
        "has expanded to more than this many times the compressed bytes read (checked past "
        "its first MiB), or past the body's size limit.",
    )

    def door_limits(self) -> HttpDoorLimits:
        return HttpDoorLimits(**self.model_dump())


class MetricPolicy(_Strict):
    higher_is_better: bool = Field(
        default=True, description="True for accuracy-like metrics, false for loss or latency."
    )
    max_regression: float = Field(
        default=0.0,
        ge=0,
        description="How much worse than production a candidate may be (absolute).",
    )


class ModelPolicy(_Strict):
    """Keyed by model name; the entry `'*'` applies to every model without its own.
    The gateway applies the policies of the config it runs with to every register,
    approve and promote; a client never supplies a policy.

    ```yaml
    policies:
      digits:
        required_approvals: 2
        metrics:
          accuracy: {higher_is_better: true, max_regression: 0.01}
    ```"""

    required_approvals: int = Field(
        default=1, ge=1, le=10, description="Distinct approvers a version needs (never its author)."
    )
    max_artifact_bytes: int = Field(
        default=2 * 2**30, ge=1, description="Largest artifact the registry accepts."
    )
    metrics: dict[str, MetricPolicy] = Field(
        default_factory=dict,
        description="Metrics compared with production's at registration and promotion; a "
        "candidate missing one of them is refused.",
    )
    smoke_rows: int = Field(
        default=4, ge=1, le=4096, description="Rows of generated input the smoke test runs."
    )
    smoke_timeout_s: float = Field(
        default=120.0,
        gt=0,
        # A registration answers after its smoke test; `gpugate models register` waits 900 s.
        le=600,
        description="How long the smoke test may take to load and run (at most 600 s).",
    )


class TlsConfig(_Strict):
    """TLS on the HTTP and gRPC ports (both use the same files)."""

    cert_file: Path = Field(
        description="PEM file with the server certificate, then any intermediate certificates."
    )
    key_file: Path = Field(description="PEM file with the certificate's private key.")
    client_ca_file: Path | None = Field(
        default=None,
        description="PEM file of the CA(s) that sign client certificates. Set: mutual TLS, "
        "every client must present a certificate that this CA signed (on both ports). "
        "Unset: clients are not asked for a certificate.",
    )
    reload_interval_s: int = Field(
        default=10,
        ge=1,
        le=3600,
        description="How often the three files are checked for a change; a changed, valid "
        "certificate and key are used for new connections from then on (connections already "
        "open keep theirs). A change that does not load (a key that does not match, a "
        "half-written file) is logged and the old files stay in use.",
    )

    def files(self) -> TlsFiles:
        """The router's form of these settings."""
        return TlsFiles(self.cert_file, self.key_file, self.client_ca_file, self.reload_interval_s)

    def anchored(self, base: Path) -> TlsConfig:
        """Relative paths taken as relative to ``base`` (the config file's folder)."""

        def under(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else base / p

        return self.model_copy(
            update={
                "cert_file": under(self.cert_file),
                "key_file": under(self.key_file),
                "client_ca_file": under(self.client_ca_file),
            }
        )


class ServerConfig(_Strict):
    host: str = Field(default="127.0.0.1", description="Address the servers bind.")
    http_port: int = Field(default=8000, ge=0, le=65535, description="KServe v2 HTTP port.")
    grpc_port: int = Field(default=8001, ge=0, le=65535, description="KServe v2 gRPC port.")
    metrics_port: int = Field(default=8002, ge=0, le=65535, description="Prometheus port.")
    max_request_bytes: int = Field(
        default=64 * 2**20, ge=1024, description="Largest HTTP body or gRPC message accepted."
    )
    http: HttpLimits = Field(
        default_factory=HttpLimits,
        description="HTTP connection limits (timeouts, head size, connection cap) and JSON and "
        "decompression limits of request bodies.",
    )
    default_timeout_ms: float = Field(
        default=30_000, gt=0, description="Deadline of a request that names none."
    )
    drain_timeout_s: float = Field(
        default=30.0, gt=0, description="How long SIGTERM waits for in-flight requests."
    )
    tenant_max_requests_in_flight: int = Field(
        default=512,
        ge=0,
        description="Default cap on one tenant's inference requests admitted and not yet "
        "answered, over every model and both ports (a tenant's `max_requests_in_flight` "
        "overrides it). Past it: 429 with `Retry-After` / RESOURCE_EXHAUSTED with trailing "
        "metadata `retry-after` and `grpc-retry-pushback-ms`.",
    )
    tenant_max_bytes_in_flight: int = Field(
        default=256 * 2**20,
        ge=0,
        description="Default cap on the input tensor bytes of one tenant's requests in flight "
        "(a tenant's `max_bytes_in_flight` overrides it); answered as the request cap is. "
        "Checked from the declared shapes before any tensor is built.",
    )
    replica_transport: Literal["direct", "grpc", "actor"] = Field(
        default="direct",
        description="How batches reach model replicas. `direct` (default): each replica opens "
        "a data port of its own and batches travel there as length-prefixed KServe v2 "
        "protobuf frames with raw tensor bytes, while Serve still places, health-checks, "
        "restarts and scales the replicas; a replica that dies fails its in-flight batches "
        "as retryable 503s (or retries them on another live replica). `grpc`: one Ray Serve "
        "handle call per batch over Serve's inter-deployment gRPC transport; `actor`: the "
        "same as Ray actor calls.",
    )
    grpc_server: Literal["auto", "native", "grpcio"] = Field(
        default="auto",
        description="Implementation of the KServe v2 gRPC port. `native`: the optional "
        "compiled door on gRPC C++ (built with the package when gRPC C++ is installed; "
        "docs/grpc.md) reads HTTP/2 on its own threads without the GIL and hands the event "
        "loop every waiting call per wake-up. `grpcio`: grpc.aio on grpcio's public API, the "
        "portable door. `auto`: native when built, else grpcio. Both refuse an over-size "
        "message with RESOURCE_EXHAUSTED while reading it.",
    )
    tls: TlsConfig | None = Field(
        default=None,
        description="TLS for the HTTP and gRPC ports (docs/operations.md). Unset: both are "
        "plain text, which suits a loopback bind or a TLS-terminating proxy in front.",
    )
    grpc_max_concurrent_streams: int = Field(
        default=1024,
        ge=1,
        le=65535,
        description="Calls one gRPC connection may have open at once (HTTP/2 "
        "SETTINGS_MAX_CONCURRENT_STREAMS). Clients queue further calls on their side; a "
        "client that opens more anyway has them refused (REFUSED_STREAM).",
    )
    grpc_max_concurrent_calls: int = Field(
        default=4096,
        ge=1,
        description="Calls the gRPC port has in progress at once, over all connections; more "
        "are answered RESOURCE_EXHAUSTED at once, without being handled.",
    )
    grpc_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A gRPC ModelInfer call's request message must arrive within this many "
        "seconds of the call's admission (its key checked and one of its tenant's in-flight "
        "requests taken), or within the call's own deadline when that is shorter; otherwise "
        "the call ends (DEADLINE_EXCEEDED on grpcio, CANCELLED on the native door) and "
        "frees its tenant's request slot.",
    )
    gc_tuning: bool = Field(
        default=True,
        description="Once the gateway has started, freeze the objects alive then (gc.freeze) "
        "so the collector stops rescanning them, and collect the youngest generation every "
        "20,000 net allocations instead of 700. Full collections of the start-up heap otherwise "
        "pause the gateway under load (docs/benchmarks.md). false = CPython's defaults.",
    )
    gateway_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources the gateway replica requests, which pins it to the "
        "Ray nodes that advertise them: on a cluster the Service that exposes the ports must "
        "select the pod the gateway runs in (deploy/kuberay gives one worker group "
        "`{gpugate_gateway: 1}`). Empty: any node Ray chooses.",
    )

    @field_validator("gateway_resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if not name or name in _RAY_BUILTIN_RESOURCES:
                raise ValueError(f"{name!r} is not a custom resource name")
            if not amount > 0:
                raise ValueError(f"{name}: the amount must be > 0")
        return v


class SecurityConfig(_Strict):
    """Secrets kept outside the config and the database.

    The cluster secret authenticates the data plane: a model replica runs batches only
    for a gateway that proves it (an HMAC-SHA256 challenge on connect), and the
    gateway sends batches only to a replica that proves it back. `gpugate serve`
    reads it from `$GPUGATE_CLUSTER_SECRET`, else from `cluster_secret_file`, else
    from `cluster.secret` in the state folder (made with mode 0600 at the first start),
    and hands it to the gateway and the replicas through their Serve deployments; it
    is never logged. A file its group or others may read is refused.

    ```yaml
    security:
      cluster_secret_file: /etc/gpugate/cluster-secret/secret
    ```"""

    cluster_secret_file: Path | None = Field(
        default=None,
        description="File holding the data plane's cluster secret (at least 32 bytes, "
        "mode 0600); default `cluster.secret` in the state folder, made at the first "
        "start. `$GPUGATE_CLUSTER_SECRET` wins over both.",
    )


class AuditConfig(_Strict):
    """The audit log's MAC key and its anchor outside the database (docs/state.md).

    Records are chained with HMAC-SHA256 under a key the database never holds:
    `$GPUGATE_AUDIT_KEY` (at least 32 characters), else `key_file`, made with mode 0600
    at the first start. Every gateway and `gpugate users bootstrap` on one database
    needs the same key: set `$GPUGATE_AUDIT_KEY` (or copy the file) when several
    gateways share a PostgreSQL database. After each append the newest record's
    sequence number and MAC are appended to `anchor_file` (per host) and logged.

    ```yaml
    audit:
      key_file: /etc/gpugate/audit/key
      anchor_file: /var/lib/gpugate-anchor/audit.anchor
    ```"""

    key_file: Path | None = Field(
        default=None,
        description="File holding the audit MAC key (mode 0600; refused if its group or "
        "others may read it); relative paths are in the state folder. Default "
        "`audit.key` in the state folder, made at the first start. `$GPUGATE_AUDIT_KEY` "
        "wins over it.",
    )
    anchor_file: Path | None = Field(
        default=None,
        description="Append-only file that receives the newest record's sequence number "
        "and MAC after appends (fsynced); relative paths are in the state folder. Default "
        "`audit.anchor` in the state folder. Best kept where database writers cannot "
        "write.",
    )
    anchor_interval_s: float = Field(
        default=0.0,
        ge=0,
        le=3600,
        description="At most one anchor per this many seconds; 0 anchors every append. "
        "Records appended inside the interval are anchored when it ends (or at a clean "
        "exit), so a record waits at most this long; records not yet anchored can be "
        "removed unnoticed, so keep it small.",
    )


class GatewayConfig(_Strict):
    server: ServerConfig = Field(
        default_factory=ServerConfig, description="Ports, limits and serving implementation."
    )
    state_dir: Path | None = Field(
        default=None, description="Folder for state (SQLite, demo model); CLI --state-dir wins."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the state database; default SQLite in state_dir. "
        "Use postgresql+psycopg://... on a cluster.",
    )
    models: list[ModelConfig] = Field(
        default_factory=list, description="Served model versions; empty serves the demo model."
    )
    tenants: list[TenantConfig] = Field(default_factory=list, description="Config tenants.")
    costs: CostsConfig = Field(
        default_factory=CostsConfig, description="Pricing of device time for the cost ledger."
    )
    policies: dict[str, ModelPolicy] = Field(
        default_factory=dict,
        description="Registry policy per model name; '*' applies to models without their own.",
    )
    security: SecurityConfig = Field(
        default_factory=SecurityConfig,
        description="Where the data plane's cluster secret comes from.",
    )
    audit: AuditConfig = Field(
        default_factory=AuditConfig,
        description="Where the audit log's MAC key and anchor file are.",
    )

    def policy(self, model: str) -> ModelPolicy:
        return self.policies.get(model) or self.policies.get("*") or ModelPolicy()

    @model_validator(mode="after")
    def _unique(self) -> GatewayConfig:
        keys = [(m.name, m.version) for m in self.models]
        if len(set(keys)) != len(keys):
            raise ValueError("a model version is declared twice")
        tenants = [t.name for t in self.tenants]
        if len(set(tenants)) != len(tenants):
            raise ValueError("a tenant is declared twice")
        return self


def load_config(path: Path | None) -> GatewayConfig:
    """Read and validate a YAML config; ``None`` gives the embedded default."""
    if path is None:
        return GatewayConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(path, exc)) from None
    # Relative artifact paths are relative to the config file, not the working dir.
    base = path.resolve().parent
    models = [
        m if m.artifact.is_absolute() else m.model_copy(update={"artifact": base / m.artifact})
        for m in config.models
    ]
    update: dict[str, object] = {"models": models}
    if config.server.tls is not None:  # relative to the config file, like artifacts
        tls = config.server.tls.anchored(base)
        update["server"] = config.server.model_copy(update={"tls": tls})
    return config.model_copy(update=update)


def _describe(path: Path, exc: ValidationError) -> str:
    lines = [f"invalid config {path}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)
