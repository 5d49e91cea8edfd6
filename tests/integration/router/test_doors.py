"""The grpcio door on stacks of its own: many calls on one connection, and stopping
with calls in flight (test_native_door.py has the native door's)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
import h2.exceptions
import numpy as np
import pytest
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from router.grpc_server import SERVICE_PREFIX
from scheduler import BatchPolicy
from tests.integration.router.helpers import (
    AFFINE_SIGNATURE,
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
    sample,
    start_stack,
    stop_stack,
    stop_with_four_calls_in_flight,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


def test_many_calls_on_one_channel(loop_thread: LoopThread) -> None:
    backend = AffineBackend(2, delay_s=0.01)
    models: list[ModelSpec] = [
        ("affine", "1", AFFINE_SIGNATURE, backend, BatchPolicy(max_batch_size=64)),
    ]
    stack: Stack = loop_thread.run(start_stack(models, "grpcio"))
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

    try:
        results = asyncio.run(burst())
        assert sorted(results) == sorted(samples)
        for i, out in results.items():
            x, k = samples[i]
            np.testing.assert_array_equal(out["y"], affine(x, k, 2)["y"], err_msg=f"call {i}")
            np.testing.assert_array_equal(out["s"], affine(x, k, 2)["s"], err_msg=f"call {i}")
        assert sum(backend.batch_rows) == sum(len(x) for x, _ in samples.values())
    finally:
        loop_thread.run(stop_stack(stack))


def _stop_with_four_calls_in_flight(
    stop: Callable[[Stack], Any], delay_s: float
) -> tuple[list[concurrent.futures.Future[Any]], np.ndarray, np.ndarray]:
    """Four gRPC calls wait on a slow batch while ``stop(stack)`` runs on the grpcio
    door's server loop.

    Checks what holds however the calls end: stopping took under 10 s and the loop
    reported no error. Returns the calls, done, and their inputs.
    """
    seen = ErrorsSeen()
    backend = AffineBackend(2, delay_s=delay_s)
    models: list[ModelSpec] = [
        ("affine", "1", AFFINE_SIGNATURE, backend, BatchPolicy(max_batch_size=64)),
    ]
    x, k = sample(2, seed=77)
    try:
        stack: Stack = seen.lt.run(start_stack(models, "grpcio"))
        in_flight = stop_with_four_calls_in_flight(seen.lt, stack, stop, x, k)
        seen.collect_garbage()
    finally:
        seen.lt.stop()
    assert seen.errors == [], seen.errors
    return in_flight, x, k


def test_drain_then_stop_answers_calls_in_flight() -> None:
    # stop_stack drains the service, then stops the doors.
    in_flight, x, k = _stop_with_four_calls_in_flight(stop_stack, delay_s=0.5)
    for call in in_flight:
        assert_affine(call.result(0), x, k)  # accepted, then answered in full


def test_stop_past_grace_cancels_calls_in_flight() -> None:
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


def test_a_method_name_not_utf8_leaves_the_grpcio_door_serving(loop_thread: LoopThread) -> None:
    """grpc.aio's server loop ends, closing the port, on a call whose :path is not UTF-8;
    the door starts a new server on the same port, so the next calls are answered."""
    backend = AffineBackend(2)
    models: list[ModelSpec] = [
        ("affine", "1", AFFINE_SIGNATURE, backend, BatchPolicy(max_batch_size=64)),
    ]
    stack: Stack = loop_thread.run(start_stack(models, "grpcio"))
    try:
        message = raw_request(*sample(1, seed=4)).SerializeToString()
        bad = SERVICE_PREFIX.encode() + b"Model\xffInfer"
        with contextlib.suppress(AssertionError, OSError, h2.exceptions.ProtocolError):
            grpc_statuses(stack, [bad], message)  # the server that ended drops the call
        wait_for(lambda: stack.doors.grpc_restarts == 1)
        assert stack.doors.healthy
        for seed in (5, 6):
            x, k = sample(2, seed=seed)
            assert_affine(infer_grpc_at(stack, "affine", x, k), x, k)
    finally:
        loop_thread.run(stop_stack(stack))
    assert stack.doors.grpc_restarts == 1
