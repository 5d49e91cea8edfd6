"""The router's HTTP and gRPC front doors over real sockets, driven by real clients.

The unchanged ``tritonclient.http`` and ``tritonclient.grpc`` clients (plus raw
httpx / grpc stubs for malformed input tritonclient cannot produce) talk to
:class:`router.servers.FrontDoors` bound to 127.0.0.1 on ephemeral ports. No Ray:
the backends are in-process and compute known functions, and the tenant
directory is an in-process dict.

The servers run on an asyncio loop in a background thread; tests drive it with
``asyncio.run_coroutine_threadsafe`` (no pytest-asyncio).

Models served by the main stack:

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
import gzip
import json
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from tritonclient.utils import InferenceServerException

from router.grpc_accept import DEFAULT_ACCEPTS, unsupported
from router.grpc_server import INFER_METHOD, SERVICE_PREFIX
from router.grpclib_server import GrpclibServer
from router.native_server import NativeServer
from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings, ServedModel, StaticModelTable
from router.types import ModelSignature, Tenant, TensorSpec
from scheduler import BatchPolicy, BatchResult, ModelBatcher, Tensors
from tests.native_door import require_native_door

pytestmark = pytest.mark.timeout(120)

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

    async def run_batch(self, inputs: Tensors, *, urgent: bool = False) -> BatchResult:
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
    async def run_batch(self, inputs: Tensors, *, urgent: bool = False) -> BatchResult:
        v = inputs["v"]
        return BatchResult({"n": v.sum(axis=1, keepdims=True, dtype=np.float32)}, 1, "cpu", 1.0)


class BrokenBackend:
    async def run_batch(self, inputs: Tensors, *, urgent: bool = False) -> BatchResult:
        raise RuntimeError("replica exploded")


class Directory:
    """The in-process TenantDirectory."""

    def __init__(self) -> None:
        self._by_key = {
            ALICE: Tenant("alice", 1.0, frozenset({"*"})),
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
    models: list[ModelSpec], grpc_server: str = "grpclib", grpc_accepts: int = DEFAULT_ACCEPTS
) -> Stack:
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
    doors = FrontDoors(service, HOST, MAX_BYTES, grpc_server=grpc_server, grpc_accepts=grpc_accepts)
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


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    lt.start()
    yield lt
    lt.stop()


@pytest.fixture(scope="module", params=["grpcio", "grpclib", "native"])
def stack(loop_thread: LoopThread, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The main servers, once per gRPC implementation (``server.grpc_server``)."""
    if request.param == "native":
        require_native_door()
    s: Stack = loop_thread.run(start_stack(main_models(), request.param))
    yield s
    loop_thread.run(stop_stack(s))


