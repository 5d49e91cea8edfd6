"""The direct data plane: batches go gateway -> model replica over one TCP hop.

Ray Serve keeps owning the replicas (placement, CPUs/GPUs, health checks,
restarts, scaling); only the batches bypass its request path. Each replica opens
a data port on an ephemeral port the first time it is asked for its address
(:meth:`ModelReplica.data_endpoint`, a Serve handle call), and the gateway keeps
a few connections per replica. Why: a Serve handle call cost ~1.8 ms p50 per
batch here and most of the gateway's CPU per batch; this hop ~0.1 ms
(loadtests/README.md, "Direct data plane").

Wire format: asyncio streams, each message a 4-byte little-endian length and a
KServe v2 protobuf (the proto this project already speaks): a batch is a
``ModelInferRequest`` with one ``raw_input_contents`` entry per tensor and its
numpy dtype in ``datatype``; the answer a ``ModelInferResponse`` with the measured
device time (or the model's error) in its parameters. Raw bytes only, nothing is
pickled. Not gRPC: a unary grpcio call between the same two processes measured
0.38-0.46 ms p50 against 0.06-0.09 ms for this, and the gateway's grpc.aio
completions add thread hops under load. A connection carries one batch at a
time, so no request ids or multiplexing are needed: the gateway opens one per
batch in flight (``max_in_flight`` bounds them) and reuses it.

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
import logging
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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


def encode_batch(inputs: Tensors) -> bytes:
    msg = pb.ModelInferRequest()
    encode_tensors(inputs, msg)
    return bytes(msg.SerializeToString())


def decode_batch(data: bytes) -> Tensors:
    msg = pb.ModelInferRequest.FromString(data)
    return decode_tensors(msg.inputs, msg.raw_input_contents)


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
    """

    def __init__(self, run_batch: Callable[[Tensors], BatchResult]) -> None:
        self._run_batch = run_batch
        self._forward_lock = threading.Lock()
        self._loop = _new_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gpugate-data", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._active = 0  # batches being run
        self._writers: set[asyncio.StreamWriter] = set()
        self.address = ""

    def start(self, host: str) -> str:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, host, 0), self._loop
        ).result()
        self._server = server
        port = server.sockets[0].getsockname()[1]
        self.address = f"{host}:{port}"
        return self.address

    @property
    def healthy(self) -> bool:
        return self._server is None or self._thread.is_alive()

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new connections, let running batches answer (up to ``grace_s``)."""
        if self._server is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._drain(grace_s), self._loop).result(grace_s + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _drain(self, grace_s: float) -> None:
        assert self._server is not None
        self._server.close()
        deadline = time.monotonic() + grace_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await read_frame(reader)
                self._active += 1
                try:
                    writer.write(frame(self._answer(request)))
                    await writer.drain()
                finally:
                    self._active -= 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the gateway closed the connection
        finally:
            self._writers.discard(writer)
            writer.close()

    def _answer(self, request: bytes) -> bytes:
        try:
            inputs = decode_batch(request)
            with self._forward_lock:
                result = self._run_batch(inputs)
            return encode_result(result)
        except Exception as exc:  # the model's own error: the gateway logs it, callers get 500
            log.warning("batch failed: %s", exc)
            return encode_error(f"{type(exc).__name__}: {exc}")


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

    async def run_batch(self, inputs: Tensors) -> BatchResult:
        payload = frame(encode_batch(inputs))
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
                writer.write(payload)
                data = await read_frame(reader)
                answered = True
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
                return decode_result(data)
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
