"""The gateway deployment: router + scheduler in a Ray Serve replica that opens the
HTTP, gRPC and metrics ports itself; its tracing and collector settings; the ``gpugate``
application (control loop + gateways) and what its state needs before it deploys.
"""

from serving.gateway.app import (
    Gateway,
    application,
    build_app,
    gateway_actor_options,
)
from serving.gateway.bootstrap import Prepared, prepare, serve_config
from serving.gateway.telemetry import (
    configure_tracing,
    otel_env,
)

__all__ = [
    "Gateway",
    "Prepared",
    "application",
    "build_app",
    "configure_tracing",
    "gateway_actor_options",
    "otel_env",
    "prepare",
    "serve_config",
]