@pytest.fixture(scope="module")
def hc(stack: Stack) -> Iterator[httpclient.InferenceServerClient]:
    client = TritonHttp(stack.http_url, network_timeout=30.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def gc(stack: Stack) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def web(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{stack.http_url}", timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def stub(stack: Stack) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    # Client-side limits well above the server's so the server is what refuses.
    options = [
        ("grpc.max_send_message_length", 64 * MAX_BYTES),
        ("grpc.max_receive_message_length", 64 * MAX_BYTES),
    ]
    with grpc.insecure_channel(stack.grpc_url, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


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


# --------------------------------------------------------------------------
# health, metadata, readiness, repository index
# --------------------------------------------------------------------------

AFFINE_INPUTS_META = [
    {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
    {"name": "k", "datatype": "INT64", "shape": [-1, 1]},
]
AFFINE_OUTPUTS_META = [
    {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
    {"name": "s", "datatype": "FP32", "shape": [-1, 1]},
]
INDEX = [
    ("affine", "1"),
    ("affine", "2"),
    ("broken", "1"),
    ("misfit", "1"),
    ("slow", "1"),
    ("vec", "1"),
]


def test_health_and_metadata_http(hc: httpclient.InferenceServerClient) -> None:
    assert hc.is_server_live() is True
    assert hc.is_server_ready() is True
    assert hc.get_server_metadata() == {
        "name": "gpugate",
        "version": "0.1.0",
        "extensions": EXTENSIONS,
    }
    for version in ("", "1", "2"):
        meta = hc.get_model_metadata("affine", version)
        assert meta == {
            "name": "affine",
            "versions": ["1", "2"],
            "platform": "pytorch_libtorch",
            "inputs": AFFINE_INPUTS_META,
            "outputs": AFFINE_OUTPUTS_META,
        }
    vec = hc.get_model_metadata("vec")
    assert vec["inputs"] == [{"name": "v", "datatype": "FP32", "shape": [-1, -1]}]
    assert vec["versions"] == ["1"]
    for name, version, needle in [
        ("nope", "", "unknown model 'nope'"),
        ("affine", "9", "model 'affine' has no version '9'"),
    ]:
        with pytest.raises(InferenceServerException) as err:
            hc.get_model_metadata(name, version)
        assert err.value.status() == "404"
        assert needle in err.value.message()

    assert hc.is_model_ready("affine") is True
    assert hc.is_model_ready("affine", "1") is True
    assert hc.is_model_ready("affine", "2") is True
    assert hc.is_model_ready("affine", "3") is False
    assert hc.is_model_ready("nope") is False

    index = hc.get_model_repository_index()
    assert [(e["name"], e["version"]) for e in index] == INDEX
    assert {e["state"] for e in index} == {"READY"}


def test_health_and_metadata_raw_http(web: httpx.Client) -> None:
    assert web.get("/v2/health/live").status_code == 200
    assert web.get("/v2/health/ready").status_code == 200
    assert web.get("/v2/models/affine/ready").status_code == 200
    assert web.get("/v2/models/affine/versions/1/ready").status_code == 200
    assert web.get("/v2/models/nope/ready").status_code == 503
    r = web.post("/v2/repository/index", json={})
    assert r.status_code == 200
    assert [(e["name"], e["version"]) for e in r.json()] == INDEX
    r = web.post("/v2/repository/index", content=b"{nope")
    assert r.status_code == 400 and "error" in r.json()
    r = web.post("/v2/repository/index", content=b"[1]")
    assert r.status_code == 400 and "error" in r.json()
    r = web.get("/v2/no/such/route")
    assert r.status_code == 404 and "error" in r.json()
    r = web.get("/v2/models/affine/infer")
    assert r.status_code == 405 and "error" in r.json()


AFFINE_CONFIG = {
    "name": "affine",
    "platform": "pytorch_libtorch",
    "backend": "pytorch",
    "max_batch_size": AFFINE_MAX_BATCH,
    "input": [
        {"name": "x", "data_type": "TYPE_FP32", "dims": [4]},
        {"name": "k", "data_type": "TYPE_INT64", "dims": [1]},
    ],
    "output": [
        {"name": "y", "data_type": "TYPE_FP32", "dims": [4]},
        {"name": "s", "data_type": "TYPE_FP32", "dims": [1]},
    ],
    "dynamic_batching": {
        "max_queue_delay_microseconds": 20_000,
        "priority_levels": 3,
        "default_priority_level": 2,
        "default_queue_policy": {
            "timeout_action": "REJECT",
            "default_timeout_microseconds": 10_000_000,
            "allow_timeout_override": True,
            "max_queue_size": 4096,
        },
    },
    "instance_group": [{"name": "affine", "kind": "KIND_CPU", "count": 1}],
}


def _as_dict(message: Any) -> dict[str, Any]:
    """A tritonclient protobuf as JSON-shaped data, 64-bit integers as numbers."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)

    def numbers(v: Any, key: str = "") -> Any:
        if isinstance(v, dict):
            return {k: numbers(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [numbers(x, key) for x in v]
        if key not in ("name", "version") and isinstance(v, str) and v.lstrip("-").isdigit():
            return int(v)
        return v

    return dict(numbers(data))


def test_model_config(
    hc: httpclient.InferenceServerClient, gc: grpcclient.InferenceServerClient
) -> None:
    for version in ("", "1", "2"):
        assert hc.get_model_config("affine", version) == AFFINE_CONFIG
        grpc_config = _as_dict(gc.get_model_config("affine", version).config)
        # proto3 JSON leaves out fields at their zero value (KIND_AUTO, REJECT, 0, false).
        want = json.loads(json.dumps(AFFINE_CONFIG))
        del want["dynamic_batching"]["default_queue_policy"]["timeout_action"]  # REJECT = 0
        assert grpc_config == want
    vec = hc.get_model_config("vec")
    assert vec["input"] == [{"name": "v", "data_type": "TYPE_FP32", "dims": [-1]}]
    assert vec["max_batch_size"] == 8
    assert list(gc.get_model_config("vec").config.input[0].dims) == [-1]
    for name, version, needle in [
        ("nope", "", "unknown model 'nope'"),
        ("affine", "9", "model 'affine' has no version '9'"),
    ]:
        with pytest.raises(InferenceServerException) as err:
            hc.get_model_config(name, version)
        assert (err.value.status(), needle in err.value.message()) == ("404", True)
        with pytest.raises(InferenceServerException) as err:
            gc.get_model_config(name, version)
        assert err.value.status() == "StatusCode.NOT_FOUND"
        assert needle in err.value.message()


def _stats_of(
    hc: httpclient.InferenceServerClient, model: str, version: str = "1"
) -> dict[str, Any]:
    found = hc.get_inference_statistics(model, version)["model_stats"]
    assert [(s["name"], s["version"]) for s in found] == [(model, version)]
    return dict(found[0])


def _stats(hc: httpclient.InferenceServerClient, version: str) -> dict[str, Any]:
    return _stats_of(hc, "affine", version)


def _without_zeros(value: Any) -> Any:
    """What proto3 JSON keeps of a value: no zero numbers, empty objects or lists."""
    if isinstance(value, dict):
        kept = {k: _without_zeros(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v not in (0, {}, [])}
    if isinstance(value, list):
        return [_without_zeros(v) for v in value]
    return value


def test_model_statistics(
    stack: Stack,
    hc: httpclient.InferenceServerClient,
    gc: grpcclient.InferenceServerClient,
) -> None:
    before = _stats(hc, "1")
    sent = [(1, 71), (3, 72), (2, 73)]  # (rows, seed)
    for i, (rows, seed) in enumerate(sent):
        x, k = sample(rows, seed)
        send = http_infer if i % 2 else grpc_infer
        assert_affine(send(hc if i % 2 else gc, x, k, model_version="1"), x, k, mult=1)
    x, k = sample(1, 74)
    with pytest.raises(InferenceServerException):
        http_infer(hc, x[:, :3], k, model_version="1")  # wrong shape: a failed request
    after = _stats(hc, "1")

    def delta(*path: str) -> int:
        a, b = after, before
        for key in path:
            a, b = a[key], b[key]
        return int(a) - int(b)

    rows = sum(r for r, _ in sent)
    assert delta("inference_count") == rows
    executions = delta("execution_count")
    assert 1 <= executions <= len(sent)
    assert delta("inference_stats", "success", "count") == len(sent)
    assert delta("inference_stats", "fail", "count") == 1
    assert delta("inference_stats", "success", "ns") > 0
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta("inference_stats", part, "count") == len(sent), part
    # AffineBackend reports 1,000 ns of device time per batch; each request gets its batch's.
    assert delta("inference_stats", "compute_infer", "ns") == 1000 * len(sent)
    # The backend sleeps 5 ms per batch: the rest of the round trip is "compute input".
    assert delta("inference_stats", "compute_input", "ns") >= 0.004e9 * len(sent)
    assert after["last_inference"] >= before["last_inference"]
    assert abs(after["last_inference"] / 1000 - time.time()) < 60
    # batch_stats: one entry per batch size, counts adding up to the executions and rows.
    sizes = {b["batch_size"]: b for b in after["batch_stats"]}
    assert sum(b["compute_infer"]["count"] for b in sizes.values()) == after["execution_count"]
    assert (
        sum(n * b["compute_infer"]["count"] for n, b in sizes.items()) == after["inference_count"]
    )
    # gRPC says the same, and without a name lists every version serving (proto3 JSON
    # leaves zeros out, so both sides are compared without them: idle versions too).
    grpc_stats = _as_dict(gc.get_inference_statistics("affine", "1"))["model_stats"]
    assert grpc_stats == [_stats(hc, "1")]
    everything = hc.get_inference_statistics()["model_stats"]
    assert [(s["name"], s["version"]) for s in everything] == INDEX
    grpc_everything = _as_dict(gc.get_inference_statistics())["model_stats"]
    assert [_without_zeros(s) for s in everything] == [_without_zeros(s) for s in grpc_everything]
    # A batch that failed runs nothing and counts its request as failed.
    broken = _stats_of(hc, "broken")
    with pytest.raises(InferenceServerException) as err:
        http_infer(hc, *sample(2, 75), model="broken")
    assert err.value.status() == "500"
    broken_after = _stats_of(hc, "broken")
    assert broken_after["inference_stats"]["fail"]["count"] == (
        broken["inference_stats"]["fail"]["count"] + 1
    )
    assert (broken_after["execution_count"], broken_after["inference_count"]) == (
        broken["execution_count"],
        broken["inference_count"],
    )
    with pytest.raises(InferenceServerException) as err:  # a version needs its model
        gc.get_inference_statistics("", "1")
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    versions = _as_dict(gc.get_inference_statistics("affine"))["model_stats"]
    assert [s["version"] for s in versions] == ["1", "2"]
    with pytest.raises(InferenceServerException) as err:
        gc.get_inference_statistics("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        hc.get_inference_statistics("affine", "9")
    assert err.value.status() == "404"


def test_health_and_metadata_grpc(gc: grpcclient.InferenceServerClient) -> None:
    assert gc.is_server_live() is True
    assert gc.is_server_ready() is True
    server = gc.get_server_metadata()
    assert server.name == "gpugate"
    assert server.version == "0.1.0"
    assert list(server.extensions) == EXTENSIONS
    for version in ("", "1", "2"):
        meta = gc.get_model_metadata("affine", version)
        assert meta.name == "affine"
        assert list(meta.versions) == ["1", "2"]
        assert meta.platform == "pytorch_libtorch"
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("x", "FP32", [-1, 4]),
            ("k", "INT64", [-1, 1]),
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            ("y", "FP32", [-1, 4]),
            ("s", "FP32", [-1, 1]),
        ]
    vec = gc.get_model_metadata("vec")
    assert [list(t.shape) for t in vec.inputs] == [[-1, -1]]
    for name, version in [("nope", ""), ("affine", "9")]:
        with pytest.raises(InferenceServerException) as err:
            gc.get_model_metadata(name, version)
        assert err.value.status() == "StatusCode.NOT_FOUND"

    assert gc.is_model_ready("affine") is True
    assert gc.is_model_ready("affine", "1") is True
    assert gc.is_model_ready("affine", "3") is False
    assert gc.is_model_ready("nope") is False

    index = gc.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [
        (n, v, "READY") for n, v in INDEX
    ]
    ready_only = gc.get_model_repository_index(as_json=True)
    assert len(ready_only["models"]) == len(INDEX)


# --------------------------------------------------------------------------
# inference: HTTP JSON, HTTP binary, gRPC raw, gRPC typed contents
# --------------------------------------------------------------------------


def test_infer_http_json(hc: httpclient.InferenceServerClient) -> None:
    x, k = sample(3, seed=1)
    outputs = [
        httpclient.InferRequestedOutput("y", binary_data=False),
        httpclient.InferRequestedOutput("s", binary_data=False),
    ]
    result = hc.infer(
        "affine",
        http_inputs(x, k, binary=False),
        outputs=outputs,
        request_id="json-1",
        headers=dict(HTTP_ALICE),
    )
    assert_affine(result, x, k)
    response = result.get_response()
    assert response["model_name"] == "affine"
    assert response["model_version"] == "2"  # no version: the newest
    assert response["id"] == "json-1"
    for out in response["outputs"]:
        assert "data" in out and "binary_data_size" not in out.get("parameters", {})
    assert [o["shape"] for o in response["outputs"]] == [[3, 4], [3, 1]]


def test_infer_http_json_raw(web: httpx.Client) -> None:
    """A hand-written JSON request: the response is pure JSON (no binary part)."""
    r = web.post("/v2/models/affine/versions/1/infer", json=GOOD_JSON | {"id": "raw"})
    assert r.status_code == 401  # no key
    r = web.post(
        "/v2/models/affine/versions/1/infer", json=GOOD_JSON | {"id": "raw"}, headers=HTTP_ALICE
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in r.headers
    body = r.json()
    assert body["id"] == "raw" and body["model_version"] == "1"
    assert body["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [6.0, 7.0, 8.0, 9.0]},
        {"name": "s", "datatype": "FP32", "shape": [1, 1], "data": [10.0]},
    ]
    # Integers are fine for an FP32 input.
    ints = infer_body([jx(data=[1, 2, 3, 4]), jk()])
    r = web.post("/v2/models/affine/infer", json=ints, headers=HTTP_ALICE)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [7.0, 9.0, 11.0, 13.0]
    # Nested row-major "data" is accepted as well as flat.
    nested = infer_body([jx(data=[[1.0, 2.0, 3.0, 4.0]]), jk(data=[[5]])])
    r = web.post("/v2/models/affine/infer", json=nested, headers=HTTP_ALICE)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [7.0, 9.0, 11.0, 13.0]


def test_infer_http_binary(hc: httpclient.InferenceServerClient) -> None:
    x, k = sample(5, seed=2)
    result = http_infer(hc, x, k, request_id="bin-1")
    assert_affine(result, x, k)
    response = result.get_response()
    assert response["id"] == "bin-1"
    assert response["model_version"] == "2"
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in response["outputs"]}
    assert sizes == {"y": 5 * 4 * 4, "s": 5 * 4}

    # Version routing: /versions/1 runs version 1 (m = 1).
    result = http_infer(hc, x, k, model_version="1")
    assert result.get_response()["model_version"] == "1"
    assert_affine(result, x, k, mult=1)
    result = http_infer(hc, x, k, model_version="2")
    assert result.get_response()["model_version"] == "2"
    assert_affine(result, x, k, mult=2)

    # A requested subset of outputs returns only those.
    result = http_infer(hc, x, k, outputs=[httpclient.InferRequestedOutput("s")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["s"]
    assert result.as_numpy("y") is None
    np.testing.assert_array_equal(result.as_numpy("s"), affine(x, k, 2)["s"])

    # Mixed: one output binary, one JSON.
    outputs = [
        httpclient.InferRequestedOutput("y", binary_data=True),
        httpclient.InferRequestedOutput("s", binary_data=False),
    ]
    result = http_infer(hc, x, k, outputs=outputs)
    assert_affine(result, x, k)
    by_name = {o["name"]: o for o in result.get_response()["outputs"]}
    assert "binary_data_size" in by_name["y"]["parameters"]
    assert "data" in by_name["s"]


def test_infer_priority_and_timeout_parameters(
    hc: httpclient.InferenceServerClient, gc: grpcclient.InferenceServerClient
) -> None:
    """Valid priority / timeout values, including the largest, are honoured, not refused."""
    x, k = sample(2, seed=6)
    cases: list[dict[str, Any]] = [
        {"priority": 1},
        {"priority": 3},  # the least urgent level
        {"timeout": 5_000_000},
        {"timeout": 2**63 - 1},
        {"priority": 3, "timeout": 1_000_000},
    ]
    for kwargs in cases:
        assert_affine(http_infer(hc, x, k, **kwargs), x, k)
        assert_affine(grpc_infer(gc, x, k, **kwargs), x, k)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_infer_http_compressed_request(
    hc: httpclient.InferenceServerClient, algorithm: str
) -> None:
    x, k = sample(4, seed=3)
    result = http_infer(hc, x, k, request_compression_algorithm=algorithm)
    assert_affine(result, x, k)


def test_infer_grpc_raw(gc: grpcclient.InferenceServerClient) -> None:
    x, k = sample(6, seed=4)
    result = grpc_infer(gc, x, k, request_id="grpc-1")
    assert_affine(result, x, k)
    response = result.get_response()
    assert response.id == "grpc-1"
    assert response.model_name == "affine"
    assert response.model_version == "2"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("y", "FP32", [6, 4]),
        ("s", "FP32", [6, 1]),
    ]

    result = grpc_infer(gc, x, k, model_version="1")
    assert result.get_response().model_version == "1"
    assert_affine(result, x, k, mult=1)

    result = grpc_infer(gc, x, k, outputs=[grpcclient.InferRequestedOutput("y")])
    assert [o.name for o in result.get_response().outputs] == ["y"]
    assert result.as_numpy("s") is None
    np.testing.assert_array_equal(result.as_numpy("y"), affine(x, k, 2)["y"])


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


def test_infer_grpc_typed_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    x, k = sample(3, seed=5)
    for version, mult in [("", 2), ("1", 1), ("2", 2)]:
        request = typed_request(x, k, model_version=version, id=f"typed-{version}")
        response = stub.ModelInfer(request, metadata=MD_ALICE, timeout=10)
        assert response.id == f"typed-{version}"
        assert response.model_version == (version or "2")
        out = decode_outputs(response)
        want = affine(x, k, mult)
        np.testing.assert_array_equal(out["y"], want["y"])
        np.testing.assert_array_equal(out["s"], want["s"])

    request = typed_request(x, k)
    request.outputs.add(name="s")
    response = stub.ModelInfer(request, metadata=MD_ALICE, timeout=10)
    assert list(decode_outputs(response)) == ["s"]


def test_model_failure_is_internal(web: httpx.Client, gc: grpcclient.InferenceServerClient) -> None:
    r = web.post("/v2/models/broken/infer", json=GOOD_JSON, headers=HTTP_ALICE)
    assert r.status_code == 500
    assert "model broken version 1 failed: replica exploded" in r.json()["error"]
    with pytest.raises(InferenceServerException) as err:
        grpc_infer(gc, X1, K1, model="broken")
    assert err.value.status() == "StatusCode.INTERNAL"
    assert "replica exploded" in err.value.message()


def test_unexpected_error_is_internal_not_a_crash(
    web: httpx.Client, gc: grpcclient.InferenceServerClient
) -> None:
    """A non-gateway exception inside the service leaves as a JSON 500 / INTERNAL."""
    x, k = sample(6, seed=8)
    body = infer_body([jx([6, 4], x.ravel().tolist()), jk([6, 1], k.ravel().tolist())])
    r = web.post("/v2/models/misfit/infer", json=body, headers=HTTP_ALICE)
    assert r.status_code == 500
    assert r.json() == {"error": "internal error: ValueError"}
    with pytest.raises(InferenceServerException) as err:
        grpc_infer(gc, x, k, model="misfit")
    assert err.value.status() == "StatusCode.INTERNAL"
    assert err.value.message() == "internal error: ValueError"
    # Within the batcher's own limit it works.
    assert_affine(grpc_infer(gc, x[:4], k[:4], model="misfit"), x[:4], k[:4])


# --------------------------------------------------------------------------
# concurrency: batching with exact row routing, over both protocols
# --------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_routed_exactly(stack: Stack) -> None:
    backend: AffineBackend = stack.backends[("affine", "2")]
    calls_before = backend.calls
    rows_log_start = len(backend.batch_rows)
    threads, per_thread = 12, 5
    barrier = threading.Barrier(threads)
    samples = {i: sample(i % 8 + 1, seed=1000 + i) for i in range(threads * per_thread)}

    def worker(t: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        use_grpc = t % 2 == 1
        client: Any = (
            grpcclient.InferenceServerClient(stack.grpc_url)
            if use_grpc
            else TritonHttp(stack.http_url, network_timeout=30.0)
        )
        got = {}
        try:
            barrier.wait(10)
            for j in range(per_thread):
                i = t * per_thread + j
                x, k = samples[i]
                if use_grpc:
                    result = grpc_infer(client, x, k, request_id=f"c{i}")
                    assert result.get_response().id == f"c{i}"
                else:
                    result = http_infer(client, x, k, request_id=f"c{i}")
                    assert result.get_response()["id"] == f"c{i}"
                got[i] = (result.as_numpy("y"), result.as_numpy("s"))
        finally:
            client.close()
        return got

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for part in pool.map(worker, range(threads)):
            results.update(part)

    assert sorted(results) == list(range(threads * per_thread))
    for i, (y, s) in results.items():
        x, k = samples[i]
        want = affine(x, k, 2)
        assert y.shape == (len(x), 4) and s.shape == (len(x), 1)
        np.testing.assert_array_equal(y, want["y"], err_msg=f"request {i}")
        np.testing.assert_array_equal(s, want["s"], err_msg=f"request {i}")

    calls = backend.calls - calls_before
    batch_rows = backend.batch_rows[rows_log_start:]
    total_rows = sum(len(samples[i][0]) for i in samples)
    assert sum(batch_rows) == total_rows  # every row ran exactly once
    assert calls <= len(samples) // 3, f"{calls} backend calls for {len(samples)} requests"
    assert max(batch_rows) > 8  # some batch merged several requests

    # The same inputs sent alone give identical outputs.
    with TritonHttp(stack.http_url) as alone:
        for i in (0, 7, 13, 29, 42, 59):
            x, k = samples[i]
            result = http_infer(alone, x, k)
            np.testing.assert_array_equal(result.as_numpy("y"), results[i][0])
            np.testing.assert_array_equal(result.as_numpy("s"), results[i][1])


# --------------------------------------------------------------------------
# errors over HTTP: status + {"error": ...}
# --------------------------------------------------------------------------

_BIG = 10**12


@dataclass(frozen=True)
class HttpCase:
    id: str
    status: int
    needle: str
    path: str = "/v2/models/affine/infer"
    json_body: Any = None
    content: bytes | None = None
    headers: dict[str, str] | None = None
    auth: Mapping[str, str] | None = None  # defaults to alice

    def send(self, web: httpx.Client) -> httpx.Response:
        headers = dict(HTTP_ALICE if self.auth is None else self.auth)
        headers.update(self.headers or {})
        if self.content is not None:
            return web.post(self.path, content=self.content, headers=headers)
        return web.post(self.path, json=self.json_body, headers=headers)


def _bin(
    id: str,
    status: int,
    needle: str,
    header: dict[str, Any],
    payload: bytes,
    header_length: int | None = None,
    path: str = "/v2/models/affine/infer",
) -> HttpCase:
    content, headers = binary_request(header, payload, header_length)
    return HttpCase(id, status, needle, path=path, content=content, headers=headers)


def _bx(size: int, shape: list[int] | None = None, name: str = "x") -> dict[str, Any]:
    return {
        "name": name,
        "datatype": "FP32",
        "shape": shape if shape is not None else [1, 4],
        "parameters": {"binary_data_size": size},
    }


X_BYTES = X1.tobytes()
K_BYTES = K1.tobytes()
GOOD_BINARY_HEADER = {"inputs": [_bx(16), jk()]}

HTTP_CASES = [
    # authentication / authorization / routing
    HttpCase("missing-key", 401, "missing API key", json_body=GOOD_JSON, auth={}),
    HttpCase(
        "unknown-key",
        401,
        "unknown API key",
        json_body=GOOD_JSON,
        auth={"Authorization": "Bearer not-a-key"},
    ),
    HttpCase(
        "not-bearer",
        401,
        "malformed Authorization",
        json_body=GOOD_JSON,
        auth={"Authorization": f"Basic {ALICE}"},
    ),
    HttpCase(
        "model-not-allowed",
        403,
        "tenant 'bob' may not use model 'affine'",
        json_body=GOOD_JSON,
        auth=HTTP_BOB,
    ),
    HttpCase(
        "tenant-directory-down",  # 503 (retry later), not 401 and not a crash
        503,
        "cannot authenticate now: tenant directory unavailable",
        json_body=GOOD_JSON,
        auth={"Authorization": f"Bearer {DIRECTORY_DOWN}"},
    ),
    HttpCase(
        "unknown-model",
        404,
        "unknown model 'nope'",
        path="/v2/models/nope/infer",
        json_body=GOOD_JSON,
    ),
    HttpCase(
        "unknown-version",
        404,
        "model 'affine' has no version '9'",
        path="/v2/models/affine/versions/9/infer",
        json_body=GOOD_JSON,
    ),
    # the body
    HttpCase("malformed-json", 400, "malformed JSON", content=b'{"inputs": [}'),
    HttpCase("empty-body", 400, "malformed JSON", content=b""),
    HttpCase("json-not-object", 400, "request must be a JSON object", json_body=[GOOD_JSON]),
    HttpCase("inputs-not-list", 400, "'inputs' must be a list", json_body={"inputs": {}}),
    HttpCase("no-inputs", 400, "request has no inputs", json_body={"inputs": []}),
    HttpCase("input-not-object", 400, "each input must be an object", json_body={"inputs": [1]}),
    HttpCase(
        "input-without-name",
        400,
        "needs a string 'name' and 'datatype'",
        json_body={"inputs": [{"datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
    ),
    HttpCase(
        "shape-not-list",
        400,
        "needs a 'shape' list",
        json_body=infer_body([jx() | {"shape": 4}, jk()]),
    ),
    HttpCase(
        "parameters-not-object",
        400,
        "'parameters' must be an object",
        json_body=GOOD_JSON | {"parameters": [1]},
    ),
    HttpCase(
        "outputs-not-list", 400, "'outputs' must be a list", json_body=GOOD_JSON | {"outputs": 1}
    ),
    HttpCase(
        "output-without-name",
        400,
        "needs a string 'name'",
        json_body=GOOD_JSON | {"outputs": [{"parameters": {}}]},
    ),
    # tensors against the signature
    HttpCase(
        "wrong-datatype",
        400,
        "input 'x' has datatype 'FP64', the model expects FP32",
        json_body=infer_body([jx(datatype="FP64"), jk()]),
    ),
    HttpCase(
        "unknown-datatype",
        400,
        "input 'x' has datatype 'BYTES'",
        json_body=infer_body([jx(datatype="BYTES"), jk()]),
    ),
    HttpCase(
        "shape-mismatch",
        400,
        "input 'x' has shape [1, 5]; expected [-1, 4]",
        json_body=infer_body([jx([1, 5], [1, 2, 3, 4, 5]), jk()]),
    ),
    HttpCase(
        "shape-rank",
        400,
        "input 'x' has shape [4]; expected [-1, 4] (batch dimension first)",
        json_body=infer_body([jx([4]), jk()]),
    ),
    HttpCase(
        "json-data-too-short",
        400,
        "input 'x': 3 values for shape [1, 4] (needs 4)",
        json_body=infer_body([jx(data=[1.0, 2.0, 3.0]), jk()]),
    ),
    HttpCase(
        "json-data-too-long",
        400,
        "input 'x': 8 values for shape [1, 4] (needs 4)",
        json_body=infer_body([jx(data=[1.0] * 8), jk()]),
    ),
    HttpCase(
        "json-data-not-numbers",
        400,
        "input 'x': data is not FP32",
        json_body=infer_body([jx(data=["a", "b", "c", "d"]), jk()]),
    ),
    HttpCase(
        "json-data-ragged",
        400,
        "input 'x': nested data does not match shape",
        json_body=infer_body([jx(data=[[1.0, 2.0], [3.0]]), jk()]),
    ),
    HttpCase(
        "json-float-for-int64",  # numpy alone would truncate 1.5 to 1
        400,
        "input 'k': data is not INT64",
        json_body=infer_body([jx(), jk(data=[1.5])]),
    ),
    HttpCase(
        "json-numeric-strings",  # numpy alone would parse "1" as 1.0
        400,
        "input 'x': data is not FP32",
        json_body=infer_body([jx(data=["1", "2", "3", "4"]), jk()]),
    ),
    HttpCase(
        "json-null-value",  # numpy alone would make it NaN
        400,
        "input 'x': data is not FP32",
        json_body=infer_body([jx(data=[None, 2.0, 3.0, 4.0]), jk()]),
    ),
    HttpCase(
        "json-bools-for-fp32",
        400,
        "input 'x': data is not FP32",
        json_body=infer_body([jx(data=[True, False, True, False]), jk()]),
    ),
    HttpCase(
        "json-int64-overflow",
        400,
        "input 'k': data is not INT64",
        json_body=infer_body([jx(), jk(data=[2**63])]),
    ),
    HttpCase(
        "json-fp32-overflow",  # numpy alone would make it infinity
        400,
        "input 'x': data is not FP32: 1e+39 is out of range",
        json_body=infer_body([jx(data=[1.0, 1e39, 3.0, 4.0]), jk()]),
    ),
    HttpCase(
        "json-data-missing",
        400,
        "input 'x' carries no data",
        json_body=infer_body([{"name": "x", "datatype": "FP32", "shape": [1, 4]}, jk()]),
    ),
    HttpCase(
        "negative-dimension",
        400,
        "input 'x' has an invalid dimension -1",
        json_body=infer_body([jx([-1, 4]), jk()]),
    ),
    HttpCase(
        "non-integer-dimension",
        400,
        "input 'x' has an invalid dimension 4.0",
        json_body=infer_body([jx([1, 4.0]), jk()]),
    ),
    HttpCase(
        "zero-rows",
        400,
        "input 'x' has batch size 0; the model takes 1..64",
        json_body=infer_body([jx([0, 4], []), jk([0, 1], [])]),
    ),
    HttpCase(
        "unknown-input",
        400,
        "unknown input 'z'; the model takes: k, x",
        json_body=infer_body([jx(), jk(), jx(name="z")]),
    ),
    HttpCase(
        "duplicate-input",
        400,
        "input 'x' given twice",
        json_body=infer_body([jx(), jk(), jx()]),
    ),
    HttpCase("missing-input", 400, "missing input(s): k", json_body=infer_body([jx()])),
    HttpCase(
        "batch-disagreement",
        400,
        "inputs disagree on the batch dimension: 2 and 1 ('k')",
        json_body=infer_body([jx([2, 4], [1.0] * 8), jk()]),
    ),
    HttpCase(
        "batch-over-max",
        400,
        "input 'x' has batch size 65; the model takes 1..64",
        json_body=infer_body([jx([65, 4], [1.0] * 260), jk([65, 1], [1] * 65)]),
    ),
    HttpCase(
        "unknown-output",
        400,
        "unknown output(s) requested: nope",
        json_body=GOOD_JSON | {"outputs": [{"name": "y"}, {"name": "nope"}]},
    ),
    # the binary extension
    _bin(
        "raw-too-short",
        400,
        "input 'x': 12 bytes of data",
        {"inputs": [_bx(12), jk()]},
        X_BYTES[:12],
    ),
    _bin(
        "raw-too-long",
        400,
        "input 'x': 20 bytes of data for shape [1, 4] of FP32 (needs 16)",
        {"inputs": [_bx(20), jk()]},
        X_BYTES + b"\0" * 4,
    ),
    _bin(
        "binary-sizes-short-of-body",
        400,
        "binary data is 24 bytes but inputs declare 16",
        GOOD_BINARY_HEADER,
        X_BYTES + K_BYTES,
    ),
    _bin(
        "binary-sizes-past-body",
        400,
        "input 'k': binary_data_size 8 runs past the 16 bytes of binary data",
        {"inputs": [_bx(16), _bx(8, [1, 1], "k") | {"datatype": "INT64"}]},
        X_BYTES,
    ),
    _bin(
        "binary-size-negative",
        400,
        "input 'x': bad binary_data_size -16",
        {"inputs": [_bx(-16), jk()]},
        X_BYTES,
    ),
    _bin(
        "header-length-past-body",
        400,
        "does not fit",
        GOOD_BINARY_HEADER,
        X_BYTES,
        header_length=10_000,
    ),
    _bin("header-length-short", 400, "malformed JSON", GOOD_BINARY_HEADER, X_BYTES, 5),
    HttpCase(
        "header-length-not-a-number",
        400,
        "Inference-Header-Content-Length '-3'",
        content=json.dumps(GOOD_JSON).encode(),
        headers={"Inference-Header-Content-Length": "-3"},
    ),
    # parameters
    *[
        HttpCase(
            f"bad-timeout-{v!r}",
            400,
            "parameter 'timeout' must be a positive integer (microseconds)",
            json_body=GOOD_JSON | {"parameters": {"timeout": v}},
        )
        for v in (-5, 0, 1.5, "soon", True, None)
    ],
    *[
        HttpCase(
            f"bad-priority-{v!r}",
            400,
            "parameter 'priority' must be 0 (default) or a level 1..3",
            json_body=GOOD_JSON | {"parameters": {"priority": v}},
        )
        for v in (-1, "high", 2.0, False, 4, 2**31)
    ],
    # encodings
    HttpCase(
        "unsupported-encoding",
        400,
        "unsupported Content-Encoding 'br'",
        content=json.dumps(GOOD_JSON).encode(),
        headers={"Content-Encoding": "br"},
    ),
    HttpCase(
        "corrupt-gzip",
        400,
        "body is not valid gzip",
        content=b"definitely not gzip",
        headers={"Content-Encoding": "gzip"},
    ),
    HttpCase(
        "truncated-gzip",  # trailer (CRC, size) cut off: the checksum was never verified
        400,
        "body is not valid gzip: truncated stream",
        content=gzip.compress(json.dumps(GOOD_JSON).encode())[:-8],
        headers={"Content-Encoding": "gzip"},
    ),
    HttpCase(
        "gzip-then-garbage",
        400,
        "body is not valid gzip: data after the end of the stream",
        content=gzip.compress(json.dumps(GOOD_JSON).encode()) + b"junk",
        headers={"Content-Encoding": "gzip"},
    ),
    HttpCase(
        "gzip-two-members",  # the second member must not be dropped silently
        400,
        "body is not valid gzip: data after the end of the stream",
        content=gzip.compress(b'{"inputs": ') + gzip.compress(b"[]}"),
        headers={"Content-Encoding": "gzip"},
    ),
    HttpCase(
        "truncated-deflate",
        400,
        "body is not valid deflate: truncated stream",
        content=zlib.compress(json.dumps(GOOD_JSON).encode())[:-4],
        headers={"Content-Encoding": "deflate"},
    ),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
def test_http_errors(web: httpx.Client, case: HttpCase) -> None:
    r = case.send(web)
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"]
    assert case.needle in body["error"], body["error"]
    assert "secret" not in body["error"]


def test_http_absurd_dimensions_are_refused_without_allocating(web: httpx.Client) -> None:
    cases = [
        # affine: the huge dim cannot match the signature's 4
        ("affine", {"inputs": [_bx(4, [1, _BIG]), jk()]}, "expected [-1, 4]"),
        # affine: a huge batch dimension
        ("affine", {"inputs": [_bx(4, [_BIG, 4]), jk()]}, "batch size 1000000000000"),
        # vec: a variable dimension, so only the byte budget stops it
        ("vec", {"inputs": [_bx(4, [1, _BIG], "v")]}, "byte request limit"),
        ("vec", {"inputs": [_bx(4, [8, 2**62], "v")]}, "byte request limit"),
        ("vec", {"inputs": [_bx(4, [1, 2**64 - 1], "v")]}, "byte request limit"),
        # a dimension too big for 64 bits parses as a float: an invalid dimension
        ("vec", {"inputs": [_bx(4, [1, 10**30], "v")]}, "invalid dimension"),
    ]
    for model, header, needle in cases:
        content, headers = binary_request(header, b"\0" * 4)
        started = time.perf_counter()
        r = web.post(f"/v2/models/{model}/infer", content=content, headers=headers | HTTP_ALICE)
        elapsed = time.perf_counter() - started
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]
        assert elapsed < 0.5, f"{header} took {elapsed:.3f}s"
    # The same through JSON "data".
    body = {"inputs": [{"name": "v", "datatype": "FP32", "shape": [1, _BIG], "data": [1.0]}]}
    started = time.perf_counter()
    r = web.post("/v2/models/vec/infer", json=body, headers=HTTP_ALICE)
    assert r.status_code == 400 and "byte request limit" in r.json()["error"]
    assert time.perf_counter() - started < 0.5
    # vec itself works with a modest variable length.
    body = {"inputs": [{"name": "v", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3.5]}]}
    r = web.post("/v2/models/vec/infer", json=body, headers=HTTP_BOB)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [6.5]


def test_http_body_over_limit(web: httpx.Client, hc: httpclient.InferenceServerClient) -> None:
    # Declared by Content-Length.
    big = b"{" + b" " * (MAX_BYTES + 10) + b"}"
    r = web.post("/v2/models/affine/infer", content=big, headers=HTTP_ALICE)
    assert r.status_code == 413
    assert "over the 1048576-byte limit" in r.json()["error"]

    # Streamed (chunked: no Content-Length).
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * (MAX_BYTES // 8)

    r = web.post("/v2/models/affine/infer", content=chunks(), headers=HTTP_ALICE)
    assert r.status_code == 413
    assert "over the 1048576-byte limit" in r.json()["error"]

    # A small gzip body that inflates past the limit.
    bomb = gzip.compress(b" " * (4 * MAX_BYTES))
    assert len(bomb) < MAX_BYTES
    r = web.post(
        "/v2/models/affine/infer",
        content=bomb,
        headers=HTTP_ALICE | {"Content-Encoding": "gzip"},
    )
    assert r.status_code == 413
    assert "decompressed body is over" in r.json()["error"]

    # tritonclient.http gets the 413 (not a reset connection) and its client stays usable.
    n = MAX_BYTES // 4 + 1024
    big_input = httpclient.InferInput("v", [1, n], "FP32")
    big_input.set_data_from_numpy(np.zeros((1, n), dtype=np.float32))
    for _ in range(2):
        with pytest.raises(InferenceServerException) as err:
            hc.infer("vec", [big_input], headers=dict(HTTP_ALICE))
        assert err.value.status() == "413"
        assert "over the 1048576-byte limit" in err.value.message()
    assert_affine(http_infer(hc, X1, K1), X1, K1)
    assert_http_good(web)


def test_http_errors_through_tritonclient(hc: httpclient.InferenceServerClient) -> None:
    """tritonclient.http surfaces the status and the server's message."""
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"headers": {}}, "401", "missing API key"),
        ({"headers": {"Authorization": "Bearer wrong"}}, "401", "unknown API key"),
        ({"headers": HTTP_BOB}, "403", "may not use model"),
        ({"model": "nope"}, "404", "unknown model"),
        ({"model_version": "7"}, "404", "has no version '7'"),
        ({"outputs": [httpclient.InferRequestedOutput("q")]}, "400", "unknown output"),
        ({"priority": 2**31}, "400", "priority"),
    ]
    for kwargs, status, needle in cases:
        with pytest.raises(InferenceServerException) as err:
            http_infer(hc, X1, K1, **kwargs)
        assert err.value.status() == status, (kwargs, err.value)
        assert needle in err.value.message()
    # Wrong datatype and shape through the client's own tensor types.
    ix = httpclient.InferInput("x", [1, 4], "FP64")
    ix.set_data_from_numpy(X1.astype(np.float64))
    ik = httpclient.InferInput("k", [1, 1], "INT64")
    ik.set_data_from_numpy(K1)
    with pytest.raises(InferenceServerException) as err:
        hc.infer("affine", [ix, ik], headers=dict(HTTP_ALICE))
    assert err.value.status() == "400" and "FP64" in err.value.message()
    assert_affine(http_infer(hc, X1, K1), X1, K1)


# --------------------------------------------------------------------------
# errors over gRPC: status codes
# --------------------------------------------------------------------------

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _req(**kw: Any) -> pb.ModelInferRequest:
    return raw_request(X1, K1, **kw)


def _mutate(fn: Callable[[pb.ModelInferRequest], None], base: Any = None) -> pb.ModelInferRequest:
    request = _req() if base is None else base
    fn(request)
    return request


def _set_shape(i: int, shape: list[int]) -> Callable[[pb.ModelInferRequest], None]:
    def apply(r: pb.ModelInferRequest) -> None:
        del r.inputs[i].shape[:]
        r.inputs[i].shape.extend(shape)

    return apply


def _set_raw(i: int, data: bytes) -> Callable[[pb.ModelInferRequest], None]:
    def apply(r: pb.ModelInferRequest) -> None:
        r.raw_input_contents[i] = data

    return apply


def _param(key: str, **value: Any) -> Callable[[pb.ModelInferRequest], None]:
    def apply(r: pb.ModelInferRequest) -> None:
        r.parameters[key].CopyFrom(pb.InferParameter(**value))

    return apply


def _vec_request(shape: list[int], data: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="vec")
    request.inputs.add(name="v", datatype="FP32", shape=shape)
    request.raw_input_contents.append(data)
    return request


def _no_data(r: pb.ModelInferRequest) -> None:
    del r.raw_input_contents[:]


def _both_contents(r: pb.ModelInferRequest) -> None:
    r.inputs[0].contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])


