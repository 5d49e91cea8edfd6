"""The router: KServe v2 front doors (HTTP and gRPC), authentication, validation,
traffic split and admission, in front of the scheduler.

This package's API is its errors and shared types (below) and its public modules:
``router.service`` (the protocol-neutral core), ``router.servers`` (the front doors),
``router.canary``, ``router.model_table``, ``router.metrics``, ``router.quota`` and
``router.tracing``.
"""

from router._exceptions import (
    DeadlineExceeded,
    GatewayError,
    Internal,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from router.types import (
    DATATYPES,
    DEFAULT_PRIORITY_LEVEL,
    MAX_PRIORITY_LEVEL,
    NO_QUOTA,
    ModelSignature,
    Quota,
    Rate,
    Tenant,
    TensorSpec,
)

__all__ = [
    "DATATYPES",
    "DEFAULT_PRIORITY_LEVEL",
    "MAX_PRIORITY_LEVEL",
    "NO_QUOTA",
    "DeadlineExceeded",
    "GatewayError",
    "Internal",
    "InvalidArgument",
    "ModelSignature",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "Quota",
    "Rate",
    "ResourceExhausted",
    "Tenant",
    "TensorSpec",
    "Unauthenticated",
    "Unavailable",
]
