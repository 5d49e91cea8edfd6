"""The gRPC services that both doors serve beside KServe's ``GRPCInferenceService``:
health checking (``grpc.health.v1.Health``, :mod:`router.health`) and server
reflection (``grpc.reflection.v1alpha.ServerReflection``, grpcio-reflection's servicer),
so that probes, ``grpc_health_probe`` and ``grpcurl`` work without .proto files.

:func:`standard_rpcs` lists their methods with the messages and cardinality each door
needs to serve them; neither service needs an API key.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from gpugate_proto import grpc_service_pb2 as pb
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from router.health import HEALTH_SERVICE, INFERENCE_SERVICE, HealthServicer
from router.service import InferenceService

REFLECTION_SERVICE: str = reflection.SERVICE_NAME
# What reflection lists: every service on the port.
SERVICE_NAMES = (INFERENCE_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE)


class Cardinality(enum.Enum):
    UNARY = "unary"  # one message each way: (request, context) -> response
    RESPONSE_STREAM = "response-stream"  # (request, context) -> async iterator of responses
    BIDI_STREAM = "bidi-stream"  # (async iterator of requests, context) -> the same


@dataclass(frozen=True)
class Rpc:
    """One method: its service, name, message classes, cardinality and handler."""

    service: str
    name: str
    request_type: Any
    response_type: Any
    cardinality: Cardinality
    behavior: Callable[..., Any]

    @property
    def path(self) -> str:
        """The HTTP/2 ``:path`` of a call of this method."""
        return f"/{self.service}/{self.name}"


class ReflectionPool:
    """The descriptors that reflection answers from: the files that define the services
    listed. The inference service's lives in a private pool of its own
    (proto/generate.py), not protobuf's default pool, so they are copied into one here.

    A method's full name (``inference.GRPCInferenceService.ModelInfer``) finds its file
    too, as on gRPC's C++ and Go servers (``grpcurl describe`` asks so); protobuf's
    Python pool finds only messages, enums, services and extensions by name.
    """

    def __init__(self) -> None:
        self._pool = descriptor_pool.DescriptorPool()
        for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            self._pool.AddSerializedFile(proto.SerializeToString())

    def FindFileContainingSymbol(self, name: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(name)
        except KeyError:
            service_name, _, method = name.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                raise KeyError(name) from None
            if method not in service.methods_by_name:
                raise KeyError(name) from None
            return service.file

    def __getattr__(self, name: str) -> Any:  # the rest of DescriptorPool's look-ups
        return getattr(self._pool, name)


@functools.cache
def reflection_pool() -> ReflectionPool:
    return ReflectionPool()


def standard_rpcs(service: InferenceService) -> list[Rpc]:
    """Health and reflection's methods, with handlers bound to ``service``."""
    health = HealthServicer(service)
    reflector = reflection.aio.ReflectionServicer(SERVICE_NAMES, pool=reflection_pool())
    check = (health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse)
    return [
        Rpc(HEALTH_SERVICE, "Check", *check, Cardinality.UNARY, health.Check),
        Rpc(
            HEALTH_SERVICE,
            "List",
            health_pb2.HealthListRequest,
            health_pb2.HealthListResponse,
            Cardinality.UNARY,
            health.List,
        ),
        Rpc(HEALTH_SERVICE, "Watch", *check, Cardinality.RESPONSE_STREAM, health.Watch),
        Rpc(
            REFLECTION_SERVICE,
            "ServerReflectionInfo",
            reflection_pb2.ServerReflectionRequest,
            reflection_pb2.ServerReflectionResponse,
            Cardinality.BIDI_STREAM,
            reflector.ServerReflectionInfo,
        ),
    ]
