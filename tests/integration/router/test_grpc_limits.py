"""The gRPC port's bounds, on each door: streams per connection, calls in progress, and
key before body (a stranger's message is not read).

Memory is measured on a door in a process of its own (door_process.py): its peak
resident set (VmHWM) before and after a 60 MiB message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import RemoteSettingsChanged, ResponseReceived, StreamReset, TrailersReceived

from router.grpc_server import INFER_METHOD
from scheduler import BatchPolicy
from tests.integration.router.helpers import (
    AFFINE_SIGNATURE,
    DOORS,
    HOST,
    MD_ALICE,
    AffineBackend,
    LoopThread,
    ModelSpec,
    Stack,
    raw_request,
    sample,
    start_stack,
    stop_stack,
)
from tests.integration.router.native_door import require_native_door

pytestmark = [pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[3]
STREAMS = 4  # the per-connection cap under test
CALLS = 3  # the per-server cap under test
DELAY_S = 0.5  # each batch of the slow model


def _slow_models() -> list[ModelSpec]:
    policy = BatchPolicy(max_batch_size=1, max_in_flight=1, max_queue_delay_s=0.0)
    return [("affine", "1", AFFINE_SIGNATURE, AffineBackend(2, delay_s=DELAY_S), policy)]


@pytest.fixture(params=DOORS)
def capped(loop_thread: LoopThread, request: pytest.FixtureRequest) -> Iterator[Stack]:
    if request.param == "native":
        require_native_door()
    stack: Stack = loop_thread.run(
        start_stack(
            _slow_models(),
            request.param,
            max_concurrent_streams=STREAMS,
            max_concurrent_calls=64,
        )
    )
    yield stack
    loop_thread.run(stop_stack(stack))


def test_calls_past_the_stream_cap_wait_on_the_client(capped: Stack) -> None:
    """A well-behaved client (grpc.aio, one connection) queues what the cap does not let
    open: every call is answered, never more than the cap at once in the service."""
    calls = 3 * STREAMS
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, capped.service.in_flight)
            time.sleep(0.005)

    async def burst() -> list[str]:
        async with grpc.aio.insecure_channel(capped.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            x, k = sample(1, seed=1)
            await stub.ModelInfer(raw_request(x, k), metadata=MD_ALICE, timeout=30)  # settings
            answers = await asyncio.gather(
                *(
                    stub.ModelInfer(raw_request(x, k, id=f"c{i}"), metadata=MD_ALICE, timeout=60)
                    for i in range(calls)
                )
            )
            return [a.id for a in answers]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        ids = asyncio.run(burst())
    finally:
        done.set()
        watcher.join()
    assert ids == [f"c{i}" for i in range(calls)]
    assert 1 <= peak <= STREAMS, peak


class _Unruly(H2Connection):
    """An HTTP/2 client that ignores the server's SETTINGS_MAX_CONCURRENT_STREAMS."""

    @property
    def open_outbound_streams(self) -> int:
        return 0


def _unruly_calls(stack: Stack, count: int) -> tuple[list[str], list[int], bool]:
    """``count`` ModelInfer calls opened at once on one connection, after the server's
    settings were received and acknowledged; the grpc-status of each call answered, the
    error code of each call reset, and whether the server closed the connection."""
    x, k = sample(1, seed=2)
    message = raw_request(x, k).SerializeToString()
    h2 = _Unruly(H2Configuration(client_side=True))
    h2.initiate_connection()
    statuses: dict[int, str] = {}
    resets: dict[int, int] = {}
    with socket.create_connection((HOST, stack.doors.grpc_port), timeout=30) as sock:
        sock.sendall(h2.data_to_send())
        settings = False
        while not settings:
            data = sock.recv(65_536)
            assert data, "the server closed the connection before its settings"
            settings = any(isinstance(e, RemoteSettingsChanged) for e in h2.receive_data(data))
        assert h2.remote_settings.max_concurrent_streams == STREAMS
        streams = []
        for _ in range(count):
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
                    *MD_ALICE,
                ],
            )
            frame = b"\0" + len(message).to_bytes(4, "big") + message
            h2.send_data(stream_id, frame, end_stream=True)
            streams.append(stream_id)
        sock.sendall(h2.data_to_send())  # the settings' ACK went first
        while len(statuses) + len(resets) < count:
            data = sock.recv(65_536)
            if not data:
                return list(statuses.values()), list(resets.values()), True
            for event in h2.receive_data(data):
                if isinstance(event, ResponseReceived | TrailersReceived):
                    for key, value in event.headers:
                        if key in (b"grpc-status", "grpc-status"):
                            statuses[event.stream_id] = bytes(value).decode()
                elif isinstance(event, StreamReset):
                    resets[event.stream_id] = event.error_code
            sock.sendall(h2.data_to_send())
    return list(statuses.values()), list(resets.values()), False


