"""Fixtures of the router's integration tests: one server loop, and the main stack once
per gRPC door, shared by every module of this package (the last check of
test_mutations.py counts what all of them sent)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

from tests.integration.router.helpers import (
    DOORS,
    MAX_BYTES,
    LoopThread,
    Stack,
    TritonHttp,
    main_models,
    start_stack,
    stop_stack,
)
from tests.integration.router.native_door import require_native_door, use_door_from_environment

use_door_from_environment()


@pytest.fixture(scope="package")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    lt.start()
    yield lt
    lt.stop()


@pytest.fixture(scope="package", params=DOORS)
def stack(loop_thread: LoopThread, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The main servers, once per gRPC implementation (``server.grpc_server``)."""
    if request.param == "native":
        require_native_door()
    s: Stack = loop_thread.run(start_stack(main_models(), request.param))
    yield s
    loop_thread.run(stop_stack(s))


@pytest.fixture(scope="package")
def hc(stack: Stack) -> Iterator[httpclient.InferenceServerClient]:
    client = TritonHttp(stack.http_url, network_timeout=30.0)
    yield client
    client.close()


@pytest.fixture(scope="package")
def gc(stack: Stack) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="package")
def web(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{stack.http_url}", timeout=30.0) as client:
        yield client


@pytest.fixture(scope="package")
def stub(stack: Stack) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    # Client-side limits well above the server's so the server is what refuses.
    options = [
        ("grpc.max_send_message_length", 64 * MAX_BYTES),
        ("grpc.max_receive_message_length", 64 * MAX_BYTES),
    ]
    with grpc.insecure_channel(stack.grpc_url, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
