"""gRPC health checking (``grpc.health.v1.Health``), as Kubernetes ``grpc:`` probes,
``grpc_health_probe`` and load balancers ask it; both gRPC doors serve this servicer.

A service name is one of:

* ``""`` or ``inference.GRPCInferenceService``: the server. SERVING when ServerReady
  answers ready, NOT_SERVING otherwise (while it drains, for one).
* ``<model>``: the version that serves the model when a request names none;
  ``<model>/<version>``: that version. SERVING when ModelReady would answer ready, and
  NOT_SERVING while the server drains or when the version is deployed without taking
  requests (staging: in the repository index, UNAVAILABLE).

Any other name is unknown: Check answers NOT_FOUND and Watch SERVICE_UNKNOWN, as the
health protocol says. Model names cannot hold ``/`` (the config's name pattern), so
the two forms never clash.

Watch answers with the status at once, then again each time it changes; it reads the
status every :data:`WATCH_POLL_S` (a few dictionary look-ups), so a change reaches the
watcher within that time. A stream ends when its client cancels it or the server
stops. Nothing here needs an API key or counts as a request in the metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, TypeAlias

import grpc
from gpugate_proto import grpc_service_pb2 as pb
from grpc_health.v1 import health_pb2

from router._exceptions import NotFound
from router.service import InferenceService

INFERENCE_SERVICE: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVER_NAMES = ("", INFERENCE_SERVICE)  # the names that stand for the whole server
WATCH_POLL_S = 0.5

Status: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus
SERVING: Status = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Status = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: Status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer:
    """Check, List and Watch over one :class:`~router.service.InferenceService`."""

    def __init__(self, service: InferenceService, poll_s: float = WATCH_POLL_S) -> None:
        self._service = service
        self._poll_s = poll_s

    def status(self, name: str) -> Status | None:
        """The status of service ``name``; None when no such service is known."""
        service = self._service
        if name in SERVER_NAMES:
            return SERVING if service.ready else NOT_SERVING
        model, slash, version = name.partition("/")
        if not model or (slash and not version):
            return None
        try:
            service.models.resolve(model, version or None)
        except NotFound:
            # Deployed without taking requests (staging): known, and not serving.
            listed = any(
                e.name == model and (not version or e.version == version)
                for e in service.models.index()
            )
            return NOT_SERVING if listed else None
        return SERVING if service.model_ready(model, version or None) else NOT_SERVING

    def statuses(self) -> dict[str, Status]:
        """Every known service name and its status (the server and each served version)."""
        names = list(SERVER_NAMES)
        for entry in self._service.models.index():
            names += [entry.name, f"{entry.name}/{entry.version}"]
        found = {name: self.status(name) for name in names}
        return {name: status for name, status in found.items() if status is not None}

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest, context: Any) -> Any:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self.statuses().items()
            }
        )

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncGenerator[Any, None]:
        sent: Status | None = None
        while True:
            status = self.status(request.service)
            if status is None:
                status = SERVICE_UNKNOWN
            if status != sent:
                yield health_pb2.HealthCheckResponse(status=status)
                sent = status
            await asyncio.sleep(self._poll_s)