def test_streams_past_the_cap_are_refused(capped: Stack) -> None:
    """A client that opens more than the cap anyway. grpcio resets the excess streams
    REFUSED_STREAM (safe for any client to retry) and answers the first ones; gRPC C++
    (the native door) takes it as a connection error and closes the connection, ending
    its calls. Either way the client cannot get more than the cap into the service."""
    statuses, resets, closed = _unruly_calls(capped, 3 * STREAMS)
    if capped.doors.grpc_server == "grpcio":
        assert not closed
        assert statuses == ["0"] * STREAMS, (statuses, resets)
        assert resets == [ErrorCodes.REFUSED_STREAM] * (2 * STREAMS), (statuses, resets)
    else:
        assert closed, (statuses, resets)
        assert "0" not in statuses, statuses
        assert len(statuses) + len(resets) <= STREAMS, (statuses, resets)
    # The connection's refusals leave the port serving.
    x, k = sample(1, seed=3)
    with grpc.insecure_channel(capped.grpc_url) as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            raw_request(x, k), metadata=MD_ALICE, timeout=30
        )
    assert len(answer.raw_output_contents) == 2


@pytest.mark.parametrize("door", DOORS)
def test_calls_past_the_server_cap_are_refused_at_once(loop_thread: LoopThread, door: str) -> None:
    """More calls in progress than ``max_concurrent_calls``, each on its own connection:
    the excess is answered RESOURCE_EXHAUSTED without waiting, the rest are answered."""
    if door == "native":
        require_native_door()
    stack: Stack = loop_thread.run(start_stack(_slow_models(), door, max_concurrent_calls=CALLS))
    x, k = sample(1, seed=4)

    def one(i: int) -> tuple[str, float]:
        started = time.monotonic()
        with grpc.insecure_channel(stack.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            grpc.channel_ready_future(channel).result(timeout=10)
            barrier.wait(timeout=10)
            try:
                stub.ModelInfer(raw_request(x, k, id=str(i)), metadata=MD_ALICE, timeout=30)
            except grpc.RpcError as exc:
                return exc.code().name, time.monotonic() - started
        return "OK", time.monotonic() - started

    calls = 2 * CALLS
    barrier = threading.Barrier(calls)
    try:
        with concurrent.futures.ThreadPoolExecutor(calls) as pool:
            outcomes = list(pool.map(one, range(calls)))
    finally:
        loop_thread.run(stop_stack(stack))
    codes = sorted(code for code, _ in outcomes)
    assert codes == ["OK"] * CALLS + ["RESOURCE_EXHAUSTED"] * CALLS, outcomes
    # Refused without waiting behind the calls in progress (each batch takes DELAY_S).
    assert all(s < DELAY_S for code, s in outcomes if code == "RESOURCE_EXHAUSTED"), outcomes


# -- key before body ---------------------------------------------------------------

MESSAGE_LIMIT = 64 * 2**20
BIG = 60 * 2**20
BOUND = 24 * 2**20  # what a stranger's 60 MiB call may add to the door's peak memory


def _peak_rss(pid: int) -> int:
    """The process's peak resident set so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(params=DOORS)
def door_process(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], int]]:
    if request.param == "native":
        require_native_door()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.router.door_process",
            request.param,
            str(MESSAGE_LIMIT),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ports "), line
        yield proc, int(line.split()[2])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _big_call(port: int, key: str) -> grpc.StatusCode:
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.inputs.add(name="k", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.extend([bytes(BIG), np.zeros(1, np.int64).tobytes()])
    limit = 2 * MESSAGE_LIMIT
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(f"{HOST}:{port}", options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, metadata=(("authorization", key),), timeout=60)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_stranger_s_big_message_is_not_read(
    door_process: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = door_process
    # Warm up: the first calls allocate what every call reuses.
    x, k = sample(1, seed=5)
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(raw_request(x, k), metadata=MD_ALICE, timeout=30)
    before = _peak_rss(proc.pid)
    for key in ("Bearer not-a-key", ""):
        assert _big_call(port, key) == grpc.StatusCode.UNAUTHENTICATED
    stranger = _peak_rss(proc.pid) - before
    assert stranger < BOUND, f"a stranger's {BIG} bytes grew the door's peak by {stranger}"
    # The same message with a valid key is read (then refused for its shape): the measure
    # sees a message that is read.
    assert _big_call(port, MD_ALICE[0][1]) == grpc.StatusCode.INVALID_ARGUMENT
    tenant = _peak_rss(proc.pid) - before
    assert tenant > BIG, f"a tenant's {BIG}-byte message grew the door's peak by only {tenant}"
    print(f"peak growth: stranger {stranger / 2**20:.1f} MiB, tenant {tenant / 2**20:.1f} MiB")
