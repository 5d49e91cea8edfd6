"""KServe v2 over gRPC on gRPC C++ (``server.grpc_server: native``).

The same :class:`~router.grpc_server.InferenceServicer` answers; only the
transport differs. gRPC C++'s core (``router/native/grpcdoor.cc``, compiled into
``router._grpcdoor`` by the package build when gRPC C++ is installed; docs/grpc.md)
reads HTTP/2 on a thread of its own, without the GIL, and queues each call once its
request message is in (ModelInfer: once its headers are, below); an eventfd wakes the
event loop, which takes every queued call and message in one go. So the loop pays one
wake-up for many calls, where grpc.aio pays several completions through its poller
thread for each.

ModelInfer calls come to Python as soon as their metadata is in, without their message
(key before body): the servicer authenticates the caller first and only then asks the
door to read the message (:class:`_NativeBody`), so a call with a missing or unknown
key is answered UNAUTHENTICATED with its message unread. Other methods need no key and
come with their message, as before. The door also caps the streams of one connection
and the calls in progress (answered RESOURCE_EXHAUSTED at Accept), and serves TLS from
files that :class:`~router.tls.TlsMaterial` validates and keeps current.

Health checking and server reflection (:mod:`router.grpc_services`) are streams too:
their calls come with their first message like any other, and Python then writes the
answer's messages one at a time (``Door.write``, each awaited until the door has
written it) and, for reflection, reads the caller's next messages (``Door.read``)
until the caller half-closes.

Deadlines, cancellation, message limits and status codes behave as on grpc.aio:
core enforces ``grpc-timeout`` and the size limits itself; a call it cancels
(deadline or client) cancels the handler's task; an abort becomes the call's
status; an unexpected exception is UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any

import grpc

from router.grpc_server import (
    INFER_METHOD,
    METHODS,
    SERVICE_PREFIX,
    DeferredRequest,
    InferenceServicer,
    checked,
    decode_request,
    send_limit,
)
from router.grpc_services import Cardinality, standard_rpcs
from router.service import InferenceService
from router.tls import TlsMaterial

log = logging.getLogger(__name__)

# (cardinality, decode the request bytes, the handler)
_Handler = tuple[Cardinality, Callable[[bytes], Any], Callable[[Any, Any], Any]]

# Outstanding accepts (for calls of any method) that gRPC's core holds. Core's thread
# asks again as each call arrives, so this only has to cover the calls that arrive
# together between two turns of that thread.
DEFAULT_ACCEPTS = 64


def load() -> ModuleType:
    """The compiled door, or ImportError saying how to build it."""
    try:
        return importlib.import_module("router._grpcdoor")
    except ImportError as exc:
        raise ImportError(
            f"the native gRPC door (router._grpcdoor) is not built ({exc}): install a C++ "
            "compiler, pkg-config and gRPC C++'s development files, then reinstall gpugate "
            "(docs/grpc.md)"
        ) from exc


def available() -> str | None:
    """None when the native door can run here, else why not."""
    try:
        load()
    except ImportError as exc:
        return str(exc)
    return None


class _NativeBody(DeferredRequest):
    """A ModelInfer message the door has not read yet: :meth:`read` starts the Read and
    waits for the message."""

    __slots__ = ("_call_id", "_decode", "_server")

    def __init__(self, server: NativeServer, call_id: int, decode: Callable[[bytes], Any]) -> None:
        self._server = server
        self._call_id = call_id
        self._decode = decode

    async def read(self) -> Any:
        payload = await self._server._read_body(self._call_id)
        if payload is None:
            # The call ended (a reset, a deadline, an over-size message) before its
            # message was in; core reports it as cancelled, perhaps in a later wake-up.
            raise asyncio.CancelledError("the call ended before its message came")
        return self._decode(payload)


class _Abort(Exception):
    def __init__(
        self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailers = trailers


class _Context:
    """The part of grpc.aio's ServicerContext that InferenceServicer uses."""

    __slots__ = ("_deadline", "_loop", "_metadata")

    def __init__(
        self,
        metadata: tuple[tuple[str, str | bytes], ...],
        left: float | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._metadata = metadata
        self._loop = loop
        self._deadline = None if left is None else loop.time() + left

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - self._loop.time(), 0.0)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        raise _Abort(code, details, tuple(trailing_metadata))


