"""KServe v2 over gRPC (package ``inference``, service ``GRPCInferenceService``).

Inputs come as ``raw_input_contents`` (one entry per input, in order; what
tritonclient sends) or as typed ``contents``. Outputs always go back as
``raw_output_contents``, as Triton does.

Key before body: ModelInfer authenticates the caller, and takes one of its tenant's
in-flight requests, before it reads the request message (a :class:`DeferredRequest`).
On grpc.aio the method is registered as client-streaming, which is the same on the wire
as unary, so that the message is read only when the servicer asks for it; gRPC's core
has by then taken in no more of it than HTTP/2 flow control allowed (the stream's
window), not the whole message. The message must then arrive within the call's deadline
and ``grpc_body_timeout_s`` (:class:`~router.service.RouterSettings`), whichever is
shorter: a tenant that never finishes its messages holds only its own request slots,
and only that long.
"""

from __future__ import annotations

import abc
import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

from router._exceptions import (
    DeadlineExceeded,
    GatewayError,
    InvalidArgument,
    ResourceExhausted,
)
from router.extensions import config_of, statistics_of
from router.grpc_services import Cardinality, Rpc, standard_rpcs
from router.infer_wire import decode_infer_request
from router.service import (
    EXTENSIONS,
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    Call,
    InferenceService,
)
from router.tensors import InputTensor, parse_params
from router.types import DTYPE_TO_DATATYPE

# Which typed-contents field carries each datatype (FP16 travels only as raw bytes).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

R = TypeVar("R")

SERVICE_PREFIX = "/inference.GRPCInferenceService/"


def send_limit(max_message_bytes: int) -> int:
    """The gRPC doors' send limit: answers may outgrow requests (at least 256 MiB)."""
    return max(max_message_bytes, 256 * 2**20)


# Unary method name -> (request type, response type), as in grpc_service.proto: what
# every door serves (tests/unit/test_proto.py holds it to the service's descriptor).
METHODS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse),
    "ModelStatistics": (pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
}


