"""The replica's end of the data plane: one asyncio server on a loop of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import cast

from scheduler import BatchResult, ReplicaQueue, Tensors
from serving.dataplane.auth import ANSWER_SIZE, ClusterSecret, check_answer, hello
from serving.dataplane.codec import (
    LENGTH,
    MAX_MESSAGE,
    decode_batch,
    encode_error,
    encode_result,
    encode_stopping,
    frame,
)
from serving.dataplane.load import RowsInFlight

log = logging.getLogger(__name__)

# A connection must prove the cluster secret within this time, or it is closed: a
# stranger cannot hold the port's file descriptors (the gateway needs a few ms).
HANDSHAKE_TIMEOUT_S = 3.0
# Connections still in their handshake; beyond this, new ones are closed at once. The
# gateway's connections are long-lived, so a stranger filling the slots delays only its
# new ones, and never the replica's own health.
MAX_HANDSHAKES = 256
_REFUSAL_LOG_EVERY_S = 10.0


class ReplicaDataServer:
    """The replica's end: an asyncio server on a loop of its own (its own thread).

    Batches run inline on that loop, one at a time, as under Serve: two concurrent
    forwards on one reserved device would each measure the other's time and bill it
    twice. The lock also orders them against Serve's own calls of ``run_batch``.

    Which batch next: every frame that arrived during a forward is parsed in the
    loop's next poll (``_Link.data_received`` queues it at once), and the pick waits
    two hops of the loop, so it chooses from all of them, from every gateway, in
    :class:`~scheduler.ReplicaQueue`'s order: urgent first, then by priority level,
    then the batch whose tenants this replica has served least for their weight.
    One server listens on every address the replica is reached at (loopback for a
    gateway on its node, the node's address for the others), so that one order
    covers all the gateways. Not a forward thread: its two thread wake-ups per batch would
    cost more than the pick. The limit of reading between forwards: a frame
    larger than the socket buffers (a few hundred KB) is only partly read
    during a forward, so a large urgent batch can miss the next pick and run one
    batch later.

    A connection carries batches only after the gateway has proven the cluster secret
    (:mod:`serving.dataplane.auth`); until then, any byte beyond the handshake's, a wrong
    proof or a slow one closes it, before anything is decoded.

    ``load`` counts the rows of the batches received and not yet answered (what Serve's
    autoscaler scales on). Once :meth:`stop` begins, a batch that arrives is refused
    unrun with a "stopping" answer, which tells the gateway to send it elsewhere, while
    those already received still run.
    """

    def __init__(
        self,
        run_batch: Callable[[Tensors], BatchResult],
        secret: ClusterSecret,
        *,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        max_handshakes: int = MAX_HANDSHAKES,
        load: RowsInFlight | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.load = load if load is not None else RowsInFlight()
        self._stopping = False
        self._secret = secret
        self._handshake_timeout_s = handshake_timeout_s
        self._max_handshakes = max_handshakes
        self._handshaking = 0
        self._forward_lock = threading.Lock()
        self._loop = _new_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gpugate-data", daemon=True
        )
        self._servers: dict[str, asyncio.Server] = {}  # by the address it listens on
        # (inputs, the connection to answer on, rows)
        self._waiting: ReplicaQueue[tuple[Tensors, _Link, int]] = ReplicaQueue()
        self._pick_scheduled = False
        self._connections: set[_Link] = set()
        # Counters (tests, data_stats): batches run, connections admitted and refused.
        self.batches = 0
        self.admitted = 0
        self.refused = 0
        self._refusals_logged_at = -float("inf")
        self._refusals_unlogged = 0

    def start(self, host: str) -> str:
        """Listen on ``host`` (a free port), starting the loop the first time; the
        address to connect to. A host already listened on keeps its address."""
        for address in self._servers:
            if address.rpartition(":")[0] == host:
                return address
        if not self._thread.is_alive():
            self._thread.start()
        where = {"address": ""}

        async def listen() -> asyncio.Server:
            return await self._loop.create_server(lambda: _Link(self, where["address"]), host, 0)

        server = asyncio.run_coroutine_threadsafe(listen(), self._loop).result()
        address = where["address"] = f"{host}:{server.sockets[0].getsockname()[1]}"
        self._servers[address] = server
        return address

    @property
    def address(self) -> str:
        """The first address listened on ("" before :meth:`start`)."""
        return next(iter(self._servers), "")

    @property
    def addresses(self) -> list[str]:
        return list(self._servers)

    @property
    def healthy(self) -> bool:
        return not self._servers or self._thread.is_alive()

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new connections and new batches (these with a "stopping" answer), let
        the batches already received answer (up to ``grace_s``)."""
        if not self._servers:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._drain(grace_s), self._loop).result(grace_s + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._servers.clear()  # stopped: a second stop() has nothing to do

    async def _drain(self, grace_s: float) -> None:
        """Run what has arrived and let every answer reach its socket, up to the grace."""
        self._stopping = True
        for server in self._servers.values():
            server.close()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (
            self._waiting or any(conn.unsent for conn in self._connections)
        ):
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.close()

    # -- on the loop ------------------------------------------------------------

    def _note_refusal(self, peer: object, why: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusals_logged_at < _REFUSAL_LOG_EVERY_S:
            self._refusals_unlogged += 1  # a flood of strangers must not flood the log
            return
        more = f" (and {self._refusals_unlogged} more since)" if self._refusals_unlogged else ""
        log.warning("data plane: refused a connection from %s: %s%s", peer, why, more)
        self._refusals_logged_at, self._refusals_unlogged = now, 0

    def _received(self, conn: _Link, message: bytes) -> None:
        try:
            inputs, urgent, shares = decode_batch(message)
        except Exception as exc:
            log.warning("undecodable batch: %s", exc)
            conn.send(encode_error(f"{type(exc).__name__}: {exc}"))
            return
        if self._stopping:
            conn.send(encode_stopping())
            return
        rows = len(next(iter(inputs.values()))) if inputs else 0
        self.load.add(rows)
        self._waiting.push((inputs, conn, rows), shares, urgent=urgent)
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
        inputs, conn, rows = self._waiting.pop()
        try:
            if not conn.gone:  # the gateway gave up on it (cancelled): no one to answer
                conn.send(self._answer(inputs))
        finally:
            self.load.add(-rows)
            self._schedule_pick()  # whatever happened to this one, the rest still run

    def _answer(self, inputs: Tensors) -> bytes:
        try:
            with self._forward_lock:
                self.batches += 1
                result = self._run_batch(inputs)
            return encode_result(result)
        except Exception as exc:  # the model's own error: the gateway logs it, callers get 500
            log.warning("batch failed: %s", exc)
            return encode_error(f"{type(exc).__name__}: {exc}")


class _Link(asyncio.Protocol):
    """One gateway connection: the handshake, then length-prefixed frames in, one answer
    per frame out."""

    def __init__(self, server: ReplicaDataServer, address: str) -> None:
        self._server = server
        self._address = address  # the one it was reached at: the handshake proves it
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._admitted = False
        self._nonce = b""  # the replica's handshake nonce
        self._timer: asyncio.TimerHandle | None = None  # set while in the handshake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        server = self._server
        server._connections.add(self)
        if server._handshaking >= server._max_handshakes:
            self._refuse("too many connections in their handshake")
            return
        server._handshaking += 1
        opening, self._nonce = hello()
        self._transport.write(opening)
        # A forward holding the loop past the deadline does not refuse an answer that
        # arrived in time: both loops read the socket before they run due timers
        # (tests/unit/serving/dataplane/test_auth.py).
        self._timer = server._loop.call_later(
            server._handshake_timeout_s, self._refuse, "no handshake in time"
        )

    def _refuse(self, why: str) -> None:
        self._end_handshake()
        if self._transport is None or self._transport.is_closing():
            return
        self._server._note_refusal(self._transport.get_extra_info("peername"), why)
        self._transport.abort()  # no lingering: the stranger gets a reset

    def _end_handshake(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._server._handshaking -= 1

    def _handshake(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if len(buffer) < ANSWER_SIZE:
            return
        # The gateway waits for the replica's proof before it sends a frame, so bytes
        # past the answer are someone who does not speak the protocol.
        proof = None
        if len(buffer) == ANSWER_SIZE:
            proof = check_answer(self._server._secret, self._address, self._nonce, bytes(buffer))
        buffer.clear()
        if proof is None:
            self._refuse("the cluster secret was not proven")
            return
        assert self._transport is not None
        self._end_handshake()
        self._admitted = True
        self._server.admitted += 1
        self._transport.write(proof)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            if self._timer is not None:  # in the handshake; else refused: dropped unread
                self._handshake(data)
            return
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
        self._end_handshake()
        self._buffer.clear()
        self._server._connections.discard(self)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # installed with uvicorn[standard]; less latency per hop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
