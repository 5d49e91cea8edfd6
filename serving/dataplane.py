"""The direct data plane: batches go gateway -> model replica over one TCP hop.

Ray Serve keeps owning the replicas (placement, CPUs/GPUs, health checks,
restarts, scaling); only the batches bypass its request path. Each replica opens
a data port on an ephemeral port the first time it is asked for its address
(:meth:`ModelReplica.data_endpoint`, a Serve handle call), and the gateway keeps
a few connections per replica. Why: a Serve handle call cost ~1.8 ms p50 per
batch here and most of the gateway's CPU per batch; this hop ~0.1 ms
(loadtests/README.md, "Direct data plane").

Wire format: TCP (asyncio streams on the gateway's side, an asyncio Protocol on the
replica's), each message a 4-byte little-endian length and a
KServe v2 protobuf (the proto this project already speaks): a batch is a
``ModelInferRequest`` with one ``raw_input_contents`` entry per tensor and its
numpy dtype in ``datatype``; the answer a ``ModelInferResponse`` with the measured
device time (or the model's error) in its parameters. Raw bytes only, nothing is
pickled. Not gRPC: a unary grpcio call between the same two processes measured
0.38-0.46 ms p50 against 0.06-0.09 ms for this, and the gateway's grpc.aio
completions add thread hops under load. A connection carries one batch at a
time, so no request ids or multiplexing are needed: the gateway opens one per
batch in flight (``max_in_flight`` bounds them) and reuses it.

Order at the replica: batches run one at a time; of those that have arrived, a
latency-lane batch (``urgent`` in the request's parameters) goes before the
ordinary ones waiting, never before the one running.

Failure handling: a connection that is refused, reset or closed mid-batch means
the replica is gone: its address is forgotten, the batch is retried once on
another known replica (the forward has no side effects and only an answer is
billed), else it fails with :class:`BackendUnavailableError` (a retryable 503).
The next batch asks Serve again, which answers from a live (or restarted)
replica. Addresses are also refreshed every ``refresh_s``, so scaled-up replicas
get traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import logging
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from gpugate_proto import grpc_service_pb2 as pb

from scheduler import BackendError, BackendUnavailableError, BatchResult, Tensors

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
_MAX_MESSAGE = 2**31 - 1  # protobuf's own limit
_DISCOVERY_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 5.0
# While fewer replicas are known than the version has, discovery runs again this often
# (Serve may route every discovery call of a round to the same replica).
_SHORT_REFRESH_S = 0.2


# --------------------------------------------------------------------------- codec


def encode_tensors(tensors: Mapping[str, np.ndarray[Any, Any]], msg: Any) -> None:
    """Append ``tensors`` to ``msg`` (a request's inputs or a response's outputs)."""
    is_request = isinstance(msg, pb.ModelInferRequest)
    specs = msg.inputs if is_request else msg.outputs
    raw = msg.raw_input_contents if is_request else msg.raw_output_contents
    for name, arr in tensors.items():
        if arr.dtype.hasobject:
            raise TypeError(f"tensor {name!r} has dtype object: only raw numeric data travels")
        specs.add(name=name, datatype=arr.dtype.str, shape=arr.shape)
        raw.append(np.ascontiguousarray(arr).tobytes())


def decode_tensors(specs: Any, raw: Any) -> Tensors:
    if len(specs) != len(raw):
        raise ValueError(f"{len(raw)} raw buffers for {len(specs)} tensors")
    out: Tensors = {}
    for spec, data in zip(specs, raw, strict=True):
        dtype = np.dtype(spec.datatype)
        if dtype.hasobject:
            raise ValueError(f"tensor {spec.name!r}: dtype object is not accepted")
        out[spec.name] = np.frombuffer(data, dtype=dtype).reshape(tuple(spec.shape))
    return out


def encode_result(result: BatchResult) -> bytes:
    msg = pb.ModelInferResponse()
    encode_tensors(result.outputs, msg)
    msg.parameters["device_ns"].int64_param = result.device_ns
    msg.parameters["device"].string_param = result.device
    msg.parameters["device_share"].double_param = result.device_share
    return bytes(msg.SerializeToString())


def encode_error(message: str) -> bytes:
    msg = pb.ModelInferResponse()
    msg.parameters["error"].string_param = message[:2000]
    return bytes(msg.SerializeToString())


class ReplicaError(Exception):
    """The replica could not run the batch (the model's own error, or bad input)."""


def decode_result(data: bytes) -> BatchResult:
    msg = pb.ModelInferResponse.FromString(data)
    if "error" in msg.parameters:
        raise ReplicaError(msg.parameters["error"].string_param)
    return BatchResult(
        outputs=decode_tensors(msg.outputs, msg.raw_output_contents),
        device_ns=msg.parameters["device_ns"].int64_param,
        device=msg.parameters["device"].string_param,
        device_share=msg.parameters["device_share"].double_param,
    )


def encode_batch(inputs: Tensors, urgent: bool = False) -> bytes:
    msg = pb.ModelInferRequest()
    encode_tensors(inputs, msg)
    if urgent:
        msg.parameters["urgent"].bool_param = True
    return bytes(msg.SerializeToString())


def decode_batch(data: bytes) -> tuple[Tensors, bool]:
    """The batch's tensors, and whether it is a latency-lane batch."""
    msg = pb.ModelInferRequest.FromString(data)
    urgent = "urgent" in msg.parameters and msg.parameters["urgent"].bool_param
    return decode_tensors(msg.inputs, msg.raw_input_contents), urgent


def frame(message: bytes) -> bytes:
    return _LENGTH.pack(len(message)) + message


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > _MAX_MESSAGE:
        raise ConnectionError(f"frame of {size} bytes")
    return await reader.readexactly(size)


# --------------------------------------------------------------------------- replica side


class ReplicaDataServer:
    """The replica's end: an asyncio server on a loop of its own (its own thread).

    Batches run inline on that loop, one at a time, as under Serve: two concurrent
    forwards on one reserved device would each measure the other's time and bill it
    twice. The lock also orders them against Serve's own calls of ``run_batch``.

    Which batch next: every frame that arrived during a forward is parsed in the
    loop's next poll (``_Link.data_received`` queues it at once), and the pick waits
    two hops of the loop, so it chooses from all of them: urgent first, then in
    arrival order. Not a forward thread: its two thread wake-ups cost ~0.45 ms per
    batch here at concurrency 1. The limit of reading between forwards: a frame
    larger than the socket buffers (a few hundred KB here) is only partly read
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
        while len(buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer)
            if size > _MAX_MESSAGE:
                log.warning("data plane: frame of %d bytes, closing the connection", size)
                self.close()
                return
            end = _LENGTH.size + size
            if len(buffer) < end:
                return
            with memoryview(buffer) as view:  # one copy, not two
                message = bytes(view[_LENGTH.size : end])
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
        import uvloop  # installed with uvicorn[standard]; ~30% less latency per hop here
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


# --------------------------------------------------------------------------- gateway side


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(eq=False)
class _Replica:
    address: str
    idle: list[_Connection] = field(default_factory=list)
    in_flight: int = 0
    gone: bool = False
    last_answer_ns: int = 0  # when its latest answer arrived (perf_counter_ns)

    async def connect(self) -> _Connection:
        if self.idle:
            return self.idle.pop()
        host, _, port = self.address.rpartition(":")
        return await asyncio.wait_for(asyncio.open_connection(host, int(port)), _CONNECT_TIMEOUT_S)

    def close(self) -> None:
        self.gone = True
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class DirectBatchBackend:
    """scheduler.Backend that sends batches straight to the replicas' data ports.

    ``discover`` asks Serve for one live replica's address (a handle call that Serve
    routes like any other). Batches go to the known replica with the fewest batches
    in flight. A batch whose replica turns out gone is tried once more on another
    known replica; with none left it fails as unavailable.
    """

    def __init__(
        self,
        discover: Callable[[], Awaitable[str]],
        *,
        expected_replicas: int = 1,
        refresh_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._discover = discover
        self._expected = max(1, expected_replicas)
        self._refresh_s = refresh_s
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._refreshed_at = -float("inf")
        self._refresh: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        return sorted(self._replicas)

    async def run_batch(self, inputs: Tensors, *, urgent: bool = False) -> BatchResult:
        payload = frame(encode_batch(inputs, urgent))
        tried: set[str] = set()
        while True:
            if self._closed:
                raise BackendUnavailableError("the model version is shutting down")
            replica = await self._pick(tried)
            tried.add(replica.address)
            replica.in_flight += 1
            conn: _Connection | None = None
            answered = False
            try:
                conn = await replica.connect()
                reader, writer = conn
                sent_ns = time.perf_counter_ns()
                writer.write(payload)
                data = await read_frame(reader)
                answered = True
                # The replica runs one batch at a time, in its order: an answer that came
                # back after this batch was sent was a batch ahead of it there, so until
                # then this one waited (its return transfer aside). For the statistics.
                answered_ns = time.perf_counter_ns()
                wait_ns = max(0, replica.last_answer_ns - sent_ns)
                replica.last_answer_ns = answered_ns
            except (TimeoutError, OSError, EOFError) as exc:
                # Refused, reset or closed mid-batch (IncompleteReadError is an EOFError).
                log.warning("replica %s unavailable: %s", replica.address, exc)
                self._forget(replica)
                if not any(a not in tried for a in self._replicas):
                    raise BackendUnavailableError("no model replica is available") from exc
                continue
            finally:
                replica.in_flight -= 1
                if conn is not None:
                    if answered and not replica.gone:
                        replica.idle.append(conn)
                    else:  # e.g. cancelled mid-batch: its answer would reach the next one
                        conn[1].close()
            try:
                return dataclasses.replace(decode_result(data), wait_ns=wait_ns)
            except ReplicaError as exc:
                # The detail (paths, model internals) goes to the log, not the caller.
                log.warning("batch failed on replica %s: %s", replica.address, exc)
                raise BackendError("the model failed to run the batch") from exc

    async def close(self) -> None:
        """Stop: no new batches; closes the connections (call after the batcher drained)."""
        self._closed = True
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        for replica in list(self._replicas.values()):
            self._forget(replica)

    # -- replica addresses ------------------------------------------------------

    async def _pick(self, tried: set[str]) -> _Replica:
        age = self._clock() - self._refreshed_at
        short = len(self._replicas) < self._expected and age > _SHORT_REFRESH_S
        stale = short or age > self._refresh_s
        if (not self._replicas or stale) and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.get_running_loop().create_task(
                self._discover_all(), name="gpugate-replica-discovery"
            )
            self._refresh.add_done_callback(_log_failure)
        candidates = [r for r in self._replicas.values() if r.address not in tried]
        if not candidates and self._refresh is not None:
            try:
                await asyncio.shield(self._refresh)
            except Exception as exc:
                raise BackendUnavailableError("no model replica is available") from exc
            candidates = [r for r in self._replicas.values() if r.address not in tried]
        if not candidates:
            raise BackendUnavailableError("no model replica is available")
        return min(candidates, key=lambda r: r.in_flight)

    async def _discover_all(self) -> None:
        # Serve spreads concurrent calls over its replicas; a few more calls than
        # replicas find every one with high probability, the next round the rest.
        n = max(self._expected, len(self._replicas))
        calls = 1 if n == 1 else 2 * n
        answers = await asyncio.wait_for(
            asyncio.gather(*(self._discover() for _ in range(calls)), return_exceptions=True),
            _DISCOVERY_TIMEOUT_S,
        )
        found = {a for a in answers if isinstance(a, str)}
        if not found:
            errors = [a for a in answers if isinstance(a, BaseException)]
            raise errors[0] if errors else RuntimeError("no replica answered")
        self._refreshed_at = self._clock()
        for address in found - set(self._replicas):
            if self._closed:
                return
            self._replicas[address] = _Replica(address)
            log.info("data plane: replica at %s", address)

    def _forget(self, replica: _Replica) -> None:
        replica.close()
        if self._replicas.get(replica.address) is replica:
            del self._replicas[replica.address]


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("data plane: replica discovery failed: %s", exc)