class Malformed:
    """A request that did not decode as its method's message: the servicer answers
    INVALID_ARGUMENT (counted, for ModelInfer, like any other bad request) instead of
    the door's own INTERNAL or UNKNOWN."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class DeferredRequest(abc.ABC):
    """A request message not read yet; ModelInfer reads it once the caller is known."""

    __slots__ = ()

    @abc.abstractmethod
    async def read(self) -> Any:
        """The message (or :class:`Malformed`), read from the call now."""


class _GrpcioBody(DeferredRequest):
    __slots__ = ("_context",)

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def read(self) -> Any:
        message = await self._context.read()
        if message is grpc.aio.EOF:
            return Malformed("the call ended without a request message")
        return message


def decode_request(request_type: Any, data: bytes) -> Any:
    """``data`` as a ``request_type`` message, or :class:`Malformed`; never raises.

    Every door decodes through this (grpc.aio as the handlers' deserializer). A large
    ModelInferRequest keeps its tensors as views of ``data`` (:mod:`router.infer_wire`).
    """
    try:
        if request_type is pb.ModelInferRequest:
            return decode_infer_request(data)
        return request_type.FromString(data)
    except Exception as exc:  # DecodeError; its type differs between protobuf backends
        return Malformed(
            f"the request is not a valid {request_type.DESCRIPTOR.full_name} message: {exc}"
        )


def _decoded(method: Callable[[Any, Any, Any], Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Refuse a :class:`Malformed` request before ``method`` reads it."""

    @functools.wraps(method)
    async def checked(self: Any, request: Any, context: Any) -> R:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(self, request, context)

    return checked


async def _refuse_malformed(request: Any, context: Any) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def checked(rpc: Rpc) -> Callable[..., Any]:
    """``rpc``'s handler, refusing a :class:`Malformed` request (INVALID_ARGUMENT) before
    the handler sees it; what every door runs for the methods of :mod:`router.grpc_services`."""
    behavior = rpc.behavior

    async def unary(request: Any, context: Any) -> Any:
        await _refuse_malformed(request, context)
        return await behavior(request, context)

    async def response_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        await _refuse_malformed(request, context)
        async for response in behavior(request, context):
            yield response

    async def bidi_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async def valid() -> AsyncIterator[Any]:
            async for request in requests:
                await _refuse_malformed(request, context)
                yield request

        async for response in behavior(valid(), context):
            yield response

    return {
        Cardinality.UNARY: unary,
        Cardinality.RESPONSE_STREAM: response_stream,
        Cardinality.BIDI_STREAM: bidi_stream,
    }[rpc.cardinality]


def _param_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


_INFER_SPAN = "inference.GRPCInferenceService/ModelInfer"
_TRACE_KEYS = frozenset({"traceparent", "tracestate", "baggage"})


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode(errors="replace")


class _CallMetadata:
    """The call's metadata, read once: grpc.aio builds a new tuple on every
    ``invocation_metadata()`` call, and a request needs it three times."""

    __slots__ = ("authorization", "items", "trace_carrier")

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.items = context.invocation_metadata() or ()
        self.authorization: str | None = None
        # W3C trace context sent as gRPC metadata, as OpenTelemetry's gRPC clients do.
        self.trace_carrier: dict[str, str] | None = None
        for key, value in self.items:
            if key == "authorization":
                if self.authorization is None:
                    self.authorization = _text(value)
            elif key in _TRACE_KEYS:
                if self.trace_carrier is None:
                    self.trace_carrier = {}
                self.trace_carrier[key] = _text(value)

    def lookup(self, name: str) -> str | None:
        """One value by lower-case key (a rollout's sticky header)."""
        for key, value in self.items:
            if key == name:
                return _text(value)
        return None


async def _guard(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[R]]) -> R:
    """Turn GatewayErrors into the call's status code; nothing else leaks."""
    try:
        return await call()
    except GatewayError as exc:
        await context.abort(exc.grpc_code, exc.message, exc.grpc_trailers())
        raise  # unreachable: abort raises


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, service: InferenceService) -> None:
        self._service = service

    @_decoded
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self._service.live)

    @_decoded
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self._service.ready)

    @_decoded
    async def ModelReady(self, request: Any, context: Any) -> Any:
        ready = self._service.model_ready(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    @_decoded
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        )

    @_decoded
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            served = self._service.models.resolve(request.name, request.version or None)
            versions = self._service.models.versions(served.name)

            def meta(specs: Any) -> list[Any]:
                return [
                    pb.ModelMetadataResponse.TensorMetadata(
                        name=t.name, datatype=t.datatype, shape=[-1, *t.shape]
                    )
                    for t in specs
                ]

            return pb.ModelMetadataResponse(
                name=served.name,
                versions=versions,
                platform=PLATFORM,
                inputs=meta(served.signature.inputs),
                outputs=meta(served.signature.outputs),
            )

        return await _guard(context, run)

    @_decoded
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            config = config_of(self._service, request.name, request.version or None)
            return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

        return await _guard(context, run)

    @_decoded
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            stats = statistics_of(self._service, request.name or None, request.version or None)
            return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

        return await _guard(context, run)

    @_decoded
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        entries = self._service.models.index()
        if request.ready:
            entries = [e for e in entries if e.state == "READY"]
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        metadata = _CallMetadata(context)
        refused: GatewayError | None = None
        authenticated = True
        held: Call | None = None
        who: list[str] = []  # the caller's tenant, once the service has checked its key
        if isinstance(request, DeferredRequest):
            # Key before body, and the tenant's request slot too, outside ``admitted``: a
            # call that ends while its message is still coming (a reset, an over-size
            # message) never reaches the service's counts, yet messages being read count
            # against their tenant's request cap. A refusal is raised again inside, to be
            # counted; a key that passed is checked again there too (a cache hit), so the
            # call's tenant is set by the service's own path.
            try:
                authenticated = False
                tenant = await self._service.authenticate(Call(), metadata.authorization)
                authenticated = True
                held = self._service.hold(tenant)
                request = await self._read(request, context)
            except GatewayError as exc:
                refused = exc
            except BaseException:
                if held is not None:
                    self._service.release(held)
                raise

        async def run() -> Any:
            try:
                with self._service.admitted(_INFER_SPAN, metadata.trace_carrier, held) as call:
                    return await admitted_infer(call)
            finally:
                if held is not None:
                    self._service.release(held)  # not taken over (draining)

        async def admitted_infer(call: Call) -> Any:
            if refused is not None and not authenticated:
                raise refused
            who.append((await self._service.authenticate(call, metadata.authorization)).name)
            if refused is not None:
                raise refused
            if isinstance(request, Malformed):
                raise InvalidArgument(request.message)
            inputs = _decode_inputs(request)
            params = parse_params({k: _param_value(v) for k, v in request.parameters.items()})
            served, outputs = await self._service.infer(
                call,
                request.model_name,
                request.model_version or None,
                inputs,
                params,
                requested_outputs=[o.name for o in request.outputs],
                transport_timeout_s=context.time_remaining(),
                header=metadata.lookup,
            )
            response = pb.ModelInferResponse(
                model_name=served.name, model_version=served.version, id=request.id
            )
            for name, arr in outputs.items():
                response.outputs.add(
                    name=name, datatype=DTYPE_TO_DATATYPE[arr.dtype], shape=arr.shape
                )
                response.raw_output_contents.append(np.ascontiguousarray(arr).tobytes())
            return response

        try:
            return await run()
        except GatewayError as exc:
            error = exc
        # The message, and the frames that held it, go before any hold: a held refusal
        # keeps only its call slot (router/pacing.py).
        request = refused = None
        error.__traceback__ = error.__context__ = None
        if isinstance(error, ResourceExhausted):
            await self._service.refusals.hold(who[0] if who else None, context.time_remaining())
        await context.abort(error.grpc_code, error.message, error.grpc_trailers())
        raise error  # unreachable: abort raises

    async def _read(self, deferred: DeferredRequest, context: Any) -> Any:
        """The deferred message, within the call's deadline and the body timeout."""
        limit = self._service.settings.grpc_body_timeout_s
        left = context.time_remaining()
        if left is not None and left < limit:
            limit = left
        try:
            async with asyncio.timeout(limit):
                return await deferred.read()
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request message did not arrive within {limit:.3g} s"
            ) from None


