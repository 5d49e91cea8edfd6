"""The gateway deployment: router + scheduler in a Ray Serve replica that opens the
HTTP, gRPC and metrics ports itself; its tracing and collector settings.
"""

from serving.gateway.app import (
    Gateway,
    build_app,
    gateway_actor_options,
)
from serving.gateway.telemetry import (
    configure_tracing,
    otel_env,
)

__all__ = [
    "Gateway",
    "build_app",
    "configure_tracing",
    "gateway_actor_options",
    "otel_env",
]
