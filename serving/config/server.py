"""The config's server-side sections: ports and serving implementation (``server``),
the HTTP door's limits (``server.http``), TLS (``server.tls``), the cluster secret
(``security``) and the audit chain's key and anchors (``audit``).

Part of the config's schema (:mod:`serving.config.schema` holds the rest and the
top level); docs/config.md is generated from both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router.http_protocol import HttpDoorLimits
from router.tls import TlsFiles

# Ray refuses these in ``resources`` (they have keywords of their own).
_RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class Strict(BaseModel):
    """A config section: unknown keys are errors, and a loaded config is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpLimits(Strict):
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


class TlsConfig(Strict):
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


NODE_HOST = "node"  # server.host: bind the address of the gateway's own Ray node


class ConsoleConfig(Strict):
    """The web console at `/console/` on the HTTP port (docs/console.md): users sign in
    with their user token and get a session cookie; every page and action goes through
    the admin API with the user's role.

    ```yaml
    server:
      console:
        session_ttl_s: 3600
    ```"""

    enabled: bool = Field(default=True, description="Serve the console at `/console/`.")
    session_ttl_s: float = Field(
        default=8 * 3600,
        ge=60,
        le=30 * 86400,
        description="How long a sign-in lasts, at most (a session also ends with its "
        "user's token: disabled, rotated, deleted or expired).",
    )
    secure_cookies: bool = Field(
        default=False,
        description="Mark the console's cookies Secure and send Strict-Transport-Security "
        "even on plain HTTP: set this when a balancer in front of the gateway ends TLS "
        "(under the gateway's own TLS they are so anyway). Browsers then keep no session "
        "on a plain-HTTP address.",
    )


class ServerConfig(Strict):
    host: str = Field(
        default="127.0.0.1",
        description="Address the servers bind. `node`: the address of the Ray node each "
        "gateway runs on (with `gateway_resources`, one gateway per node, each reached on its "
        "node's address, e.g. behind a load balancer).",
    )
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
    console: ConsoleConfig = Field(
        default_factory=ConsoleConfig,
        description="The web console: sessions and whether it is served.",
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
    grpc_refusal_hold_s: float = Field(
        default=0.25,
        ge=0,
        le=10,
        description="A gRPC ModelInfer call refused for load (RESOURCE_EXHAUSTED: its "
        "tenant's in-flight caps or rate quotas, a full queue) is answered after this many "
        "seconds, with its request message already dropped, so that a client that calls "
        "again at once, ignoring the retry delay, cannot make the gateway read and refuse "
        "its calls as fast as it sends them. At most half of the call's remaining deadline. "
        "0 answers at once.",
    )
    grpc_refusal_hold_max_per_tenant: int = Field(
        default=64,
        ge=1,
        description="Refusals of one tenant held at once (grpc_refusal_hold_s); its further "
        "refusals are answered at once, so that one tenant cannot fill the port's call "
        "slots with them. At most half of grpc_max_concurrent_calls.",
    )
    gc_tuning: bool = Field(
        default=True,
        description="Once the gateway has started, freeze the objects alive then (gc.freeze) "
        "so the collector stops rescanning them, and collect the youngest generation every "
        "20,000 net allocations instead of 700. Full collections of the start-up heap otherwise "
        "pause the gateway under load (docs/benchmarks.md). false = CPython's defaults.",
    )
    gateway_replicas: int = Field(
        default=1,
        ge=1,
        description="Gateway replicas (router and batcher each). On one node they share the "
        "HTTP and gRPC ports (SO_REUSEPORT: the kernel spreads connections over them) and "
        "serve metrics on `metrics_port`, `metrics_port`+1, ... by their rank on the node; "
        "with `gateway_resources`, Ray places them on the nodes that advertise the resource. "
        "Each forms its own batches; the one of rank 0 runs the rollout analysis on every "
        "gateway's outcomes.",
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

    @model_validator(mode="after")
    def _held_refusals_leave_the_port_room(self) -> ServerConfig:
        if 2 * self.grpc_refusal_hold_max_per_tenant > self.grpc_max_concurrent_calls:
            raise ValueError(
                f"grpc_refusal_hold_max_per_tenant ({self.grpc_refusal_hold_max_per_tenant}) "
                "must be at most half of grpc_max_concurrent_calls "
                f"({self.grpc_max_concurrent_calls}): one tenant's held refusals must not "
                "fill the port's call slots"
            )
        return self


class SecurityConfig(Strict):
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


class AuditConfig(Strict):
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