def _decode_inputs(request: Any) -> list[InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    inputs: list[InputTensor] = []
    for i, t in enumerate(request.inputs):
        if raw:
            if t.HasField("contents"):
                raise InvalidArgument(f"input {t.name!r} has both contents and raw_input_contents")
            inputs.append(InputTensor(t.name, t.datatype, list(t.shape), raw=raw[i]))
            continue
        field = _CONTENTS_FIELD.get(t.datatype)
        if field is None:
            raise InvalidArgument(
                f"input {t.name!r}: datatype {t.datatype!r} needs raw_input_contents"
            )
        inputs.append(
            InputTensor(t.name, t.datatype, list(t.shape), values=getattr(t.contents, field))
        )
    return inputs


INFER_METHOD = SERVICE_PREFIX + "ModelInfer"


def build_grpc_server(
    service: InferenceService,
    max_message_bytes: int,
    max_concurrent_streams: int | None = None,
    max_concurrent_calls: int | None = None,
    reuse_port: bool = False,
) -> grpc.aio.Server:
    """A grpc.aio server on the running loop; the caller adds ports and starts it.

    The handlers are built as the generated ``add_GRPCInferenceServiceServicer_to_server``
    builds them, from :data:`METHODS`, with :func:`decode_request` as every method's
    deserializer, except that ModelInfer reads its message itself (key before body);
    health and reflection (:func:`~router.grpc_services.standard_rpcs`) are served too.
    ``max_concurrent_streams`` caps the calls open at once on one connection (HTTP/2
    SETTINGS_MAX_CONCURRENT_STREAMS); ``max_concurrent_calls`` those in progress on the
    server, beyond which grpc.aio answers RESOURCE_EXHAUSTED before reading the message.
    ``reuse_port`` lets other servers that ask the same share the port (SO_REUSEPORT);
    without it a second server on a taken port fails to bind.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", send_limit(max_message_bytes)),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    if max_concurrent_streams is not None:
        options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_calls)
    servicer = InferenceServicer(service)

    async def infer_streamed(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await servicer.ModelInfer(_GrpcioBody(context), context)

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=functools.partial(decode_request, request_type),
            response_serializer=response_type.SerializeToString,
        )
        for name, (request_type, response_type) in METHODS.items()
    }
    request_type, response_type = METHODS["ModelInfer"]
    handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
        infer_streamed,
        request_deserializer=functools.partial(decode_request, request_type),
        response_serializer=response_type.SerializeToString,
    )
    services = {SERVICE_PREFIX.strip("/"): handlers}
    for rpc in standard_rpcs(service):  # health and reflection
        services.setdefault(rpc.service, {})[rpc.name] = _GRPCIO_HANDLERS[rpc.cardinality](
            checked(rpc),
            request_deserializer=functools.partial(decode_request, rpc.request_type),
            response_serializer=rpc.response_type.SerializeToString,
        )
    for service_name, methods in services.items():
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service_name, methods),)
        )
        server.add_registered_method_handlers(service_name, methods)
    return server


_GRPCIO_HANDLERS: dict[Cardinality, Callable[..., grpc.RpcMethodHandler]] = {
    Cardinality.UNARY: grpc.unary_unary_rpc_method_handler,
    Cardinality.RESPONSE_STREAM: grpc.unary_stream_rpc_method_handler,
    Cardinality.BIDI_STREAM: grpc.stream_stream_rpc_method_handler,
}
