"""Admission before the message on both gRPC doors: a tenant whose calls never finish
their message holds only its own request slots, and only for the body timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
from gpugate_proto import grpc_service_pb2 as pb

from router.grpc_server import INFER_METHOD
from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings, ServedModel
from router.types import ModelSignature, Tenant, TensorSpec
from scheduler import BatchPolicy, BatchResult, ModelBatcher, Share, Tensors
from tests.fakes import StaticModelTable
from tests.integration.router.helpers import DOORS, HOST, MAX_BYTES, LoopThread
from tests.integration.router.native_door import require_native_door

pytestmark = [pytest.mark.timeout(120)]

SIG = ModelSignature((TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (4,)),), 8)
CALLS = 8  # the gRPC port's calls in progress
GREEDY_CAP = 2
TENANTS = {
    "key-greedy": Tenant("greedy", 1.0, frozenset({"*"}), max_requests_in_flight=GREEDY_CAP),
    "key-victim": Tenant("victim", 1.0, frozenset({"*"})),
}


class Directory:
    async def authenticate(self, api_key: str) -> Tenant | None:
        return TENANTS.get(api_key)


class Echo:
    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        return BatchResult({"y": inputs["x"].copy()}, 1000, "cpu", 1.0)


def _start(loop: LoopThread, door: str, body_timeout_s: float) -> tuple[Any, Any, Any]:
    async def start() -> tuple[Any, Any, Any]:
        batcher = ModelBatcher("echo", "1", Echo(), BatchPolicy(max_batch_size=8))
        batcher.start()
        settings = RouterSettings(max_request_bytes=MAX_BYTES, grpc_body_timeout_s=body_timeout_s)
        table = StaticModelTable([ServedModel("echo", "1", SIG, batcher)])
        service = InferenceService(table, Directory(), settings)
        doors = FrontDoors(service, HOST, MAX_BYTES, grpc_server=door, max_concurrent_calls=CALLS)
        await doors.start(0, 0)
        return service, doors, batcher

    return loop.run(start())  # type: ignore[no-any-return]


def _stop(loop: LoopThread, service: Any, doors: Any, batcher: Any) -> None:
    async def stop() -> None:
        await service.drain(5.0)
        await batcher.close(drain=True)
        await doors.stop(0.5)

    loop.run(stop())


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    lt.start()
    yield lt
    lt.stop()


def _message() -> bytes:
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return request.SerializeToString()


def _never(release: threading.Event) -> Iterator[bytes]:
    """A request stream that sends no message until released, then ends without one."""
    release.wait()
    yield from ()


def _load(loop: LoopThread, service: InferenceService, tenant: str) -> int:
    async def get() -> int:
        return service.tenant_load(tenant).requests

    return loop.run(get())  # type: ignore[no-any-return]


@pytest.mark.parametrize("door", DOORS)
def test_unfinished_messages_hold_only_their_tenants_slots(loop: LoopThread, door: str) -> None:
    if door == "native":
        require_native_door()
    service, doors, batcher = _start(loop, door, body_timeout_s=60.0)
    release = threading.Event()
    url = f"{HOST}:{doors.grpc_port}"
    try:
        with grpc.insecure_channel(url) as greedy, grpc.insecure_channel(url) as victim:
            open_calls = [
                greedy.stream_unary(INFER_METHOD).future(
                    _never(release), metadata=(("authorization", "Bearer key-greedy"),), timeout=30
                )
                for _ in range(CALLS)
            ]
            # Past its cap the tenant is refused at once, before any message is read.
            deadline = time.monotonic() + 10
            while sum(f.done() for f in open_calls) < CALLS - GREEDY_CAP:
                assert time.monotonic() < deadline, [f.done() for f in open_calls]
                time.sleep(0.01)
            refused = [f.exception().code() for f in open_calls if f.done()]  # type: ignore[union-attr]
            assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (CALLS - GREEDY_CAP)
            assert _load(loop, service, "greedy") == GREEDY_CAP
            # Another tenant still gets a call slot and its answer.
            answer = victim.unary_unary(INFER_METHOD)(
                _message(), metadata=(("authorization", "Bearer key-victim"),), timeout=10
            )
            assert pb.ModelInferResponse.FromString(answer).model_name == "echo"
            release.set()
            for f in open_calls:
                assert f.exception(timeout=10) is not None
        deadline = time.monotonic() + 10
        while _load(loop, service, "greedy") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        release.set()
        _stop(loop, service, doors, batcher)


@pytest.mark.parametrize("door", DOORS)
def test_a_message_that_never_comes_ends_the_call_after_the_body_timeout(
    loop: LoopThread, door: str
) -> None:
    if door == "native":
        require_native_door()
    service, doors, batcher = _start(loop, door, body_timeout_s=0.5)
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"{HOST}:{doors.grpc_port}") as channel:
            started = time.monotonic()
            call = channel.stream_unary(INFER_METHOD).future(
                _never(release), metadata=(("authorization", "Bearer key-greedy"),), timeout=30
            )
            error = call.exception(timeout=20)
            elapsed = time.monotonic() - started
        assert error is not None
        # grpcio answers the service's status; the native door cancels the call to end
        # its pending read (docs/grpc.md).
        want = {
            "grpcio": grpc.StatusCode.DEADLINE_EXCEEDED,
            "native": grpc.StatusCode.CANCELLED,
        }[doors.grpc_server]
        assert error.code() == want, error  # type: ignore[attr-defined]
        assert 0.4 < elapsed < 5, elapsed
        assert _load(loop, service, "greedy") == 0
    finally:
        release.set()
        _stop(loop, service, doors, batcher)