def _typed_short(r: pb.ModelInferRequest) -> None:
    del r.inputs[0].contents.fp32_contents[-1]


def _typed_fp16(r: pb.ModelInferRequest) -> None:
    r.inputs[0].datatype = "FP16"


def _drop_input(r: pb.ModelInferRequest) -> None:
    del r.inputs[1]
    del r.raw_input_contents[1]


def _one_raw_for_two(r: pb.ModelInferRequest) -> None:
    del r.raw_input_contents[1]


def _add_unknown_input(r: pb.ModelInferRequest) -> None:
    r.inputs.add(name="z", datatype="FP32", shape=[1, 4])
    r.raw_input_contents.append(X_BYTES)


def _duplicate_input(r: pb.ModelInferRequest) -> None:
    r.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    r.raw_input_contents.append(X_BYTES)


def _output(name: str) -> Callable[[pb.ModelInferRequest], None]:
    def apply(r: pb.ModelInferRequest) -> None:
        r.outputs.add(name=name)

    return apply


def _over_max_batch() -> pb.ModelInferRequest:
    x, k = sample(65, seed=9)
    return raw_request(x, k)


def _disagreeing_batch() -> pb.ModelInferRequest:
    x, _ = sample(2, seed=9)
    return raw_request(x, K1)


GRPC_CASES: list[tuple[str, Any, Any, grpc.StatusCode, str]] = [
    ("missing-key", _req(), (), grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
    (
        "unknown-key",
        _req(),
        (("authorization", "Bearer nope"),),
        grpc.StatusCode.UNAUTHENTICATED,
        "unknown API key",
    ),
    (
        "not-bearer",
        _req(),
        (("authorization", ALICE),),
        grpc.StatusCode.UNAUTHENTICATED,
        "malformed Authorization",
    ),
    (
        "model-not-allowed",
        _req(),
        MD_BOB,
        grpc.StatusCode.PERMISSION_DENIED,
        "tenant 'bob' may not use model 'affine'",
    ),
    (
        "tenant-directory-down",
        _req(),
        (("authorization", f"Bearer {DIRECTORY_DOWN}"),),
        grpc.StatusCode.UNAVAILABLE,
        "cannot authenticate now: tenant directory unavailable",
    ),
    ("unknown-model", _req(model="nope"), MD_ALICE, grpc.StatusCode.NOT_FOUND, "unknown model"),
    (
        "unknown-version",
        _req(model_version="9"),
        MD_ALICE,
        grpc.StatusCode.NOT_FOUND,
        "model 'affine' has no version '9'",
    ),
    (
        "wrong-datatype",
        _mutate(lambda r: setattr(r.inputs[0], "datatype", "FP64")),
        MD_ALICE,
        INVALID,
        "input 'x' has datatype 'FP64', the model expects FP32",
    ),
    (
        "shape-mismatch",
        _mutate(_set_shape(0, [1, 5])),
        MD_ALICE,
        INVALID,
        "input 'x' has shape [1, 5]; expected [-1, 4]",
    ),
    (
        "raw-too-short",
        _mutate(_set_raw(0, X_BYTES[:12])),
        MD_ALICE,
        INVALID,
        "input 'x': 12 bytes of data for shape [1, 4] of FP32 (needs 16)",
    ),
    (
        "raw-too-long",
        _mutate(_set_raw(0, X_BYTES + X_BYTES)),
        MD_ALICE,
        INVALID,
        "input 'x': 32 bytes of data",
    ),
    (
        "raw-entries-mismatch",
        _mutate(_one_raw_for_two),
        MD_ALICE,
        INVALID,
        "raw_input_contents has 1 entries for 2 inputs",
    ),
    ("no-data", _mutate(_no_data), MD_ALICE, INVALID, "input 'x': 0 values for shape [1, 4]"),
    (
        "typed-too-short",
        _mutate(_typed_short, typed_request(X1, K1)),
        MD_ALICE,
        INVALID,
        "input 'x': 3 values for shape [1, 4] (needs 4)",
    ),
    (
        "typed-and-raw",
        _mutate(_both_contents),
        MD_ALICE,
        INVALID,
        "input 'x' has both contents and raw_input_contents",
    ),
    (
        "typed-fp16",
        _mutate(_typed_fp16, typed_request(X1, K1)),
        MD_ALICE,
        INVALID,
        "datatype 'FP16' needs raw_input_contents",
    ),
    (
        "negative-dimension",
        _mutate(_set_shape(0, [-1, 4])),
        MD_ALICE,
        INVALID,
        "input 'x' has an invalid dimension -1",
    ),
    (
        "zero-rows",
        _mutate(_set_shape(0, [0, 4])),
        MD_ALICE,
        INVALID,
        "batch size 0",
    ),
    (
        "unknown-input",
        _mutate(_add_unknown_input),
        MD_ALICE,
        INVALID,
        "unknown input 'z'; the model takes: k, x",
    ),
    ("duplicate-input", _mutate(_duplicate_input), MD_ALICE, INVALID, "input 'x' given twice"),
    ("missing-input", _mutate(_drop_input), MD_ALICE, INVALID, "missing input(s): k"),
    (
        "batch-disagreement",
        _disagreeing_batch(),
        MD_ALICE,
        INVALID,
        "inputs disagree on the batch dimension: 2 and 1",
    ),
    (
        "batch-over-max",
        _over_max_batch(),
        MD_ALICE,
        INVALID,
        "input 'x' has batch size 65; the model takes 1..64",
    ),
    (
        "unknown-output",
        _mutate(_output("nope")),
        MD_ALICE,
        INVALID,
        "unknown output(s) requested: nope",
    ),
    *[
        (
            f"bad-timeout-{name}",
            _mutate(_param("timeout", **value)),
            MD_ALICE,
            INVALID,
            "parameter 'timeout' must be a positive integer",
        )
        for name, value in [
            ("negative", dict[str, Any](int64_param=-5)),
            ("zero", {"int64_param": 0}),
            ("string", {"string_param": "soon"}),
            ("bool", {"bool_param": True}),
            ("double", {"double_param": 1.5}),
        ]
    ],
    *[
        (
            f"bad-priority-{name}",
            _mutate(_param("priority", **value)),
            MD_ALICE,
            INVALID,
            "parameter 'priority' must be 0 (default) or a level 1..3",
        )
        for name, value in [
            ("negative", dict[str, Any](int64_param=-1)),
            ("string", {"string_param": "high"}),
            ("huge", {"uint64_param": 2**63}),
        ]
    ],
]


@pytest.mark.parametrize(
    ("request_", "metadata", "code", "needle"),
    [c[1:] for c in GRPC_CASES],
    ids=[c[0] for c in GRPC_CASES],
)
def test_grpc_errors(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request_: pb.ModelInferRequest,
    metadata: Any,
    code: grpc.StatusCode,
    needle: str,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_, metadata=metadata, timeout=10)
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details(), err.value.details()
    assert "secret" not in err.value.details()


def test_grpc_absurd_dimensions_are_refused_without_allocating(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    cases = [
        (_mutate(_set_shape(0, [1, _BIG]), _req()), "expected [-1, 4]"),
        (_mutate(_set_shape(0, [_BIG, 4]), _req()), "batch size 1000000000000"),
        (_vec_request([1, _BIG], b"\0" * 4), "byte request limit"),
        (_vec_request([8, 2**62], b"\0" * 4), "byte request limit"),
        (_vec_request([1, 2**63 - 1], b"\0" * 4), "byte request limit"),
    ]
    for request, needle in cases:
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, metadata=MD_ALICE, timeout=10)
        elapsed = time.perf_counter() - started
        assert err.value.code() == INVALID
        assert needle in err.value.details()
        assert elapsed < 0.5, f"{list(request.inputs[0].shape)} took {elapsed:.3f}s"


def test_grpc_message_over_limit(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """grpc core refuses an over-size message itself, before the servicer: RESOURCE_EXHAUSTED."""
    request = _vec_request([1, MAX_BYTES // 4 + 1024], b"\0" * (MAX_BYTES + 4096))
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, metadata=MD_ALICE, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    # Small on the wire but declaring more than the request byte budget: refused by validation.
    request = _vec_request([2, MAX_BYTES // 8 + 1], b"\0" * 1024)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, metadata=MD_ALICE, timeout=10)
    assert err.value.code() == INVALID
    assert "byte request limit" in err.value.details()
    assert_grpc_good(stub)


def test_grpc_errors_through_tritonclient(gc: grpcclient.InferenceServerClient) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"headers": {}}, "StatusCode.UNAUTHENTICATED", "missing API key"),
        ({"headers": {"authorization": "Bearer x"}}, "StatusCode.UNAUTHENTICATED", "unknown"),
        ({"headers": GRPC_BOB}, "StatusCode.PERMISSION_DENIED", "may not use model"),
        ({"model": "nope"}, "StatusCode.NOT_FOUND", "unknown model"),
        ({"model_version": "7"}, "StatusCode.NOT_FOUND", "has no version '7'"),
        (
            {"outputs": [grpcclient.InferRequestedOutput("q")]},
            "StatusCode.INVALID_ARGUMENT",
            "unknown output",
        ),
    ]
    for kwargs, status, needle in cases:
        with pytest.raises(InferenceServerException) as err:
            grpc_infer(gc, X1, K1, **kwargs)
        assert err.value.status() == status, (kwargs, err.value)
        assert needle in err.value.message()
    assert_affine(grpc_infer(gc, X1, K1), X1, K1)


def _codes_delta(
    stack: Stack, before: collections.Counter[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    after = request_codes(stack)
    return {key: n - before[key] for key, n in after.items() if n != before[key]}


def test_grpc_undecodable_messages(stack: Stack, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """A message that is not its method's protobuf: INVALID_ARGUMENT on every door,
    counted like any other bad infer request (after the key is checked)."""
    good = raw_request(X1, K1).SerializeToString()
    undecodable = [
        b"\xff\xff\xff\xff",  # a field tag that never ends
        good[: len(good) - 3],  # cut inside raw_input_contents
        b"\x0a\x02\xc3\x28" + good[8:],  # model_name not UTF-8 (proto3 strings must be)
    ]
    assert good[:8] == b"\x0a\x06affine"
    before = request_codes(stack)
    with grpc.insecure_channel(stack.grpc_url) as channel:
        infer = channel.unary_unary(INFER_METHOD)
        for data in undecodable:
            with pytest.raises(grpc.RpcError) as err:
                infer(data, metadata=MD_ALICE, timeout=10)
            assert err.value.code() == INVALID, (data, err.value.details())
            assert "not a valid inference.ModelInferRequest message" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            infer(undecodable[0], timeout=10)  # no key: refused for that first
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = channel.unary_unary(SERVICE_PREFIX + "ModelMetadata")
        with pytest.raises(grpc.RpcError) as err:
            metadata(b"\x0a\x09affi", timeout=10)  # name declared 9 bytes long, 4 sent
        assert err.value.code() == INVALID
        assert "not a valid inference.ModelMetadataRequest message" in err.value.details()
    assert_grpc_good(stub)
    assert _codes_delta(stack, before) == {
        ("-", "400"): len(undecodable),
        ("-", "401"): 1,
        ("affine", "200"): 1,
    }


# Values a mutation puts where a request field was (kinds and sizes a field must refuse).
_ODD_VALUES: list[Any] = [
    None, True, -1, 0, 3, 2**31, 2**63, 2**70, -(2**63), 1e308, -0.5, "", "x", "FP32",
    "BYTES", [], {}, [1], [[1, 2]], [-1], [1, 4], {"a": 1}, "NaN",
]  # fmt: skip
_INFER_OK_HTTP = frozenset({200, 400, 404, 413, 504})
_INFER_OK_GRPC = frozenset(
    {
        grpc.StatusCode.OK,
        INVALID,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,  # a mutated timeout; the call gets 10 s
    }
)


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:
        del out[rng.randrange(len(out)) :]
    elif kind == 2:
        at = rng.randrange(len(out) + 1)
        out[at:at] = rng.randbytes(rng.randint(1, 8))
    else:
        a, b = sorted(rng.randrange(len(out) + 1) for _ in range(2))
        out[a:a] = out[a:b]
    return bytes(out)


def _mutate_json(value: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Replace, drop or add one node anywhere in a JSON request."""
    slots: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            slots.append((node, key))
            if isinstance(child, dict | list) and child:
                walk(child)

    walk(value)
    parent, key = rng.choice(slots)
    roll = rng.random()
    if roll < 0.7:
        parent[key] = rng.choice(_ODD_VALUES)
    elif isinstance(parent, dict) and roll < 0.85:
        del parent[key]
    elif isinstance(parent, dict):
        parent[rng.choice(["parameters", "outputs", "binary_data_size", "zz"])] = rng.choice(
            _ODD_VALUES
        )
    else:
        parent.append(rng.choice(_ODD_VALUES))
    return value


def _mutated_http(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    rows = rng.randint(1, 3)
    x, k = sample(rows, seed=rng.randrange(1000))
    binary = rng.random() < 0.5
    body: dict[str, Any] = infer_body(
        [jx([rows, 4], x.ravel().tolist()), jk([rows, 1], k.ravel().tolist())],
        outputs=[{"name": "y", "parameters": {"binary_data": binary}}, {"name": "s"}],
        parameters={"timeout": 5_000_000, "priority": 1},
    )
    headers = dict(HTTP_ALICE)
    path = f"/v2/models/{rng.choice(['affine', 'vec'])}/infer"
    roll = rng.random()
    if roll < 0.4:
        return path, json.dumps(_mutate_json(body, rng)).encode(), headers
    if roll < 0.6:
        return path, _mutate_bytes(json.dumps(body).encode(), rng), headers
    payloads = [x.tobytes(), k.tobytes()]
    for item, payload in zip(body["inputs"], payloads, strict=True):
        del item["data"]
        item["parameters"] = {"binary_data_size": len(payload)}
    if rng.random() < 0.5:
        body = _mutate_json(body, rng)
    head = json.dumps(body).encode()
    tail = b"".join(payloads)
    length = len(head)
    if rng.random() < 0.3:
        length = rng.choice([-1, 0, length - 1, length + 1, 2**40, len(head) + len(tail) + 5])
    elif rng.random() < 0.4:
        tail = _mutate_bytes(tail, rng)
    headers["Inference-Header-Content-Length"] = str(length)
    return path, head + tail, headers


def _mutated_grpc(rng: random.Random) -> bytes:
    rows = rng.randint(1, 3)
    x, k = sample(rows, seed=rng.randrange(1000))
    model = rng.choice(["affine", "vec"])
    request = raw_request(x, k, model) if rng.random() < 0.7 else typed_request(x, k, model)
    if rng.random() < 0.5:
        return _mutate_bytes(request.SerializeToString(), rng)
    for _ in range(rng.randint(1, 3)):
        tensor = request.inputs[rng.randrange(len(request.inputs))]
        field = rng.randrange(6)
        if field == 0:
            dims = [-(2**62), -1, 0, 1, 2, 4, 2**31, 2**62]
            tensor.shape[:] = [rng.choice(dims) for _ in range(rng.randint(0, 4))]
        elif field == 1:
            tensor.datatype = rng.choice(["", "BYTES", "BF16", "FP64", "BOOL", "FP16", "fp32"])
        elif field == 2 and request.raw_input_contents:
            at = rng.randrange(len(request.raw_input_contents))
            request.raw_input_contents[at] = rng.randbytes(rng.randint(0, 40))
        elif field == 3:
            request.parameters[rng.choice(["timeout", "priority"])].CopyFrom(
                rng.choice(
                    [
                        pb.InferParameter(int64_param=-5),
                        pb.InferParameter(int64_param=2**62),
                        pb.InferParameter(uint64_param=2**64 - 1),
                        pb.InferParameter(string_param="soon"),
                        pb.InferParameter(double_param=float("nan")),
                        pb.InferParameter(),
                    ]
                )
            )
        elif field == 4:
            request.outputs.add(name=rng.choice(["y", "s", "zz", ""]))
        else:
            request.model_version = rng.choice(["1", "2", "", "0", "x" * 300])
    return request.SerializeToString()


def test_mutated_requests_get_protocol_errors(
    stack: Stack, web: httpx.Client, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """Seeded mutations of good infer requests (bytes cut, flipped, inserted or
    repeated; a JSON node or a protobuf field given an odd value): every one is
    answered in the protocol's own form, never a 5xx, INTERNAL or UNKNOWN; every
    call ends, and good requests still succeed."""
    rng = random.Random(20261204)
    answered: collections.Counter[Any] = collections.Counter()
    for _ in range(300):
        path, content, headers = _mutated_http(rng)
        response = web.post(path, content=content, headers=headers)
        answered[response.status_code] += 1
        assert response.status_code in _INFER_OK_HTTP, (content, response.text)
        if response.status_code != 200:
            assert isinstance(response.json()["error"], str), response.text
    with grpc.insecure_channel(stack.grpc_url) as channel:
        infer = channel.unary_unary(INFER_METHOD)
        for _ in range(300):
            data = _mutated_grpc(rng)
            try:
                infer(data, metadata=MD_ALICE, timeout=10)
                answered[grpc.StatusCode.OK] += 1
            except grpc.RpcError as err:
                answered[err.code()] += 1
                assert err.code() in _INFER_OK_GRPC, (data, err.code(), err.details())
    # The mutations reach past the first checks: some still succeed, most are refused.
    assert answered[200] >= 5 and answered[400] >= 150, answered
    assert answered[grpc.StatusCode.OK] >= 5 and answered[INVALID] >= 150, answered
    _wait_for(lambda: stack.service.in_flight == 0)
    assert_http_good(web)
    assert_grpc_good(stub)


def test_still_serving_after_errors(
    stack: Stack,
    web: httpx.Client,
    stub: pb_grpc.GRPCInferenceServiceStub,
    hc: httpclient.InferenceServerClient,
    gc: grpcclient.InferenceServerClient,
) -> None:
    assert stack.doors.healthy
    assert_http_good(web)
    assert_grpc_good(stub)
    x, k = sample(8, seed=77)
    assert_affine(http_infer(hc, x, k), x, k)
    assert_affine(grpc_infer(gc, x, k), x, k)
    # No request ended as a 500 except the deliberately broken / misconfigured models'.
    codes = request_codes(stack)
    assert {m for m, c in codes if c == "500"} == {"broken", "misfit"}
    assert codes[("affine", "400")] > 0 and codes[("-", "401")] > 0
    assert codes[("-", "503")] > 0  # the tenant directory failing


# --------------------------------------------------------------------------
# deadlines and queue caps on the slow model
# --------------------------------------------------------------------------


def request_codes(stack: Stack) -> collections.Counter[tuple[str, str]]:
    """gpugate_requests_total by (model, code), from the service's metrics."""
    codes: collections.Counter[tuple[str, str]] = collections.Counter()
    for metric in stack.service.metrics.registry.collect():
        if metric.name == "gpugate_requests":
            for s in metric.samples:
                if s.name == "gpugate_requests_total":
                    codes[(s.labels["model"], s.labels["code"])] += int(s.value)
    return codes


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def _infer_http_at(stack: Stack, model: str, x: np.ndarray, k: np.ndarray, **kw: Any) -> Any:
    """One request on a fresh tritonclient.http client (safe from any thread)."""
    with TritonHttp(stack.http_url, network_timeout=30.0) as client:
        return http_infer(client, x, k, model=model, **kw)


def _infer_grpc_at(stack: Stack, model: str, x: np.ndarray, k: np.ndarray, **kw: Any) -> Any:
    with grpcclient.InferenceServerClient(stack.grpc_url) as client:
        return grpc_infer(client, x, k, model=model, **kw)


def _slow_http(stack: Stack, x: np.ndarray, k: np.ndarray, **kw: Any) -> Any:
    return _infer_http_at(stack, "slow", x, k, **kw)


def _slow_grpc(stack: Stack, x: np.ndarray, k: np.ndarray, **kw: Any) -> Any:
    return _infer_grpc_at(stack, "slow", x, k, **kw)


def test_deadlines(stack: Stack, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    backend: AffineBackend = stack.backends[("slow", "1")]
    _wait_for(lambda: backend.running == 0)
    calls = backend.calls
    codes_before = request_codes(stack)
    x, k = sample(1, seed=11)
    # The transport-deadline call below goes on a channel connected beforehand: its
    # 100 ms must cover the call, not a TCP + HTTP/2 handshake, which on a loaded
    # machine can outlast it, and then the call never reaches the server to be counted.
    connected = grpcclient.InferenceServerClient(stack.grpc_url)
    assert connected.is_server_live()
    with connected, concurrent.futures.ThreadPoolExecutor(4) as pool:
        # Occupy the only backend slot, so the next requests wait in the queue.
        blocker = pool.submit(_slow_http, stack, x, k)
        _wait_for(lambda: backend.calls == calls + 1)

        started = time.perf_counter()
        with pytest.raises(InferenceServerException) as err:
            _slow_http(stack, x, k, timeout=100_000)  # 100 ms, sent as parameter
        assert err.value.status() == "504"
        assert "deadline exceeded" in err.value.message()
        assert time.perf_counter() - started < SLOW_DELAY_S

        started = time.perf_counter()
        with pytest.raises(InferenceServerException) as err:
            _slow_grpc(stack, x, k, timeout=100_000)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "deadline exceeded" in err.value.message()
        assert time.perf_counter() - started < SLOW_DELAY_S

        # The transport deadline (grpc-timeout) bounds the request too.
        started = time.perf_counter()
        with pytest.raises(InferenceServerException) as err:
            grpc_infer(connected, x, k, model="slow", client_timeout=0.1)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert time.perf_counter() - started < SLOW_DELAY_S

        # A caller that cancels while queued leaves the queue at once.
        batcher = stack.batcher("slow", "1")
        call = stub.ModelInfer.future(raw_request(x, k, model="slow"), metadata=MD_ALICE)
        _wait_for(lambda: batcher.queued_rows == 1)
        assert call.cancel()
        _wait_for(lambda: batcher.queued_rows == 0)
        assert not blocker.done()  # all of the above happened while the backend was busy

        assert_affine(blocker.result(10), x, k)
    # The expired requests never reached the backend.
    _wait_for(lambda: backend.running == 0)
    assert backend.calls == calls + 1
    # A generous timeout succeeds.
    assert_affine(_slow_grpc(stack, x, k, timeout=5_000_000), x, k)
    assert stack.service.in_flight == 0
    assert stack.batcher("slow", "1").queued_rows == 0

    # Metrics: exactly the two answered requests count as 200; the cancelled one as 499;
    # the client_timeout one as 504 (the gateway's deadline fired first) or 499 (grpc
    # cancelled the handler at the transport deadline).
    _wait_for(lambda: sum(request_codes(stack).values()) == sum(codes_before.values()) + 6)
    codes = request_codes(stack)
    delta = {c: codes[("slow", c)] - codes_before[("slow", c)] for c in ("200", "504", "499")}
    assert delta["200"] == 2, delta
    assert delta["499"] >= 1, delta
    assert delta["504"] + delta["499"] == 4, delta


def test_calls_reset_as_they_arrive(stack: Stack, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Headers, message and the client's reset of several calls in one write.

    What clients whose deadlines pass meet on a stalled server (the ``client_timeout``
    call of test_deadlines, 1 run in 25-60 under CPU load on the grpclib door). Sent
    by hand on a raw HTTP/2 connection so the frames arrive in one read. Before the
    fixes of 2026-12-04 this aborted the native door's whole process (a Read still
    pending on a call deleted at its Done) and left grpclib's handlers unstarted and
    uncounted. Now the server stays up, frees every call and ends every handler, and
    counts each call at most once, as cancelled (499): grpc core (grpcio, native)
    never hands such a call to the application, grpclib hands over every one.
    """
    codes_before = request_codes(stack)
    x, k = sample(1, seed=12)
    message = raw_request(x, k).SerializeToString()
    h2 = H2Connection(H2Configuration(client_side=True))
    h2.initiate_connection()
    resets = 8
    for _ in range(resets):
        stream_id = h2.get_next_available_stream_id()
        h2.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", INFER_METHOD),
                (":authority", stack.grpc_url),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-timeout", "100m"),
                *MD_ALICE,
            ],
        )
        h2.send_data(stream_id, b"\0" + len(message).to_bytes(4, "big") + message)
        h2.reset_stream(stream_id, ErrorCodes.CANCEL)
    door = stack.doors._door
    # The connection stays open: a closed one cancels its calls by another path.
    with socket.create_connection((HOST, stack.doors.grpc_port)) as sock:
        sock.sendall(h2.data_to_send())
        if isinstance(door, GrpclibServer):
            _wait_for(
                lambda: (
                    request_codes(stack)[("affine", "499")] - codes_before[("affine", "499")]
                    == resets
                )
            )
        # The server still answers, on another connection, while this one is open.
        assert_grpc_good(stub)
        _wait_for(lambda: stack.service.in_flight == 0)
        if isinstance(door, NativeServer):
            _wait_for(lambda: door._tasks == {} and door._door.allocated == DEFAULT_ACCEPTS)
    delta = _codes_delta(stack, codes_before)
    expected = {("affine", "200"): 1}  # assert_grpc_good's call
    if isinstance(door, GrpclibServer):
        expected[("affine", "499")] = resets
    assert delta == expected, delta


def test_queue_caps(stack: Stack) -> None:
    backend: AffineBackend = stack.backends[("slow", "1")]
    batcher = stack.batcher("slow", "1")
    _wait_for(lambda: backend.running == 0)
    calls = backend.calls
    x1, k1 = sample(1, seed=21)
    x2, k2 = sample(2, seed=22)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = pool.submit(_slow_http, stack, x1, k1)
        _wait_for(lambda: backend.calls == calls + 1)
        queued = pool.submit(_slow_grpc, stack, x2, k2)  # fills alice's 2-row cap
        _wait_for(lambda: batcher.queued_rows == 2)

        with pytest.raises(InferenceServerException) as err:
            _slow_http(stack, x1, k1)
        assert err.value.status() == "429"
        assert "queue is full" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            _slow_grpc(stack, x1, k1)
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue is full" in err.value.message()

        assert_affine(running.result(10), x1, k1)
        assert_affine(queued.result(10), x2, k2)

    # A flood over both protocols: some are refused, the rest answer correctly.
    _wait_for(lambda: backend.running == 0)
    flood = 16
    barrier = threading.Barrier(flood)

    def one(i: int) -> str:
        x, k = sample(1, seed=300 + i)
        barrier.wait(10)
        try:
            result = (_slow_grpc if i % 2 else _slow_http)(stack, x, k)
        except InferenceServerException as exc:
            return str(exc.status())
        assert_affine(result, x, k)
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(flood) as pool:
        outcomes = list(pool.map(one, range(flood)))
    assert set(outcomes) <= {"ok", "429", "StatusCode.RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes.count("ok") >= 1
    assert outcomes.count("ok") <= 1 + 2 + 4  # running + cap + at most one more batch
    assert len(outcomes) - outcomes.count("ok") >= flood // 2, outcomes


# --------------------------------------------------------------------------
# draining (its own stack: draining is one-way)
# --------------------------------------------------------------------------


def test_draining(loop_thread: LoopThread) -> None:
    backend = AffineBackend(2, delay_s=0.5)
    models: list[ModelSpec] = [
        ("affine", "1", AFFINE_SIGNATURE, backend, BatchPolicy(max_batch_size=64)),
    ]
    stack: Stack = loop_thread.run(start_stack(models))
    try:
        x, k = sample(3, seed=31)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            in_flight_http = pool.submit(_infer_http_at, stack, "affine", x, k)
            in_flight_grpc = pool.submit(_infer_grpc_at, stack, "affine", x, k)
            _wait_for(lambda: stack.service.in_flight == 2 and backend.calls >= 1)

            drained = loop_thread.submit(stack.service.drain(10.0))
            _wait_for(lambda: not stack.service.ready)

            with (
                TritonHttp(stack.http_url) as hc,
                grpcclient.InferenceServerClient(stack.grpc_url) as gc,
            ):
                assert hc.is_server_live() and gc.is_server_live()
                assert hc.is_server_ready() is False
                assert gc.is_server_ready() is False
                assert hc.is_model_ready("affine") is False
                assert gc.is_model_ready("affine") is False
                with pytest.raises(InferenceServerException) as err:
                    http_infer(hc, x, k)
                assert err.value.status() == "503"
                assert "draining" in err.value.message()
                with pytest.raises(InferenceServerException) as err:
                    grpc_infer(gc, x, k)
                assert err.value.status() == "StatusCode.UNAVAILABLE"
                assert "draining" in err.value.message()
                assert not drained.done()

            # The requests that were in flight when draining began complete.
            assert_affine(in_flight_http.result(10), x, k)
            assert_affine(in_flight_grpc.result(10), x, k)
            assert drained.result(10) is True
            assert stack.service.in_flight == 0
    finally:
        loop_thread.run(stop_stack(stack))


def test_http_connections_send_without_nagle(stack: Stack, web: httpx.Client) -> None:
    """Accepted HTTP connections have TCP_NODELAY, on asyncio's own loop too (this
    stack's). Without it every answer uvicorn writes as head then body waited for the
    client's delayed ACK: 44 ms per POST, before the listening socket named its
    protocol (asyncio sets the option only on IPPROTO_TCP sockets)."""
    assert_http_good(web)  # web's keep-alive connection stays open
    assert stack.doors._http is not None
    connections = stack.doors._http.server_state.connections
    assert connections
    for connection in connections:
        sock = connection.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_non_decimal_header_length_is_400_not_500(web: httpx.Client) -> None:
    body = json.dumps(infer_body([jx(data=[1.0, 2.0, 3.0, 4.0]), jk(data=[1])])).encode()
    for value in ("\u00b2".encode("latin-1"), b"9" * 5000, b"-1"):
        r = web.post(
            "/v2/models/affine/infer",
            content=body,
            headers={
                "Authorization": f"Bearer {ALICE}",
                "Inference-Header-Content-Length": value,  # type: ignore[dict-item]
            },
        )
        assert r.status_code == 400, (value[:8], r.text)
        assert "Inference-Header-Content-Length" in r.json()["error"]
    assert_http_good(web)


def test_open_repository_index_reads_only_a_small_body(web: httpx.Client) -> None:
    r = web.post("/v2/repository/index", content=b" " * (1 << 20))
    assert r.status_code == 413
    assert "limit" in r.json()["error"]
    assert web.post("/v2/repository/index", content=b"{}").status_code == 200


# --------------------------------------------------------------------------
# grpcio door: extra outstanding accepts (server.grpc_accepts)
# --------------------------------------------------------------------------


def test_installed_grpcio_takes_extra_accepts() -> None:
    # The accepts use grpcio internals; a grpcio release without them must fail here
    # rather than fall back to one accept at a time unnoticed.
    assert unsupported() is None


@pytest.mark.parametrize("accepts", [1, 16])
def test_grpc_accepts_answer_many_calls_on_one_channel(
    loop_thread: LoopThread, accepts: int
) -> None:
    backend = AffineBackend(2, delay_s=0.01)
    models: list[ModelSpec] = [
        ("affine", "1", AFFINE_SIGNATURE, backend, BatchPolicy(max_batch_size=64)),
    ]
    stack: Stack = loop_thread.run(start_stack(models, "grpcio", accepts))
    samples = {i: sample(i % 3 + 1, seed=5000 + i) for i in range(300)}

    async def burst() -> dict[int, dict[str, np.ndarray]]:
        # One channel, as tritonclient uses: every call arrives on one connection.
        async with grpc.aio.insecure_channel(stack.grpc_url) as channel:
            client = pb_grpc.GRPCInferenceServiceStub(channel)

            async def one(i: int) -> tuple[int, dict[str, np.ndarray]]:
                x, k = samples[i]
                response = await client.ModelInfer(
                    raw_request(x, k, id=f"a{i}"), metadata=MD_ALICE, timeout=20
                )
                assert response.id == f"a{i}"
                return i, decode_outputs(response)

            return dict(await asyncio.gather(*(one(i) for i in samples)))

    acceptors = stack.doors.acceptors
    tasks = list(acceptors._tasks) if acceptors is not None else []
    try:
        results = asyncio.run(burst())
        assert sorted(results) == sorted(samples)
        for i, out in results.items():
            x, k = samples[i]
            np.testing.assert_array_equal(out["y"], affine(x, k, 2)["y"], err_msg=f"call {i}")
            np.testing.assert_array_equal(out["s"], affine(x, k, 2)["s"], err_msg=f"call {i}")
        assert sum(backend.batch_rows) == sum(len(x) for x, _ in samples.values())
        if accepts == 1:
            assert acceptors is None  # grpcio's own accept loop alone
        else:
            assert acceptors is not None
            # grpcio's own loop holds 1 of the 16 outstanding accepts: the extra ones
            # must have started most of the calls.
            assert acceptors.accepted > len(samples) // 2, acceptors.accepted
    finally:
        loop_thread.run(stop_stack(stack))
    # The accepts ended because the server's shutdown failed their requests, not by
    # cancellation (Acceptors.stop cancels only as a last resort).
    assert all(task.done() and not task.cancelled() for task in tasks)


class _ErrorsSeen:
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
        in_flight = [pool.submit(_infer_grpc_at, stack, "affine", x, k) for _ in range(4)]
        _wait_for(lambda: stack.service.in_flight == 4)
        started = time.monotonic()
        lt.run(stop(stack))
        assert time.monotonic() - started < 10
        concurrent.futures.wait(in_flight, timeout=10)
    for batcher in stack.batchers:  # no-op after stop_stack
        lt.run(batcher.close(drain=False))
    return in_flight


def _stop_with_four_calls_in_flight(
    stop: Callable[[Stack], Any], delay_s: float
) -> tuple[list[concurrent.futures.Future[Any]], np.ndarray, np.ndarray]:
    """Four gRPC calls wait on a slow batch while ``stop(stack)`` runs on the server loop.

    Checks what holds however the calls end: most were started by the extra
    accepts (core hands calls to outstanding accepts in the order they were asked
    for, so grpcio's own loop takes the first one), stopping took under 10 s, the
    accepts ended because shutdown failed their requests (not by cancellation),
    and the loop reported no error. Returns the calls, done, and their inputs.
    """
    seen = _ErrorsSeen()
    backend = AffineBackend(2, delay_s=delay_s)
    models: list[ModelSpec] = [
        ("affine", "1", AFFINE_SIGNATURE, backend, BatchPolicy(max_batch_size=64)),
    ]
    x, k = sample(2, seed=77)
    try:
        stack: Stack = seen.lt.run(start_stack(models, "grpcio", 8))
        acceptors = stack.doors.acceptors
        assert acceptors is not None
        tasks = list(acceptors._tasks)
        in_flight = stop_with_four_calls_in_flight(seen.lt, stack, stop, x, k)
        assert acceptors.accepted >= 3
        assert all(task.done() and not task.cancelled() for task in tasks)
        seen.collect_garbage()
    finally:
        seen.lt.stop()
    assert seen.errors == [], seen.errors
    return in_flight, x, k


def test_grpc_accepts_drain_then_stop_answers_calls_in_flight() -> None:
    # stop_stack drains the service, then stops the doors.
    in_flight, x, k = _stop_with_four_calls_in_flight(stop_stack, delay_s=0.5)
    for call in in_flight:
        assert_affine(call.result(0), x, k)  # accepted, then answered in full


def test_grpc_accepts_stop_past_grace_cancels_calls_in_flight() -> None:
    # No drain: the gRPC server stops with handlers still waiting on a slow batch, and
    # its grace (0.2 s) ends first, so core cancels the calls, ours included.
    in_flight, _, _ = _stop_with_four_calls_in_flight(
        lambda stack: stack.doors.stop(0.2), delay_s=3.0
    )
    codes = []
    for call in in_flight:
        with pytest.raises(InferenceServerException) as err:
            call.result(0)
        codes.append(err.value.status())
    assert set(codes) <= {"StatusCode.CANCELLED", "StatusCode.UNAVAILABLE"}, codes
