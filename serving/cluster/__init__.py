"""The one thin wrapper around Ray and Ray Serve (``runtime``), the deployer that keeps
Serve's applications in step with the registry's stages, and the control deployment
that runs it inside the cluster.
"""

from serving.cluster import runtime
from serving.cluster.control import Control
from serving.cluster.deployer import (
    SERVED_STAGES,
    Deployer,
    app_name,
)
from serving.cluster.runtime import (
    APP_NAME,
    CONTROL_DEPLOYMENT,
    GATEWAY_DEPLOYMENT,
    RayBatchBackend,
    StartInterrupted,
    batch_backend,
    check_state_host,
)

__all__ = [
    "APP_NAME",
    "CONTROL_DEPLOYMENT",
    "GATEWAY_DEPLOYMENT",
    "SERVED_STAGES",
    "Control",
    "Deployer",
    "RayBatchBackend",
    "StartInterrupted",
    "app_name",
    "batch_backend",
    "check_state_host",
    "runtime",
]
