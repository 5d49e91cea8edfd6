"""Deadlines, cancellation, calls reset as they arrive, queue caps on the slow model,
and draining."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time

import pytest
import tritonclient.grpc as grpcclient
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from tritonclient.utils import InferenceServerException

from router.grpc_server import INFER_METHOD
from router.native_server import DEFAULT_ACCEPTS, NativeServer
from scheduler import BatchPolicy
from tests.integration.router.helpers import (
    AFFINE_SIGNATURE,
    HOST,
    MD_ALICE,
    SLOW_DELAY_S,
    AffineBackend,
    LoopThread,
    ModelSpec,
    Stack,
    TritonHttp,
    assert_affine,
    assert_grpc_good,
    codes_delta,
    grpc_infer,
    http_infer,
    infer_grpc_at,
    infer_http_at,
    raw_request,
    request_codes,
    sample,
    slow_grpc,
    slow_http,
    start_stack,
    stop_stack,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------
# deadlines and queue caps on the slow model
# --------------------------------------------------------------------------


# How long the blocking batch of test_deadlines runs: long enough for every deadline
# below to pass while it does, on a loaded machine too.
BUSY_S = 2.0
# The transport deadline (grpc-timeout) of test_deadlines. The call must reach the
# gateway's handler before it passes: a call whose client reset comes first is dropped
# by gRPC's core and never seen by the gateway, so it cannot be counted
# (test_calls_reset_as_they_arrive). 100 ms once fell short under a full CI run.
TRANSPORT_DEADLINE_S = 0.4


def test_deadlines(stack: Stack, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    backend: AffineBackend = stack.backends[("slow", "1")]
    wait_for(lambda: backend.running == 0)
    backend.delay_s = BUSY_S
    try:
        _deadlines(stack, stub, backend)
    finally:
        backend.delay_s = SLOW_DELAY_S


def _deadlines(
    stack: Stack, stub: pb_grpc.GRPCInferenceServiceStub, backend: AffineBackend
) -> None:
    calls = backend.calls
    codes_before = request_codes(stack)
    x, k = sample(1, seed=11)
    # The transport-deadline call below goes on a channel connected beforehand: its
    # deadline must cover the call, not a TCP + HTTP/2 handshake, which on a loaded
    # machine can outlast it, and then the call never reaches the server to be counted.
    connected = grpcclient.InferenceServerClient(stack.grpc_url)
    assert connected.is_server_live()
    with connected, concurrent.futures.ThreadPoolExecutor(4) as pool:
        # Occupy the only backend slot, so the next requests wait in the queue.
        blocker = pool.submit(slow_http, stack, x, k)
        wait_for(lambda: backend.calls == calls + 1)

        started = time.perf_counter()
        with pytest.raises(InferenceServerException) as err:
            slow_http(stack, x, k, timeout=100_000)  # 100 ms, sent as parameter
        assert err.value.status() == "504"
        assert "deadline exceeded" in err.value.message()
        assert time.perf_counter() - started < SLOW_DELAY_S

        started = time.perf_counter()
        with pytest.raises(InferenceServerException) as err:
            slow_grpc(stack, x, k, timeout=100_000)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "deadline exceeded" in err.value.message()
        assert time.perf_counter() - started < SLOW_DELAY_S

        # The transport deadline (grpc-timeout) bounds the request too.
        started = time.perf_counter()
        with pytest.raises(InferenceServerException) as err:
            grpc_infer(connected, x, k, model="slow", client_timeout=TRANSPORT_DEADLINE_S)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert time.perf_counter() - started < TRANSPORT_DEADLINE_S + SLOW_DELAY_S

        # A caller that cancels while queued leaves the queue at once.
        batcher = stack.batcher("slow", "1")
        call = stub.ModelInfer.future(raw_request(x, k, model="slow"), metadata=MD_ALICE)
        wait_for(lambda: batcher.queued_rows == 1)
        assert call.cancel()
        wait_for(lambda: batcher.queued_rows == 0)
        assert not blocker.done()  # all of the above happened while the backend was busy

        assert_affine(blocker.result(10), x, k)
    # The expired requests never reached the backend.
    wait_for(lambda: backend.running == 0)
    assert backend.calls == calls + 1
    # A generous timeout succeeds.
    assert_affine(slow_grpc(stack, x, k, timeout=5_000_000), x, k)
    assert stack.service.in_flight == 0
    assert stack.batcher("slow", "1").queued_rows == 0

    # Metrics: exactly the two answered requests count as 200; the cancelled one as 499;
    # the client_timeout one as 504 (the gateway's deadline fired first) or 499 (grpc
    # cancelled the handler at the transport deadline).
    wait_for(lambda: sum(request_codes(stack).values()) == sum(codes_before.values()) + 6)
    codes = request_codes(stack)
    delta = {c: codes[("slow", c)] - codes_before[("slow", c)] for c in ("200", "504", "499")}
    assert delta["200"] == 2, delta
    assert delta["499"] >= 1, delta
    assert delta["504"] + delta["499"] == 4, delta


def test_calls_reset_as_they_arrive(stack: Stack, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Headers, message and the client's reset of several calls in one write.

    What clients whose deadlines pass meet on a stalled server (the ``client_timeout``
    call of test_deadlines). Sent by hand on a raw HTTP/2 connection so the frames
    arrive in one read. The server stays up, frees every call, ends every handler and
    hands none of these calls to the service (gRPC's core drops them), so only the good
    call made afterwards is counted. On the native door a call whose Read was still
    pending when its Done arrived was once deleted there, a use after free.
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
        # The server still answers, on another connection, while this one is open.
        assert_grpc_good(stub)
        wait_for(lambda: stack.service.in_flight == 0)
        if isinstance(door, NativeServer):
            wait_for(lambda: door._tasks == {} and door._door.allocated == DEFAULT_ACCEPTS)
    delta = codes_delta(stack, codes_before)
    assert delta == {("affine", "200"): 1}, delta  # assert_grpc_good's call


def test_queue_caps(stack: Stack) -> None:
    backend: AffineBackend = stack.backends[("slow", "1")]
    batcher = stack.batcher("slow", "1")
    wait_for(lambda: backend.running == 0)
    calls = backend.calls
    x1, k1 = sample(1, seed=21)
    x2, k2 = sample(2, seed=22)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = pool.submit(slow_http, stack, x1, k1)
        wait_for(lambda: backend.calls == calls + 1)
        queued = pool.submit(slow_grpc, stack, x2, k2)  # fills alice's 2-row cap
        wait_for(lambda: batcher.queued_rows == 2)

        with pytest.raises(InferenceServerException) as err:
            slow_http(stack, x1, k1)
        assert err.value.status() == "429"
        assert "queue is full" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            slow_grpc(stack, x1, k1)
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue is full" in err.value.message()

        assert_affine(running.result(10), x1, k1)
        assert_affine(queued.result(10), x2, k2)

    # A flood over both protocols: some are refused, the rest answer correctly.
    wait_for(lambda: backend.running == 0)
    flood = 16
    barrier = threading.Barrier(flood)

    def one(i: int) -> str:
        x, k = sample(1, seed=300 + i)
        barrier.wait(10)
        try:
            result = (slow_grpc if i % 2 else slow_http)(stack, x, k)
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
            in_flight_http = pool.submit(infer_http_at, stack, "affine", x, k)
            in_flight_grpc = pool.submit(infer_grpc_at, stack, "affine", x, k)
            wait_for(lambda: stack.service.in_flight == 2 and backend.calls >= 1)

            drained = loop_thread.submit(stack.service.drain(10.0))
            wait_for(lambda: not stack.service.ready)

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
