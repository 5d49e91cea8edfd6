"""KServe v2 over gRPC on grpclib: HTTP/2 parsed on the event loop itself.

The same :class:`~router.grpc_server.InferenceServicer` answers; only the
transport differs from grpc.aio. grpc.aio hands every completion from gRPC's
core threads through a poller thread to the loop; inside a Ray Serve replica,
whose loop shares the GIL with Serve's router loop, Ray's own loop and the
ledger thread, those hand-offs cost more than the pure-Python HTTP/2 parsing
does (loadtests/README.md, "gRPC front door").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Handler as StreamHandler
from grpclib.server import Server, Stream

from router.grpc_server import METHODS, SERVICE_PREFIX, InferenceServicer, decode_request
from router.service import InferenceService


class _CappedCodec(ProtoCodec):
    """grpclib has no message-size option: refuse as grpc core does (RESOURCE_EXHAUSTED).
    An undecodable message goes on as :class:`~router.grpc_server.Malformed`."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self._max_bytes:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({len(data)} vs. {self._max_bytes})",
            )
        return decode_request(message_type, data)


class _Context:
    """The part of grpc.aio's ServicerContext that InferenceServicer uses."""

    def __init__(self, stream: Stream[Any, Any]) -> None:
        self._stream = stream

    def invocation_metadata(self) -> list[tuple[str, str | bytes]]:
        return list((self._stream.metadata or {}).items())

    def time_remaining(self) -> float | None:
        deadline = self._stream.deadline
        return None if deadline is None else max(deadline.time_remaining(), 0.0)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise GRPCError(Status(code.value[0]), details)


_Method = Callable[[Any, Any], Awaitable[Any]]


def _handler(method: _Method) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
    async def handle(stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        response = await method(request, _Context(stream))
        await stream.send_message(response)

    return handle


class _Servable:
    def __init__(self, servicer: InferenceServicer) -> None:
        self._servicer = servicer

    def __mapping__(self) -> dict[str, Handler]:
        return {
            SERVICE_PREFIX + name: Handler(
                _handler(getattr(self._servicer, name)), Cardinality.UNARY_UNARY, req, resp
            )
            for name, (req, resp) in METHODS.items()
        }


class _CountingHandler(StreamHandler):
    """grpclib's per-connection handler, with a client's reset acted on one step later.

    grpclib cancels a stream's task as soon as the client resets the stream. On a
    busy loop the headers, the message and the reset (the client's deadline) can
    arrive in one read: the task is then cancelled before its first step, never
    enters :meth:`InferenceService.admitted`, and the call is neither answered nor
    counted. Cancelling one loop step later lets a call whose message is here enter
    the service and be counted as cancelled (499), as on grpc.aio and the native door.
    """

    def cancel(self, stream: Any) -> None:
        self.loop.call_soon(self._cancel_if_running, stream)

    def _cancel_if_running(self, stream: Any) -> None:
        if stream in self._tasks:  # not yet collected as done
            super().cancel(stream)


class _Server(Server):
    def _protocol_factory(self) -> H2Protocol:
        # grpclib's own factory (0.4), with the handler above.
        self.__gc_step__()
        handler = _CountingHandler(
            self._mapping, self._codec, self._status_details_codec, self.__dispatch__
        )
        self._handlers.add(handler)
        return H2Protocol(handler, self._config, self._h2_config)


class GrpclibServer:
    """Start/stop like FrontDoors needs it; ``port`` is known after :meth:`start`."""

    def __init__(self, service: InferenceService, max_message_bytes: int) -> None:
        self._server = _Server(
            [_Servable(InferenceServicer(service))], codec=_CappedCodec(max_message_bytes)
        )
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        try:
            await self._server.start(host, port, reuse_address=True)
        except OSError as exc:
            raise RuntimeError(f"cannot bind gRPC port {host}:{port}: {exc}") from exc
        # grpclib has no accessor for the bound port (port 0 picks one); asyncio's and
        # uvloop's servers both list their sockets.
        bound: Any = self._server._server
        self.port = int(bound.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, grace_s: float) -> None:
        self._server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), timeout=grace_s + 5)