_OK = grpc.StatusCode.OK.value[0]
_CANCELLED = grpc.StatusCode.CANCELLED.value[0]
_UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]


class NativeServer:
    """Start/stop like FrontDoors needs it; ``port`` is known after :meth:`start`."""

    def __init__(
        self,
        service: InferenceService,
        max_message_bytes: int,
        accepts: int = DEFAULT_ACCEPTS,
        *,
        max_concurrent_streams: int = 2**31 - 1,
        max_concurrent_calls: int = 2**63 - 1,
        tls: TlsMaterial | None = None,
    ) -> None:
        self._native = load()
        servicer = InferenceServicer(service)
        self._handlers: dict[str, _Handler] = {
            SERVICE_PREFIX + name: (
                Cardinality.UNARY,
                functools.partial(decode_request, request_type),
                getattr(servicer, name),
            )
            for name, (request_type, _) in METHODS.items()
        }
        for rpc in standard_rpcs(service):  # health and reflection
            decode = functools.partial(decode_request, rpc.request_type)
            self._handlers[rpc.path] = (rpc.cardinality, decode, checked(rpc))
        self._max_receive = max_message_bytes
        self._max_send = send_limit(max_message_bytes)
        self._accepts = max(accepts, 1)
        self._max_streams = max_concurrent_streams
        self._max_calls = max_concurrent_calls
        self._tls = tls
        self._door: Any = None
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._bodies: dict[int, asyncio.Future[bytes | None]] = {}  # reads waiting
        self._writes: dict[int, asyncio.Future[bool]] = {}  # streamed writes waiting
        self.port = 0
        # Requests handed to handlers (read by tests): a ModelInfer call counts once its
        # message is delivered, as the service sees it only from then on.
        self.taken = 0

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0: a free port); the port. ``reuse_port`` shares it
        with other servers that ask the same (SO_REUSEPORT), else a taken port fails."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tls = None
        if self._tls is not None:
            identity, ca = self._tls.native_files()
            tls = (
                str(identity),
                str(identity),
                str(ca) if ca is not None else "",
                max(round(self._tls.files.reload_interval_s), 1),
            )
        try:
            self._door = self._native.Door(
                address,
                self._max_receive,
                self._max_send,
                self._accepts,
                max_streams=self._max_streams,
                max_calls=self._max_calls,
                deferred_method=INFER_METHOD,
                tls=tls,
                reuse_port=reuse_port,
            )
        except OSError as exc:
            raise RuntimeError(f"cannot bind gRPC port {host}:{port}: {exc}") from exc
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._door.fileno(), self._take)
        self.port = int(self._door.port)
        return self.port

    def _take(self) -> None:
        loop = self._loop
        assert loop is not None
        calls, cancelled, bodies, written = self._door.take()
        for call_id, payload in bodies:
            waiter = self._bodies.pop(call_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(payload)
                self.taken += payload is not None
        for call_id, ok in written:
            write = self._writes.pop(call_id, None)
            if write is not None and not write.done():
                write.set_result(ok)
        for call_id, method, payload, metadata, left in calls:
            task = loop.create_task(self._handle(call_id, method, payload, metadata, left))
            self._tasks[call_id] = task
            self.taken += payload is not None
        for call_id in cancelled:
            # After the handlers' first steps (create_task queued those just above):
            # a call taken and cancelled in the same wake-up still enters the service
            # and is counted there (499), as on grpc.aio, instead of never starting.
            loop.call_soon(self._cancel, call_id)

    def _cancel(self, call_id: int) -> None:
        task = self._tasks.get(call_id)
        if task is None:
            return
        task.cancel()
        # A task cancelled before its first step never runs _handle's finally.
        task.add_done_callback(lambda _: self._unstarted_ended(call_id))

    def _unstarted_ended(self, call_id: int) -> None:
        if self._tasks.pop(call_id, None) is not None:  # _handle's finally did not run
            self._door.finish(call_id, _CANCELLED, "Cancelled", None)

    async def _read_body(self, call_id: int) -> bytes | None:
        assert self._loop is not None
        waiter: asyncio.Future[bytes | None] = self._loop.create_future()
        if not self._door.read(call_id):
            return None  # the call is over (or was not deferred)
        self._bodies[call_id] = waiter
        try:
            return await waiter
        finally:
            self._bodies.pop(call_id, None)

    async def _write(self, call_id: int, message: bytes) -> None:
        """One message of a streamed answer, returning once the door has written it."""
        assert self._loop is not None
        written: asyncio.Future[bool] = self._loop.create_future()
        if not self._door.write(call_id, message):
            raise asyncio.CancelledError("the call is over")
        self._writes[call_id] = written
        try:
            ok = await written
        finally:
            self._writes.pop(call_id, None)
        if not ok:  # core reports the call as cancelled, perhaps in a later wake-up
            raise asyncio.CancelledError("the call ended while its answer was written")

    async def _requests(
        self, call_id: int, first: Any, decode: Callable[[bytes], Any]
    ) -> AsyncIterator[Any]:
        """A stream's messages: the first (taken with the call), then each read on, until
        the caller half-closes."""
        yield first
        while (payload := await self._read_body(call_id)) is not None:
            yield decode(payload)

    async def _respond(
        self,
        call_id: int,
        cardinality: Cardinality,
        run: Callable[[Any, Any], Any],
        request: Any,
        context: _Context,
        decode: Callable[[bytes], Any],
    ) -> bytes | None:
        """Run the handler: a unary one's answer, serialized; a stream's answer written
        message by message (None)."""
        if cardinality is Cardinality.UNARY:
            response = await run(request, context)
            return bytes(response.SerializeToString())
        if cardinality is Cardinality.BIDI_STREAM:
            request = self._requests(call_id, request, decode)
        async with contextlib.aclosing(run(request, context)) as responses:
            async for response in responses:
                await self._write(call_id, response.SerializeToString())
        return None

    async def _handle(
        self,
        call_id: int,
        method: str,
        payload: bytes | None,
        metadata: tuple[tuple[str, str | bytes], ...],
        left: float | None,
    ) -> None:
        assert self._loop is not None
        code, details, body = _OK, "", None
        trailers: tuple[tuple[str, str], ...] = ()
        try:
            handler = self._handlers.get(method)
            if handler is None:
                code, details = _UNIMPLEMENTED, "Method not found!"
                return
            cardinality, decode, run = handler
            request = decode(payload) if payload is not None else _NativeBody(self, call_id, decode)
            context = _Context(metadata, left, self._loop)
            body = await self._respond(call_id, cardinality, run, request, context, decode)
        except _Abort as exc:
            code, details, trailers = exc.code.value[0], exc.details, exc.trailers
        except asyncio.CancelledError:
            code, details = _CANCELLED, "Cancelled"  # by core: the caller or its deadline
        except Exception as exc:
            log.exception("gRPC handler %s failed", method)
            code, details = _UNKNOWN, f"Unexpected {type(exc).__name__}"
        finally:
            self._tasks.pop(call_id, None)
            self._door.finish(call_id, code, details, body, trailers)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; calls in progress get ``grace_s`` to finish, the rest are
        cancelled (CANCELLED to their callers)."""
        if self._door is None or self._stopped:
            return
        # Shutdown blocks until the calls in progress end, and they end on this loop.
        await asyncio.to_thread(self._door.shutdown, grace_s)
        assert self._loop is not None
        self._take()  # the cancellations shutdown reported
        self._loop.remove_reader(self._door.fileno())
        tasks = dict(self._tasks)  # _cancel's callbacks remove entries
        for call_id in tasks:
            self._cancel(call_id)
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        self._stopped = True
