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
from pydantic import Field, ValidationError, field_validator, model_validator

from router import (
    DATATYPES,
    DEFAULT_PRIORITY_LEVEL,
    MAX_PRIORITY_LEVEL,
    ModelSignature,
    TensorSpec,
)
from router.canary import SHADOW_TENANT
from serving.config.server import (
    AuditConfig,
    SecurityConfig,
    ServerConfig,
)
from serving.config.server import (
    Strict as _Strict,
)

ArtifactFormat = Literal["torchscript", "export", "safetensors"]
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ConfigError(ValueError):
    """The config file is missing, not YAML, or fails validation."""


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


class AutoscalingConfig(_Strict):
    """Replicas follow the rows the version's replicas hold: every replica reports the rows
    of the batches it has received and not yet answered (queued and running, averaged
    over the last ~2 s), and Ray Serve sets the replica count to
    `ceil(total rows / target_queued_rows_per_replica)` within `min_replicas` ..
    `max_replicas`, once the need has lasted `upscale_delay_s` (up) or
    `downscale_delay_s` (down). Without it the version runs `replicas` replicas.
    Sizing and scale-down: [operations](operations.md#autoscaling).

    ```yaml
    models:
      - name: digits
        autoscaling:
          min_replicas: 1
          max_replicas: 4
          target_queued_rows_per_replica: 64
    ```"""

    min_replicas: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Replicas kept however idle the version is (at least 1: a version does "
        "not scale to zero). The version starts with this many.",
    )
    max_replicas: int = Field(ge=1, le=1024, description="Replicas at most.")
    target_queued_rows_per_replica: int | None = Field(
        default=None,
        ge=1,
        description="Rows (queued and running) one replica should hold on average; more "
        "rows in total add replicas, fewer remove them. At most batches_in_flight_per_replica "
        "x max_batch_size (a replica's share of the batches the gateway sends at once), or "
        "the version could never reach max_replicas. Unset: the version's max_batch_size.",
    )
    upscale_delay_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="How long more replicas must be needed before they are added.",
    )
    downscale_delay_s: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description="How long fewer replicas must suffice before replicas are removed; a "
        "removed replica finishes the batches it holds and refuses new ones, which the "
        "gateway sends to another replica.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self


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
    replicas: int = Field(
        default=1,
        ge=1,
        description="Ray Serve replicas of this version (a fixed count; unused with autoscaling).",
    )
    autoscaling: AutoscalingConfig | None = Field(
        default=None,
        description="Scale the replicas on the rows they hold (see below); unset: a fixed "
        "`replicas` count.",
    )
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
        scaling = self.autoscaling
        held = self.batches_in_flight_per_replica * self.max_batch_size
        if scaling is not None and (scaling.target_queued_rows_per_replica or 0) > held:
            # The gateway sends at most max_replicas x this many rows at once: with a
            # larger target the version could never reach max_replicas.
            raise ValueError(
                f"autoscaling.target_queued_rows_per_replica "
                f"({scaling.target_queued_rows_per_replica}) must be <= "
                f"batches_in_flight_per_replica x max_batch_size ({held})"
            )
        return self

    @property
    def max_replicas(self) -> int:
        """The most replicas this version runs: autoscaling's bound, else ``replicas``."""
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    @property
    def target_rows_per_replica(self) -> int:
        """Autoscaling's target rows per replica (default: a full batch)."""
        target = self.autoscaling.target_queued_rows_per_replica if self.autoscaling else None
        return target or self.max_batch_size

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
    budget_check_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often tenants' spend is checked against their budgets: a threshold "
        "crossing is recorded, audited and sent to the webhook within about this long, and a "
        "tenant's action at 100% (reject, best effort) applies from then.",
    )


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
