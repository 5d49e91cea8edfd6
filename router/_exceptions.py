"""Errors the router answers with, each knowing its HTTP status and gRPC code.

Raised anywhere on the request path; the HTTP and gRPC front doors translate
them in one place each, so the two protocols always agree.
"""

from __future__ import annotations

import math

import grpc


class GatewayError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def http_headers(self) -> dict[str, str] | None:
        """Response headers that go with the status (None: none)."""
        return None

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata that goes with the status code."""
        return ()


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
    """Shed by admission; ``retry_after_s`` says when trying again makes sense.

    HTTP answers it as ``Retry-After`` (whole seconds, at least 1); gRPC as the
    trailing metadata ``retry-after`` (the same seconds) and ``grpc-retry-pushback-ms``,
    which gRPC clients with a retry policy honour.
    """

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def _seconds(self) -> int:
        assert self.retry_after_s is not None
        return max(1, math.ceil(self.retry_after_s))

    def http_headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(self._seconds())}

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return (
            ("retry-after", str(self._seconds())),
            ("grpc-retry-pushback-ms", str(max(1, round(self.retry_after_s * 1000)))),
        )


class Unavailable(GatewayError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(GatewayError):
    """A fault of ours or of the model, never of the caller's input."""
