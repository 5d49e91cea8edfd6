"""The server stack and clients that the router's integration tests share.

The unchanged ``tritonclient.http`` and ``tritonclient.grpc`` clients (plus raw
httpx / grpc stubs for malformed input tritonclient cannot produce) talk to
:class:`router.servers.FrontDoors` bound to 127.0.0.1 on ephemeral ports. No Ray:
the backends are in-process and compute known functions, and the tenant
directory is an in-process dict.

The servers run on an asyncio loop in a background thread; tests drive it with
``asyncio.run_coroutine_threadsafe`` (no pytest-asyncio).

Models served by the main stack (:func:`main_models`):

* ``affine`` versions 1 and 2: inputs ``x`` FP32 [4] and ``k`` INT64 [1];
  outputs ``y`` FP32 [4] = m*x + k (m = 1 for version 1, 2 for version 2) and
  ``s`` FP32 [1] = sum(x). A name without version resolves to version 2.
* ``slow``: same function as affine v2, but each batch sleeps; tiny queue caps.
* ``vec``: input ``v`` FP32 [-1] (variable length), output ``n`` FP32 [1].
* ``broken``: same signature as affine; its backend always raises.
* ``misfit``: misconfigured on purpose (signature admits more rows than its
  batcher), to provoke an unexpected error inside the service.

Tenants: ``alice`` may use every model; ``bob`` may use only ``vec``; the key
``key-directory-down`` makes the tenant directory itself fail.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gc as garbage
import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc
import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived, TrailersReceived

from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings, ServedModel
from router.types import ModelSignature, Tenant, TensorSpec
from scheduler import BatchPolicy, BatchResult, ModelBatcher, Share, Tensors
from tests.fakes import StaticModelTable

DOORS = ["grpcio", "native"]  # server.grpc_server: each stack runs once per door
HOST = "127.0.0.1"
MAX_BYTES = 1 << 20  # request / gRPC message limit of the servers under test
ALICE = "key-alice"  # tenant "alice": every model
BOB = "key-bob"  # tenant "bob": only "vec"
DIRECTORY_DOWN = "key-directory-down"  # the directory's store fails on this key
# Read-only: tritonclient.http writes into the headers dict it is given, so it gets copies.
HTTP_ALICE = MappingProxyType({"Authorization": f"Bearer {ALICE}"})
HTTP_BOB = MappingProxyType({"Authorization": f"Bearer {BOB}"})
GRPC_ALICE = {"authorization": f"Bearer {ALICE}"}
GRPC_BOB = {"authorization": f"Bearer {BOB}"}
MD_ALICE = (("authorization", f"Bearer {ALICE}"),)
MD_BOB = (("authorization", f"Bearer {BOB}"),)

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
AFFINE_MAX_BATCH = 64
SLOW_DELAY_S = 0.6

AFFINE_SIGNATURE = ModelSignature(
    inputs=(TensorSpec("x", "FP32", (4,)), TensorSpec("k", "INT64", (1,))),
    outputs=(TensorSpec("y", "FP32", (4,)), TensorSpec("s", "FP32", (1,))),
    max_batch_size=AFFINE_MAX_BATCH,
)
MISFIT_SIGNATURE = ModelSignature(AFFINE_SIGNATURE.inputs, AFFINE_SIGNATURE.outputs, 8)
VEC_SIGNATURE = ModelSignature(
    inputs=(TensorSpec("v", "FP32", (-1,)),),
    outputs=(TensorSpec("n", "FP32", (1,)),),
    max_batch_size=8,
)


# --------------------------------------------------------------------------
# in-process backends, tenants, and the server stack on a loop thread
# --------------------------------------------------------------------------


def affine(x: np.ndarray, k: np.ndarray, mult: int) -> Tensors:
    """The known function; exact for the quarter-integer inputs the tests send."""
    y = (np.float32(mult) * x.astype(np.float32) + k.astype(np.float32)).astype(np.float32)
    s = x.astype(np.float32).sum(axis=1, keepdims=True, dtype=np.float32)
    return {"y": y, "s": s}


class AffineBackend:
    """Computes :func:`affine`; counts calls and rows per batch (read from tests)."""

    def __init__(self, mult: int, delay_s: float = 0.0) -> None:
        self.mult = mult
        self.delay_s = delay_s
        self.calls = 0
        self.batch_rows: list[int] = []
        self.running = 0

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        self.calls += 1
        self.batch_rows.append(len(inputs["x"]))
        self.running += 1
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return BatchResult(affine(inputs["x"], inputs["k"], self.mult), 1000, "cpu", 1.0)
        finally:
            self.running -= 1


class VecBackend:
    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        v = inputs["v"]
        return BatchResult({"n": v.sum(axis=1, keepdims=True, dtype=np.float32)}, 1, "cpu", 1.0)


class BrokenBackend:
    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        raise RuntimeError("replica exploded")


class Directory:
    """The in-process TenantDirectory."""

    def __init__(self) -> None:
        self._by_key = {
            # Granted every priority level (tests of the levels themselves send them).
            ALICE: Tenant("alice", 1.0, frozenset({"*"}), frozenset({1, 2, 3})),
            BOB: Tenant("bob", 1.0, frozenset({"vec"})),
        }

    async def authenticate(self, api_key: str) -> Tenant | None:
        if api_key == DIRECTORY_DOWN:
            raise RuntimeError("database unreachable: postgresql://admin:secret@db")
        return self._by_key.get(api_key)


class TritonHttp(httpclient.InferenceServerClient):  # type: ignore[misc]
    """tritonclient.http's client, unchanged on the wire, with an idempotent ``close``.

    Its ``__del__`` closes again, and the second close waits on a gevent event
    bound to the hub of the thread that made the client. When the client dies in
    a reference cycle (any exception raised through it), the cyclic GC may run
    in another thread (the server loop, a gRPC thread) and gevent raises
    InvalidThreadUseError there. Every client here is closed explicitly.
    """

    _closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            super().close()


class LoopThread:
    """An asyncio loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="router-loop", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def start(self) -> None:
        self._thread.start()

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the server loop thread did not stop"


