"""Errors the router answers with, each knowing its HTTP status and gRPC code.

Raised anywhere on the request path; the HTTP and gRPC front doors translate
them in one place each, so the two protocols always agree.
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(GatewayError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class PayloadTooLarge(InvalidArgument):
    http_status = 413


class Unauthenticated(GatewayError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(GatewayError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(GatewayError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(GatewayError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(GatewayError):
    """A fault of ours or of the model, never of the caller's input."""
