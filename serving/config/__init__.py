"""The gateway's configuration: YAML validated by pydantic models; unknown keys are errors."""

from serving.config.schema import (
    NAME_PATTERN,
    ArtifactFormat,
    AutoscalingConfig,
    ConfigError,
    CostsConfig,
    GatewayConfig,
    MetricPolicy,
    ModelConfig,
    ModelPolicy,
    PriceConfig,
    TenantConfig,
    TensorConfig,
    load_config,
    priority_levels,
    tenant_name,
)
from serving.config.server import NODE_HOST, ServerConfig

__all__ = [
    "NAME_PATTERN",
    "NODE_HOST",
    "ArtifactFormat",
    "AutoscalingConfig",
    "ConfigError",
    "CostsConfig",
    "GatewayConfig",
    "MetricPolicy",
    "ModelConfig",
    "ModelPolicy",
    "PriceConfig",
    "ServerConfig",
    "TenantConfig",
    "TensorConfig",
    "load_config",
    "priority_levels",
    "tenant_name",
]