@dataclass
class Stack:
    service: InferenceService
    doors: FrontDoors
    batchers: list[ModelBatcher]
    backends: dict[tuple[str, str], Any]

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.doors.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.doors.grpc_port}"

    def batcher(self, name: str, version: str) -> ModelBatcher:
        return next(b for b in self.batchers if (b.model, b.version) == (name, version))


ModelSpec = tuple[str, str, ModelSignature, Any, BatchPolicy]


async def start_stack(
    models: list[ModelSpec], grpc_server: str = "grpcio", **door_options: Any
) -> Stack:
    """``door_options``: FrontDoors' keyword options (tls, gRPC limits)."""
    served = []
    batchers = []
    for name, version, signature, backend, policy in models:
        batcher = ModelBatcher(name, version, backend, policy)
        batcher.start()
        batchers.append(batcher)
        served.append(ServedModel(name, version, signature, batcher))
    service = InferenceService(
        StaticModelTable(served),
        Directory(),
        RouterSettings(max_request_bytes=MAX_BYTES, default_timeout_s=10.0),
    )
    doors = FrontDoors(service, HOST, MAX_BYTES, grpc_server=grpc_server, **door_options)
    await doors.start(0, 0)
    return Stack(service, doors, batchers, {(m[0], m[1]): m[3] for m in models})


async def stop_stack(stack: Stack) -> None:
    await stack.service.drain(5.0)
    for batcher in stack.batchers:
        await batcher.close(drain=True)
    await stack.doors.stop(0.5)


def main_models() -> list[ModelSpec]:
    affine_policy = BatchPolicy(
        max_batch_size=AFFINE_MAX_BATCH, max_queue_delay_s=0.02, max_in_flight=1
    )
    slow_policy = BatchPolicy(
        max_batch_size=4,
        max_queue_delay_s=0.0,
        max_in_flight=1,
        max_queued_rows=64,
        max_queued_rows_per_tenant=2,
    )
    slow_signature = ModelSignature(AFFINE_SIGNATURE.inputs, AFFINE_SIGNATURE.outputs, 4)
    return [
        ("affine", "1", AFFINE_SIGNATURE, AffineBackend(1, 0.005), affine_policy),
        ("affine", "2", AFFINE_SIGNATURE, AffineBackend(2, 0.005), affine_policy),
        ("slow", "1", slow_signature, AffineBackend(2, SLOW_DELAY_S), slow_policy),
        ("vec", "1", VEC_SIGNATURE, VecBackend(), BatchPolicy(max_batch_size=8)),
        ("broken", "1", AFFINE_SIGNATURE, BrokenBackend(), BatchPolicy(max_batch_size=64)),
        # Misconfigured on purpose: the signature admits 8 rows, the batcher only 4, so
        # 5..8 rows raise an unexpected (non-gateway) error inside the service.
        ("misfit", "1", MISFIT_SIGNATURE, AffineBackend(2), BatchPolicy(max_batch_size=4)),
    ]


