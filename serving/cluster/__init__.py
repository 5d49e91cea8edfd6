"""The one thin wrapper around Ray and Ray Serve (``runtime``), and the deployer that
keeps Serve's applications in step with the registry's stages.
"""

from serving.cluster import runtime
from serving.cluster.deployer import (
    SERVED_STAGES,
    Deployer,
    app_name,
)
from serving.cluster.runtime import (
    APP_NAME,
    GATEWAY_DEPLOYMENT,
    RayBatchBackend,
    StartInterrupted,
    batch_backend,
)

__all__ = [
    "APP_NAME",
    "GATEWAY_DEPLOYMENT",
    "SERVED_STAGES",
    "Deployer",
    "RayBatchBackend",
    "StartInterrupted",
    "app_name",
    "batch_backend",
    "runtime",
]
