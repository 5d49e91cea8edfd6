"""The replica's end of the data plane: one asyncio server on a loop of its own."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import cast

from scheduler import BatchResult, Tensors
from serving.dataplane.codec import (
    LENGTH,
    MAX_MESSAGE,
    decode_batch,
    encode_error,
    encode_result,
    frame,
)

log = logging.getLogger(__name__)


class ReplicaDataServer:
    """The replica's end: an asyncio server on a loop of its own (its own thread).

    Batches run inline on that loop, one at a time, as under Serve: two concurrent
    forwards on one reserved device would each measure the other's time and bill it
    twice. The lock also orders them against Serve's own calls of ``run_batch``.

    Which batch next: every frame that arrived during a forward is parsed in the
    loop's next poll (``_Link.data_received`` queues it at once), and the pick waits
    two hops of the loop, so it chooses from all of them: urgent first, then in
    arrival order. Not a forward thread: its two thread wake-ups per batch would
    cost more than the pick. The limit of reading between forwards: a frame
    larger than the socket buffers (a few hundred KB) is only partly read
    during a forward, so a large urgent batch can miss the next pick and run one
    batch later.
    """

    def __init__(self, run_batch: Callable[[Tensors], BatchResult]) -> None:
        self._run_batch = run_batch
        self._forward_lock = threading.Lock()
        self._loop = _new_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gpugate-data", daemon=True
        )
        self._server: asyncio.Server | None = None
        # (0 urgent / 1 ordinary, arrival, inputs, the connection to answer on)
        self._waiting: list[tuple[int, int, Tensors, _Link]] = []
        self._arrivals = itertools.count()
        self._pick_scheduled = False
        self._connections: set[_Link] = set()
        self.address = ""

    def start(self, host: str) -> str:
        self._thread.start()

        async def listen() -> asyncio.Server:
            return await self._loop.create_server(lambda: _Link(self), host, 0)

        server = asyncio.run_coroutine_threadsafe(listen(), self._loop).result()
        self._server = server
        port = server.sockets[0].getsockname()[1]
        self.address = f"{host}:{port}"
        return self.address

    @property
    def healthy(self) -> bool:
        return self._server is None or self._thread.is_alive()

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new connections, let queued batches answer (up to ``grace_s``)."""
        if self._server is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._drain(grace_s), self._loop).result(grace_s + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._server = None  # stopped: a second stop() has nothing to do

    async def _drain(self, grace_s: float) -> None:
        """Run what has arrived and let every answer reach its socket, up to the grace."""
        assert self._server is not None
        self._server.close()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (
            self._waiting or any(conn.unsent for conn in self._connections)
        ):
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.close()

    # -- on the loop ------------------------------------------------------------

    def _received(self, conn: _Link, message: bytes) -> None:
        try:
            inputs, urgent = decode_batch(message)
        except Exception as exc:
            log.warning("undecodable batch: %s", exc)
            conn.send(encode_error(f"{type(exc).__name__}: {exc}"))
            return
        heapq.heappush(self._waiting, (0 if urgent else 1, next(self._arrivals), inputs, conn))
        self._schedule_pick()

    def _schedule_pick(self) -> None:
        if self._waiting and not self._pick_scheduled:
            self._pick_scheduled = True
            # Two hops, so that a poll of the loop runs before the pick on uvloop and on
            # asyncio's own loop alike: a handle queued now can run before the reads of
            # the next poll have been handled (with one hop, an urgent batch read in that
            # poll ran after an ordinary one always on asyncio's loop, at times on uvloop:
            # tests/unit/test_dataplane_order.py).
            self._loop.call_soon(self._loop.call_soon, self._pick)

    def _pick(self) -> None:
        self._pick_scheduled = False
        if not self._waiting:
            return
        try:
            _, _, inputs, conn = heapq.heappop(self._waiting)
            if not conn.gone:  # the gateway gave up on it (cancelled): no one to answer
                conn.send(self._answer(inputs))
        finally:
            self._schedule_pick()  # whatever happened to this one, the rest still run

    def _answer(self, inputs: Tensors) -> bytes:
        try:
            with self._forward_lock:
                result = self._run_batch(inputs)
            return encode_result(result)
        except Exception as exc:  # the model's own error: the gateway logs it, callers get 500
            log.warning("batch failed: %s", exc)
            return encode_error(f"{type(exc).__name__}: {exc}")


class _Link(asyncio.Protocol):
    """One gateway connection: length-prefixed frames in, one answer per frame out."""

    def __init__(self, server: ReplicaDataServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(buffer)
            if size > MAX_MESSAGE:
                log.warning("data plane: frame of %d bytes, closing the connection", size)
                self.close()
                return
            end = LENGTH.size + size
            if len(buffer) < end:
                return
            with memoryview(buffer) as view:  # one copy, not two
                message = bytes(view[LENGTH.size : end])
            del buffer[:end]
            self._server._received(self, message)

    @property
    def gone(self) -> bool:
        """Closed, closing or lost: nothing more can be sent."""
        return self._transport is None or self._transport.is_closing()

    @property
    def unsent(self) -> bool:
        """Answer bytes still queued in the transport (the socket would not take them)."""
        transport = self._transport
        return not self.gone and transport is not None and transport.get_write_buffer_size() > 0

    def send(self, answer: bytes) -> None:
        if not self.gone:
            assert self._transport is not None
            self._transport.write(frame(answer))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._buffer.clear()
        self._server._connections.discard(self)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # installed with uvicorn[standard]; less latency per hop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