# --------------------------------------------------------------------------
# request helpers
# --------------------------------------------------------------------------


def sample(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Quarter-integer x and integer k: every result of the function is exact in FP32."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(-400, 400, size=(rows, 4)) / 4).astype(np.float32)
    k = rng.integers(-50, 50, size=(rows, 1)).astype(np.int64)
    return x, k


def http_inputs(x: np.ndarray, k: np.ndarray, binary: bool = True) -> list[Any]:
    ix = httpclient.InferInput("x", list(x.shape), "FP32")
    ix.set_data_from_numpy(x, binary_data=binary)
    ik = httpclient.InferInput("k", list(k.shape), "INT64")
    ik.set_data_from_numpy(k, binary_data=binary)
    return [ix, ik]


def grpc_inputs(x: np.ndarray, k: np.ndarray) -> list[Any]:
    ix = grpcclient.InferInput("x", list(x.shape), "FP32")
    ix.set_data_from_numpy(x)
    ik = grpcclient.InferInput("k", list(k.shape), "INT64")
    ik.set_data_from_numpy(k)
    return [ix, ik]


def http_infer(
    client: httpclient.InferenceServerClient,
    x: np.ndarray,
    k: np.ndarray,
    model: str = "affine",
    **kwargs: Any,
) -> Any:
    # A copy: tritonclient.http writes Inference-Header-Content-Length into the dict.
    headers = dict(kwargs.pop("headers", HTTP_ALICE))
    return client.infer(model, http_inputs(x, k), headers=headers, **kwargs)


def grpc_infer(
    client: grpcclient.InferenceServerClient,
    x: np.ndarray,
    k: np.ndarray,
    model: str = "affine",
    **kwargs: Any,
) -> Any:
    headers = kwargs.pop("headers", GRPC_ALICE)
    return client.infer(model, grpc_inputs(x, k), headers=headers, **kwargs)


def assert_affine(result: Any, x: np.ndarray, k: np.ndarray, mult: int = 2) -> None:
    want = affine(x, k, mult)
    y, s = result.as_numpy("y"), result.as_numpy("s")
    assert y.dtype == np.float32 and s.dtype == np.float32
    np.testing.assert_array_equal(y, want["y"])
    np.testing.assert_array_equal(s, want["s"])


def infer_body(
    inputs: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:  # a KServe v2 JSON request
    return {"inputs": inputs, **extra}


def jx(shape: list[Any] | None = None, data: Any = None, **kw: Any) -> dict[str, Any]:
    """A JSON-data input "x" (defaults: one valid row)."""
    return {
        "name": kw.get("name", "x"),
        "datatype": kw.get("datatype", "FP32"),
        "shape": shape if shape is not None else [1, 4],
        "data": data if data is not None else [1.0, 2.0, 3.0, 4.0],
    }


def jk(shape: list[int] | None = None, data: Any = None) -> dict[str, Any]:
    return {
        "name": "k",
        "datatype": "INT64",
        "shape": shape if shape is not None else [1, 1],
        "data": data if data is not None else [5],
    }


GOOD_JSON = infer_body([jx(), jk()])


def binary_request(
    header: dict[str, Any], payload: bytes, header_length: int | None = None
) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    return head + payload, {"Inference-Header-Content-Length": str(length)}


X1 = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
K1 = np.array([[5]], dtype=np.int64)
X_BYTES = X1.tobytes()
K_BYTES = K1.tobytes()
BIG = 10**12  # a dimension far past any limit
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def assert_http_good(web: httpx.Client) -> None:
    r = web.post("/v2/models/affine/infer", json=GOOD_JSON, headers=HTTP_ALICE)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["y"]["data"] == [7.0, 9.0, 11.0, 13.0]
    assert outputs["s"]["data"] == [10.0]


def assert_grpc_good(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(raw_request(X1, K1), metadata=MD_ALICE, timeout=10)
    y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    np.testing.assert_array_equal(y, [7.0, 9.0, 11.0, 13.0])


def typed_request(
    x: np.ndarray, k: np.ndarray, model: str = "affine", **kw: Any
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **kw)
    request.inputs.add(
        name="x",
        datatype="FP32",
        shape=list(x.shape),
        contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()),
    )
    request.inputs.add(
        name="k",
        datatype="INT64",
        shape=list(k.shape),
        contents=pb.InferTensorContents(int64_contents=k.ravel().tolist()),
    )
    return request


def raw_request(
    x: np.ndarray, k: np.ndarray, model: str = "affine", **kw: Any
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **kw)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.inputs.add(name="k", datatype="INT64", shape=list(k.shape))
    request.raw_input_contents.extend([x.tobytes(), k.tobytes()])
    return request


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    out = {}
    for meta, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        assert meta.datatype == "FP32"
        out[meta.name] = np.frombuffer(raw, dtype=np.float32).reshape(list(meta.shape))
    return out


def codes_delta(
    stack: Stack, before: collections.Counter[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    after = request_codes(stack)
    return {key: n - before[key] for key, n in after.items() if n != before[key]}


def request_codes(stack: Stack) -> collections.Counter[tuple[str, str]]:
    """gpugate_requests_total by (model, code), from the service's metrics."""
    codes: collections.Counter[tuple[str, str]] = collections.Counter()
    for metric in stack.service.metrics.registry.collect():
        if metric.name == "gpugate_requests":
            for s in metric.samples:
                if s.name == "gpugate_requests_total":
                    codes[(s.labels["model"], s.labels["code"])] += int(s.value)
    return codes


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def infer_http_at(stack: Stack, model: str, x: np.ndarray, k: np.ndarray, **kw: Any) -> Any:
    """One request on a fresh tritonclient.http client (safe from any thread)."""
    with TritonHttp(stack.http_url, network_timeout=30.0) as client:
        return http_infer(client, x, k, model=model, **kw)


def infer_grpc_at(stack: Stack, model: str, x: np.ndarray, k: np.ndarray, **kw: Any) -> Any:
    with grpcclient.InferenceServerClient(stack.grpc_url) as client:
        return grpc_infer(client, x, k, model=model, **kw)


def slow_http(stack: Stack, x: np.ndarray, k: np.ndarray, **kw: Any) -> Any:
    return infer_http_at(stack, "slow", x, k, **kw)


def slow_grpc(stack: Stack, x: np.ndarray, k: np.ndarray, **kw: Any) -> Any:
    return infer_grpc_at(stack, "slow", x, k, **kw)


class ErrorsSeen:
    """A server loop of its own that records every error the loop reports."""

    def __init__(self) -> None:
        self.lt = LoopThread()
        self.errors: list[dict[str, Any]] = []
        self.lt.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.lt.start()

    def collect_garbage(self) -> None:
        # "exception was never retrieved" is reported when the future is collected.
        async def collect() -> None:
            garbage.collect()

        self.lt.run(collect())


def stop_with_four_calls_in_flight(
    lt: LoopThread, stack: Stack, stop: Callable[[Stack], Any], x: np.ndarray, k: np.ndarray
) -> list[concurrent.futures.Future[Any]]:
    """Four gRPC calls wait on the backend while ``stop(stack)`` runs on ``lt``'s loop;
    stopping must take under 10 s. Returns the calls, done; closes the batchers."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(infer_grpc_at, stack, "affine", x, k) for _ in range(4)]
        wait_for(lambda: stack.service.in_flight == 4)
        started = time.monotonic()
        lt.run(stop(stack))
        assert time.monotonic() - started < 10
        concurrent.futures.wait(in_flight, timeout=10)
    for batcher in stack.batchers:  # no-op after stop_stack
        lt.run(batcher.close(drain=False))
    return in_flight


def grpc_statuses(stack: Stack, paths: list[bytes], message: bytes) -> list[str]:
    """One call per path, all sent in one write on a raw HTTP/2 connection (so that the
    server reads them together); the grpc-status each call ends with, in order."""
    config = H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    h2 = H2Connection(config)
    h2.initiate_connection()
    streams = []
    for path in paths:
        stream_id = h2.get_next_available_stream_id()
        h2.send_headers(
            stream_id,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path),
                (b":authority", stack.grpc_url.encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"authorization", f"Bearer {ALICE}".encode()),
            ],
        )
        h2.send_data(stream_id, b"\0" + len(message).to_bytes(4, "big") + message, end_stream=True)
        streams.append(stream_id)
    statuses: dict[int, str] = {}
    with socket.create_connection((HOST, stack.doors.grpc_port), timeout=10) as sock:
        sock.sendall(h2.data_to_send())
        while len(statuses) < len(streams):
            data = sock.recv(65_536)
            assert data, f"the server closed the connection; statuses so far: {statuses}"
            for event in h2.receive_data(data):
                if isinstance(event, ResponseReceived | TrailersReceived):
                    for key, value in event.headers:
                        if key in (b"grpc-status", "grpc-status"):
                            statuses[event.stream_id] = bytes(value).decode()
            sock.sendall(h2.data_to_send())
    return [statuses[stream_id] for stream_id in streams]
