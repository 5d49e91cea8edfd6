"""The direct data plane: batches go gateway -> model replica over plain gRPC.

Ray Serve keeps owning the replicas (placement, CPUs/GPUs, health checks,
restarts, scaling); only the batches bypass its request path. Each replica opens
a gRPC server on an ephemeral port the first time it is asked for its address
(:meth:`ModelReplica.data_endpoint`, a Serve handle call), and the gateway keeps
one HTTP/2 connection per replica. Why: a Serve handle call cost ~6 ms p50 and
most of the gateway's CPU per batch here, a direct gRPC call of the same batch
well under 1 ms (loadtests/README.md, "Direct data plane").

A batch travels as a KServe v2 ``ModelInferRequest`` (the proto this project
already speaks): one ``raw_input_contents`` entry per tensor, its numpy dtype in
``datatype``; the answer as a ``ModelInferResponse`` with the measured device
time in its parameters. Raw bytes only, nothing is pickled.

Failure handling: a call that fails with UNAVAILABLE (replica process gone,
connection refused or reset) forgets that replica's address and raises
:class:`BackendUnavailableError` (a retryable 503); the next batch asks Serve
again, which answers from a live (or restarted) replica. Addresses are also
refreshed every ``refresh_s``, so scaled-up replicas get traffic.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from gpugate_proto import grpc_service_pb2 as pb

from scheduler import BackendError, BackendUnavailableError, BatchResult, Tensors

log = logging.getLogger(__name__)

METHOD = "/gpugate.ReplicaData/RunBatch"
# Internal hop between our own processes: the gateway already capped each request.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # One connection per replica, not one per channel object gRPC might share.
    ("grpc.use_local_subchannel_pool", 1),
]
_DISCOVERY_TIMEOUT_S = 30.0


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


def decode_result(data: bytes) -> BatchResult:
    msg = pb.ModelInferResponse.FromString(data)
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


# --------------------------------------------------------------------------- replica side


class ReplicaDataServer:
    """The replica's end: a grpcio server whose own threads run ``run_batch``.

    Forwards run one at a time (a lock), as under Serve: two concurrent forwards on
    one reserved device would each measure the other's time and bill it twice.
    Decoding and encoding of the next batch overlap the forward of the current one.
    """

    def __init__(self, run_batch: Callable[[Tensors], BatchResult], max_workers: int) -> None:
        self._run_batch = run_batch
        self._forward_lock = threading.Lock()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="gpugate-data"),
            options=[*_CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
        )
        handler = grpc.unary_unary_rpc_method_handler(self._handle)  # raw bytes both ways
        service, method = METHOD.strip("/").split("/")
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {method: handler}),)
        )
        self.address = ""

    def start(self, host: str) -> str:
        port = self._server.add_insecure_port(f"{host}:0")
        self._server.start()
        self.address = f"{host}:{port}"
        return self.address

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s)

    def _handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            inputs = decode_batch(request)
        except Exception as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad batch: {exc}")
        try:
            with self._forward_lock:
                result = self._run_batch(inputs)
            return encode_result(result)
        except Exception as exc:  # the model's own error: the gateway logs it, callers get 500
            log.warning("batch failed: %s", exc)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:2000])
        raise AssertionError("unreachable: abort raises")


# --------------------------------------------------------------------------- gateway side


@dataclass(eq=False)
class _Replica:
    address: str
    channel: grpc.aio.Channel
    call: Any  # the channel's unary-unary multicallable
    in_flight: int = 0
    gone: bool = False


class DirectBatchBackend:
    """scheduler.Backend that sends batches straight to the replicas' data servers.

    ``discover`` asks Serve for one live replica's address (a handle call that Serve
    routes like any other). Batches go to the known replica with the fewest batches
    in flight. A batch whose replica turns out gone is tried once more on another
    known replica (the forward has no side effects and only an answer is billed);
    with none left it fails as unavailable.
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
        payload = encode_batch(inputs)
        tried: set[str] = set()
        while True:
            if self._closed:
                raise BackendUnavailableError("the model version is shutting down")
            replica = await self._pick(tried)
            tried.add(replica.address)
            replica.in_flight += 1
            try:
                data: bytes = await replica.call(payload)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    # The detail (paths, model internals) goes to the log, not the caller.
                    log.warning("batch failed on replica %s: %s", replica.address, exc.details())
                    raise BackendError("the model failed to run the batch") from exc
                log.warning("replica %s unavailable: %s", replica.address, exc.details())
                self._forget(replica)
                if not any(a not in tried for a in self._replicas):
                    raise BackendUnavailableError("no model replica is available") from exc
                continue
            finally:
                replica.in_flight -= 1
                if replica.gone and replica.in_flight == 0:
                    await replica.channel.close()
            return decode_result(data)

    async def close(self) -> None:
        """Stop: no new batches; closes the connections (call after the batcher drained)."""
        self._closed = True
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        for replica in list(self._replicas.values()):
            self._forget(replica)
            await replica.channel.close()

    # -- replica addresses ------------------------------------------------------

    async def _pick(self, tried: set[str]) -> _Replica:
        stale = self._clock() - self._refreshed_at > self._refresh_s
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
            channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._replicas[address] = _Replica(address, channel, channel.unary_unary(METHOD))
            log.info("data plane: replica at %s", address)

    def _forget(self, replica: _Replica) -> None:
        replica.gone = True
        if self._replicas.get(replica.address) is replica:
            del self._replicas[replica.address]


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("data plane: replica discovery failed: %s", exc)
