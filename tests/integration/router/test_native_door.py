"""The native gRPC door (router/native/grpcdoor.cc, router/native_server.py) on real sockets.

The whole protocol suite of this package also runs on this door; these
tests cover what is the door's own: many calls per wake-up, cancellation and
deadlines crossing from gRPC's core to the handler tasks, stopping with calls in
flight, the methods the generated code does not name, and a port in use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from router.grpc_server import INFER_METHOD, SERVICE_PREFIX
from router.native_server import DEFAULT_ACCEPTS, NativeServer
from scheduler import BatchPolicy
from tests.integration.router.helpers import (
    AFFINE_SIGNATURE,
    HOST,
    MD_ALICE,
    AffineBackend,
    ErrorsSeen,
    LoopThread,
    ModelSpec,
    Stack,
    affine,
    assert_affine,
    decode_outputs,
    grpc_statuses,
    infer_grpc_at,
    raw_request,
    request_codes,
    sample,
    start_stack,
    stop_stack,
    stop_with_four_calls_in_flight,
    wait_for,
)
from tests.integration.router.native_door import require_native_door

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def _native() -> None:
    require_native_door()


def _models(delay_s: float) -> tuple[AffineBackend, list[ModelSpec]]:
    backend = AffineBackend(2, delay_s=delay_s)
    policy = BatchPolicy(max_batch_size=64, max_in_flight=1)
    return backend, [("affine", "1", AFFINE_SIGNATURE, backend, policy)]


def _door(stack: Stack) -> NativeServer:
    door = stack.doors._door
    assert isinstance(door, NativeServer), door
    return door


@pytest.fixture
def seen() -> Iterator[ErrorsSeen]:
    """A server loop that records every error it reports; none may be reported."""
    s = ErrorsSeen()
    yield s
    s.collect_garbage()
    s.lt.stop()
    assert s.errors == [], s.errors


@pytest.fixture(scope="module")
def loop_thread_native() -> Iterator[LoopThread]:
    lt = LoopThread()
    lt.start()
    yield lt
    lt.stop()


def test_auto_picks_the_native_door_when_built(loop_thread_native: LoopThread) -> None:
    _, models = _models(0.0)
    stack: Stack = loop_thread_native.run(start_stack(models, "auto"))
    try:
        assert stack.doors.grpc_server == "native"
        _door(stack)
    finally:
        loop_thread_native.run(stop_stack(stack))


def test_many_calls_on_one_channel_with_cancels_and_deadlines(seen: ErrorsSeen) -> None:
    """300 calls at once on one connection, a tenth cancelled by the client and a tenth
    past a 1 ms deadline: every other call gets exactly its own rows, and no handler
    task is left behind."""
    _, models = _models(0.01)
    stack: Stack = seen.lt.run(start_stack(models, "native"))
    door = _door(stack)
    samples = {i: sample(i % 3 + 1, seed=9000 + i) for i in range(300)}

    async def burst() -> dict[int, Any]:
        async with grpc.aio.insecure_channel(stack.grpc_url) as channel:
            client = pb_grpc.GRPCInferenceServiceStub(channel)

            async def one(i: int) -> tuple[int, Any]:
                x, k = samples[i]
                request = raw_request(x, k, id=f"n{i}")
                if i % 10 == 3:
                    call = client.ModelInfer(request, metadata=MD_ALICE, timeout=20)
                    await asyncio.sleep(0.002)
                    call.cancel()
                    try:
                        response = await call
                    except asyncio.CancelledError:
                        return i, "cancelled"
                    return i, decode_outputs(response)  # answered before the cancel
                timeout = 0.001 if i % 10 == 7 else 20
                try:
                    response = await client.ModelInfer(request, metadata=MD_ALICE, timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    return i, exc.code()
                assert response.id == f"n{i}"
                return i, decode_outputs(response)

            return dict(await asyncio.gather(*(one(i) for i in samples)))

    counted_before = sum(request_codes(stack).values())
    try:
        results = asyncio.run(burst())
        assert sorted(results) == sorted(samples)
        for i, out in results.items():
            x, k = samples[i]
            if i % 10 == 7 and not isinstance(out, dict):
                assert out == grpc.StatusCode.DEADLINE_EXCEEDED, (i, out)
                continue
            if i % 10 == 3 and not isinstance(out, dict):
                assert out == "cancelled", (i, out)
                continue
            assert isinstance(out, dict), (i, out)
            np.testing.assert_array_equal(out["y"], affine(x, k, 2)["y"], err_msg=f"call {i}")
            np.testing.assert_array_equal(out["s"], affine(x, k, 2)["s"], err_msg=f"call {i}")
        answered = sum(isinstance(v, dict) for v in results.values())
        assert answered >= 240, answered  # the 240 plain calls at least
        # Every call that reached the door was handed to a handler, and all have ended.
        wait_for(lambda: stack.service.in_flight == 0)
        assert door.taken >= answered
        wait_for(lambda: door._tasks == {})
        # Every call taken is counted once, also those cancelled in the wake-up that
        # took them (the 1 ms deadlines make some).
        assert sum(request_codes(stack).values()) - counted_before == door.taken
        # In C++, every call over is freed: what is left is the outstanding accepts.
        wait_for(lambda: door._door.allocated == DEFAULT_ACCEPTS)
        # The server still answers.
        x, k = sample(2, seed=1)
        assert_affine(infer_grpc_at(stack, "affine", x, k), x, k)
    finally:
        seen.lt.run(stop_stack(stack))


def test_a_client_cancel_cancels_the_handler(seen: ErrorsSeen) -> None:
    backend, models = _models(1.0)
    stack: Stack = seen.lt.run(start_stack(models, "native"))
    door = _door(stack)
    try:
        channel = grpc.insecure_channel(stack.grpc_url)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        x, k = sample(1, seed=2)
        blocker = stub.ModelInfer.future(raw_request(x, k), metadata=MD_ALICE, timeout=20)
        wait_for(lambda: backend.calls == 1)
        queued = stub.ModelInfer.future(raw_request(x, k), metadata=MD_ALICE, timeout=20)
        wait_for(lambda: stack.service.in_flight == 2)
        assert queued.cancel()
        # The handler task ends (499 in the metrics) while the backend is still busy.
        wait_for(lambda: stack.service.in_flight == 1)
        wait_for(lambda: len(door._tasks) == 1)  # set from the server's loop thread
        assert not blocker.done()
        assert_affine(_Decoded(blocker.result(10)), x, k)
        assert backend.calls == 1  # the cancelled call never ran
        wait_for(lambda: door._door.allocated == DEFAULT_ACCEPTS)
        channel.close()
    finally:
        seen.lt.run(stop_stack(stack))


class _Decoded:
    """A ModelInferResponse read like a tritonclient result (for assert_affine)."""

    def __init__(self, response: pb.ModelInferResponse) -> None:
        self._out = decode_outputs(response)

    def as_numpy(self, name: str) -> np.ndarray:
        return self._out[name]


def test_methods_the_door_does_not_serve_and_undecodable_requests(seen: ErrorsSeen) -> None:
    _, models = _models(0.0)
    stack: Stack = seen.lt.run(start_stack(models, "native"))
    try:
        with grpc.insecure_channel(stack.grpc_url) as channel:
            for method in (
                "/inference.GRPCInferenceService/ModelStreamInfer",
                "/inference.GRPCInferenceService/Nope",
                "/other.Service/ModelInfer",
            ):
                call = channel.unary_unary(method)
                with pytest.raises(grpc.RpcError) as err:
                    call(b"", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
            garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            with pytest.raises(grpc.RpcError) as err:
                garbage(b"\xff\xff\xff\xff", metadata=MD_ALICE, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid inference.ModelInferRequest" in (err.value.details() or "")
            # Binary metadata arrives as bytes and does not disturb the call.
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            x, k = sample(2, seed=3)
            response = stub.ModelInfer(
                raw_request(x, k),
                metadata=(*MD_ALICE, ("trace-bin", b"\x00\x01\xfe")),
                timeout=5,
            )
            assert_affine(_Decoded(response), x, k)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    finally:
        seen.lt.run(stop_stack(stack))


def test_a_port_in_use_is_refused(seen: ErrorsSeen) -> None:
    _, models = _models(0.0)
    stack: Stack = seen.lt.run(start_stack(models, "native"))
    try:
        second = NativeServer(stack.service, 1 << 20, 8)
        with pytest.raises(RuntimeError, match="cannot bind gRPC port"):
            seen.lt.run(second.start(HOST, stack.doors.grpc_port))
    finally:
        seen.lt.run(stop_stack(stack))


def _four_calls_then(
    seen: ErrorsSeen, stop: Any, delay_s: float
) -> tuple[list[concurrent.futures.Future[Any]], np.ndarray, np.ndarray, Stack]:
    _, models = _models(delay_s)
    stack: Stack = seen.lt.run(start_stack(models, "native"))
    x, k = sample(2, seed=77)
    return stop_with_four_calls_in_flight(seen.lt, stack, stop, x, k), x, k, stack


def test_drain_then_stop_answers_calls_in_flight(seen: ErrorsSeen) -> None:
    in_flight, x, k, stack = _four_calls_then(seen, stop_stack, delay_s=0.5)
    for call in in_flight:
        assert_affine(call.result(0), x, k)
    assert _door(stack)._tasks == {}


def test_stop_past_grace_cancels_calls_in_flight(seen: ErrorsSeen) -> None:
    # No drain: the door stops with handlers waiting on a slow batch; its grace (0.2 s)
    # ends first, so core cancels the calls and their handler tasks are cancelled.
    in_flight, _, _, stack = _four_calls_then(seen, lambda s: s.doors.stop(0.2), delay_s=3.0)
    codes = []
    for call in in_flight:
        with pytest.raises(InferenceServerException) as err:
            call.result(0)
        codes.append(err.value.status())
    assert set(codes) <= {"StatusCode.CANCELLED", "StatusCode.UNAVAILABLE"}, codes
    assert _door(stack)._tasks == {}
    assert stack.service.in_flight == 0


def test_a_method_name_not_utf8_is_refused_alone(seen: ErrorsSeen) -> None:
    """A :path that is not UTF-8 finds no method (UNIMPLEMENTED), and the good calls
    taken with it in one wake-up are answered as usual: a name that failed to convert
    once failed every call of its wake-up with INTERNAL, and the loop reported the
    error (``seen`` fails the test on any error the loop reports)."""
    _, models = _models(0.0)
    stack: Stack = seen.lt.run(start_stack(models, "native"))
    try:
        message = raw_request(*sample(1, seed=4), model="affine").SerializeToString()
        infer = INFER_METHOD.encode()
        bad = SERVICE_PREFIX.encode() + b"Model\xffInfer"
        paths = [infer, bad, infer, "/é/ModelInfer".encode("latin-1")]
        ok, unimplemented = "0", str(grpc.StatusCode.UNIMPLEMENTED.value[0])
        assert grpc_statuses(stack, paths, message) == [ok, unimplemented, ok, unimplemented]
        wait_for(lambda: _door(stack)._door.allocated == DEFAULT_ACCEPTS)
    finally:
        seen.lt.run(stop_stack(stack))
