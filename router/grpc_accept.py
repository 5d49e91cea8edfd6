"""More than one outstanding accept for grpc.aio's hot method.

grpc.aio's server asks gRPC's core for the next call of each method one at a
time: it requests a call, waits for the completion to cross from core's poller
thread to the event loop, starts the handler, and only then requests the next
one. Under load that hand-off takes a few loop iterations, so calls queue
inside core, in arrival order and before any handler has seen their tenant,
at about 1,000 calls/s here however idle the model is (loadtests/README.md,
"gRPC accept slots"). :class:`Acceptors` keeps ``count`` more requests for one
method outstanding, so up to that many calls move from core to the handlers
(and on to the tenant-fair queue) per loop iteration.

The calls it accepts are handled by grpcio's own ``_handle_rpc`` and
``_schedule_rpc_coro`` (deadlines, cancellation, metadata, status codes all as
usual); only who requested the call differs. These are grpcio internals, so
:func:`unsupported` checks for them first and the door falls back to grpcio's
single accept loop, with a warning, when a grpcio release lacks them.
Interceptors are not applied to these calls: the router registers none.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

import grpc

log = logging.getLogger(__name__)

# Outstanding ModelInfer accepts by default (server.grpc_accepts); 1 is grpcio's own.
DEFAULT_ACCEPTS = 64

try:
    from grpc._cython import cygrpc
except ImportError:  # pragma: no cover - grpcio always ships it
    cygrpc = None

# The exact parameters the calls below pass, positionally.
_NEEDS = {
    "_handle_rpc": (
        "method_name",
        "method_resolver",
        "interceptors",
        "rpc_state",
        "loop",
        "concurrency_exceeded",
    ),
    "_schedule_rpc_coro": ("rpc_coro", "rpc_state", "loop", "method_name"),
}
# How long stop() waits for the accepts to end on their own once the server stopped.
_STOP_WAIT_S = 5.0


def unsupported() -> str | None:
    """Why this grpcio cannot take extra accepts, or None when it can."""
    if cygrpc is None:
        return "grpc._cython.cygrpc is missing"
    for name, params in _NEEDS.items():
        fn = getattr(cygrpc, name, None)
        if fn is None:
            return f"grpcio {grpc.__version__} has no cygrpc.{name}"
        try:
            got = tuple(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            return f"cannot read the signature of cygrpc.{name}"
        if got != params:
            return f"cygrpc.{name} takes {got}, expected {params}"
    if not hasattr(cygrpc, "_MethodResolver"):
        return f"grpcio {grpc.__version__} has no cygrpc._MethodResolver"
    if not hasattr(cygrpc.AioServer, "_request_registered_call"):
        return f"grpcio {grpc.__version__} has no AioServer._request_registered_call"
    return None


def start_acceptors(
    server: grpc.aio.Server,
    handlers: dict[str, grpc.RpcMethodHandler],
    method: str,
    total: int,
) -> Acceptors | None:
    """Bring ``method``'s outstanding accepts on a started server up to ``total``.

    grpcio keeps one itself, so this starts ``total - 1`` more; None when
    ``total`` is 1, or (with a warning) when this grpcio or the registered
    handlers do not allow it.
    """
    if total <= 1:
        return None
    reason = unsupported()
    handler = handlers.get(method)
    if reason is None and handler is None:
        reason = f"{method} is not a registered method"
    if reason is not None:
        log.warning("server.grpc_accepts ignored (one accept at a time): %s", reason)
        return None
    assert handler is not None
    acceptors = Acceptors(server, method, handler, total - 1)
    acceptors.start()
    return acceptors


class Acceptors:
    """``count`` extra outstanding requests for calls of ``method`` on a started server."""

    def __init__(
        self, server: grpc.aio.Server, method: str, handler: grpc.RpcMethodHandler, count: int
    ) -> None:
        self._core: Any = server._server  # cygrpc.AioServer
        self._method = method
        self._handler = handler
        self._count = count
        self._tasks: list[asyncio.Task[None]] = []
        self._rpcs: set[asyncio.Task[Any]] = set()
        self.accepted = 0  # calls started by these accepts (read by tests)
        self._warned = False

    def start(self) -> None:
        assert cygrpc is not None
        loop = asyncio.get_running_loop()
        resolver = cygrpc._MethodResolver([], {self._method: self._handler})
        self._tasks = [
            loop.create_task(self._accept(loop, resolver), name=f"grpc-accept-{i}")
            for i in range(self._count)
        ]

    async def stop(self) -> None:
        """Wait for the accepts to end; call after the server's own stop.

        Shutting the server down fails every pending request in core, which ends
        each accept. They are not cancelled while core may still hold their
        requests: core writes the call it matches into the awaiting RPCState.
        """
        if self._core.is_running():  # the server's stop failed: leave them to core
            log.warning("gRPC server still running; its extra accepts stay")
            return
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=_STOP_WAIT_S)
        if pending:  # not seen; the loop is going away anyway
            log.warning("%d gRPC accepts still pending after shutdown; cancelling", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _accept(self, loop: asyncio.AbstractEventLoop, resolver: Any) -> None:
        assert cygrpc is not None
        method = self._method.encode()
        while self._core.is_running():
            try:
                state = await self._core._request_registered_call(method)
            except Exception as exc:
                if not self._core.is_running():
                    return  # shutdown fails the pending request; that is the way out
                if isinstance(exc, getattr(cygrpc, "_RequestCallError", ())):
                    continue  # core failed this one request; ask again, as grpcio does
                # A synchronous refusal repeats forever: stop this accept, grpcio's own
                # accept loop keeps serving.
                self._stopped_by(exc)
                return
            # No interceptors and no concurrency limit: the router's server has neither
            # (build_grpc_server); grpcio's own loop would apply them to its calls only.
            coro = cygrpc._handle_rpc(self._method, resolver, (), state, loop, False)
            rpc = loop.create_task(cygrpc._schedule_rpc_coro(coro, state, loop, self._method))
            self._rpcs.add(rpc)  # the loop keeps only weak references to tasks
            rpc.add_done_callback(self._rpcs.discard)
            self.accepted += 1

    def _stopped_by(self, exc: Exception) -> None:
        if not self._warned:  # once, not once per accept
            self._warned = True
            log.warning("extra gRPC accepts stopping, grpcio's own accept goes on: %s", exc)
