"""Standard health checks on the front doors, over real sockets, on both gRPC doors:
``grpc.health.v1.Health`` (Check, List, Watch) for the server and per model version,
server reflection listing the services and resolving their descriptors, and the HTTP
health endpoints' bodies. No call here sends an API key, and none counts as a request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from router.health import WATCH_POLL_S
from router.model_table import LiveModelTable
from router.native_server import DEFAULT_ACCEPTS, NativeServer
from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings, ServedModel
from router.types import ModelSignature
from scheduler import Backend, BatchPolicy, ModelBatcher
from tests.integration.router.helpers import (
    AFFINE_SIGNATURE,
    DOORS,
    HOST,
    MAX_BYTES,
    VEC_SIGNATURE,
    AffineBackend,
    Directory,
    LoopThread,
    VecBackend,
    wait_for,
)
from tests.integration.router.native_door import require_native_door

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
HEALTH = "grpc.health.v1.Health"
INFERENCE = "inference.GRPCInferenceService"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


@dataclass
class Door:
    """One gateway's front doors over a live model table: ``affine`` version 2 in
    production and version 1 in staging; ``vec`` deployed by the tests that need it."""

    name: str
    loop: LoopThread
    service: InferenceService
    doors: FrontDoors
    table: LiveModelTable
    affine: ServedModel
    staged: ServedModel
    vec: ServedModel

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.doors.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.doors.http_port}"

    def deploy_vec(self, deployed: bool) -> None:
        production = [self.affine, self.vec] if deployed else [self.affine]
        self.table.swap(production, [self.staged])


async def _start(loop: LoopThread, door: str) -> Door:
    def served(name: str, version: str, backend: Backend, signature: ModelSignature) -> ServedModel:
        batcher = ModelBatcher(name, version, backend, BatchPolicy(max_batch_size=8))
        batcher.start()
        return ServedModel(name, version, signature, batcher)

    affine = served("affine", "2", AffineBackend(2), AFFINE_SIGNATURE)
    staged = served("affine", "1", AffineBackend(1), AFFINE_SIGNATURE)
    vec = served("vec", "1", VecBackend(), VEC_SIGNATURE)
    table = LiveModelTable()
    table.swap([affine], [staged])
    service = InferenceService(
        table, Directory(), RouterSettings(max_request_bytes=MAX_BYTES, default_timeout_s=10.0)
    )
    doors = FrontDoors(service, HOST, MAX_BYTES, grpc_server=door)
    await doors.start(0, 0)
    return Door(door, loop, service, doors, table, affine, staged, vec)


async def _stop(d: Door) -> None:
    await d.service.drain(5.0)
    for m in (d.affine, d.staged, d.vec):
        await m.batcher.close(drain=True)
    await d.doors.stop(0.5)


@pytest.fixture(params=DOORS)
def door(loop_thread: LoopThread, request: pytest.FixtureRequest) -> Iterator[Door]:
    """A gateway of its own per test: one test drains it."""
    if request.param == "native":
        require_native_door()
    d: Door = loop_thread.run(_start(loop_thread, request.param))
    yield d
    loop_thread.run(_stop(d))


def _requests_counted(door: Door) -> float:
    """gpugate_requests_total over every label."""
    return sum(
        s.value
        for metric in door.service.metrics.registry.collect()
        for s in metric.samples
        if s.name == "gpugate_requests_total"
    )


def _check(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def _check_code(channel: grpc.Channel, service: str) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failed:
        _check(channel, service)
    return failed.value.code()


def test_check_answers_for_the_server_and_each_model_without_a_key(door: Door) -> None:
    counted_before = _requests_counted(door)
    with grpc.insecure_channel(door.grpc_url) as channel:
        assert _check(channel, "") == SERVING
        assert _check(channel, INFERENCE) == SERVING
        assert _check(channel, "affine") == SERVING
        assert _check(channel, "affine/2") == SERVING
        # Deployed in staging: known, takes no requests (ModelReady: not ready).
        assert _check(channel, "affine/1") == NOT_SERVING
        for unknown in ("nope", "nope/1", "affine/9", "affine/", "/2", "vec", HEALTH):
            assert _check_code(channel, unknown) == grpc.StatusCode.NOT_FOUND, unknown
        # What health says of a version is what ModelReady says.
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for version, status in (("2", SERVING), ("1", NOT_SERVING), ("9", None)):
            ready = stub.ModelReady(pb.ModelReadyRequest(name="affine", version=version)).ready
            assert ready == (status == SERVING), version
    assert _requests_counted(door) == counted_before  # no health call counts as a request
    assert door.service.in_flight == 0


def test_list_names_every_service_and_its_status(door: Door) -> None:
    with grpc.insecure_channel(door.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
        assert {name: s.status for name, s in listed.items()} == {
            "": SERVING,
            INFERENCE: SERVING,
            "affine": SERVING,
            "affine/2": SERVING,
            "affine/1": NOT_SERVING,
        }


def test_malformed_health_request_is_invalid_argument(door: Door) -> None:
    with grpc.insecure_channel(door.grpc_url) as channel:
        check = channel.unary_unary(f"/{HEALTH}/Check")
        with pytest.raises(grpc.RpcError) as failed:
            check(b"\x0a\xff", timeout=10)  # field 1 with a length past the end
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _watch(url: str, service: str, door: Door) -> list[int]:
    """Watch ``service``: the status at once; nothing more while nothing changes; the
    change once ``vec`` is deployed, and again once it is withdrawn."""
    async with grpc.aio.insecure_channel(url) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=30
        )
        seen = [(await asyncio.wait_for(call.read(), 5)).status]
        quiet = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({quiet}, timeout=3 * WATCH_POLL_S)
        assert not done and not call.done()  # the stream stays open, without a message
        door.deploy_vec(True)
        started = time.monotonic()
        seen.append((await asyncio.wait_for(quiet, 5)).status)
        assert time.monotonic() - started < 2 * WATCH_POLL_S + 0.5
        door.deploy_vec(False)
        seen.append((await asyncio.wait_for(call.read(), 5)).status)
        call.cancel()
        return seen


def test_watch_sends_the_status_then_each_change(door: Door) -> None:
    seen = asyncio.run(_watch(door.grpc_url, "vec", door))
    assert seen == [SERVICE_UNKNOWN, SERVING, SERVICE_UNKNOWN]
    _door_calls_over(door)


def _door_calls_over(door: Door, stopped: bool = False) -> None:
    """On the native door: every call has ended in Python and, unless the server has
    stopped (which leaves the calls it cut off to the process), been freed in C++."""
    if door.name != "native":
        return
    native = door.doors._door
    assert isinstance(native, NativeServer)
    wait_for(lambda: native._tasks == {} and native._writes == {} and native._bodies == {})
    if not stopped:
        wait_for(lambda: native._door.allocated == DEFAULT_ACCEPTS)


def test_drain_turns_health_not_serving(door: Door) -> None:
    async def watch_server() -> tuple[list[int], float]:
        async with grpc.aio.insecure_channel(door.grpc_url) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30
            )
            seen = [(await asyncio.wait_for(call.read(), 5)).status]
            drained = asyncio.run_coroutine_threadsafe(door.service.drain(5.0), door.loop.loop)
            started = time.monotonic()
            seen.append((await asyncio.wait_for(call.read(), 5)).status)
            elapsed = time.monotonic() - started
            assert await asyncio.wrap_future(drained)
            # Still watching while the server stops: the stop ends the stream.
            stopped = asyncio.run_coroutine_threadsafe(door.doors.stop(0.5), door.loop.loop)
            with pytest.raises(grpc.aio.AioRpcError):
                await asyncio.wait_for(call.read(), 10)
            await asyncio.wait_for(asyncio.wrap_future(stopped), 10)
            return seen, elapsed

    seen, elapsed = asyncio.run(watch_server())
    assert seen == [SERVING, NOT_SERVING]
    assert elapsed < 2 * WATCH_POLL_S + 0.5
    _door_calls_over(door, stopped=True)


def test_checks_while_draining(door: Door) -> None:
    door.loop.run(door.service.drain(5.0))
    with grpc.insecure_channel(door.grpc_url) as channel:
        assert _check(channel, "") == NOT_SERVING
        assert _check(channel, INFERENCE) == NOT_SERVING
        assert _check(channel, "affine") == NOT_SERVING
        assert _check(channel, "affine/2") == NOT_SERVING
        assert _check_code(channel, "nope") == grpc.StatusCode.NOT_FOUND
    with httpx.Client(base_url=door.http_url, timeout=10) as web:
        live = web.get("/v2/health/live")
        assert (live.status_code, live.json()) == (200, {"live": True})
        ready = web.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (503, {"ready": False})
        assert ready.headers["content-type"] == "application/json"


def test_http_health_bodies(door: Door) -> None:
    with httpx.Client(base_url=door.http_url, timeout=10) as web:
        live = web.get("/v2/health/live")
        assert (live.status_code, live.json()) == (200, {"live": True})
        ready = web.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        assert ready.headers["content-type"] == "application/json"


def test_reflection_lists_the_services_and_resolves_model_infer(door: Door) -> None:
    with grpc.insecure_channel(door.grpc_url) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == {INFERENCE, HEALTH, REFLECTION}
        # As grpcurl resolves a method: the file that holds it, then the method in it.
        assert database.FindFileContainingSymbol(f"{INFERENCE}.ModelInfer").service[0].name == (
            "GRPCInferenceService"
        )
        pool = descriptor_pool.DescriptorPool(database)
        infer = pool.FindServiceByName(INFERENCE).methods_by_name["ModelInfer"]
        assert infer.input_type.full_name == "inference.ModelInferRequest"
        assert infer.output_type.full_name == "inference.ModelInferResponse"
        fields = {f.name for f in infer.input_type.fields}
        assert {"model_name", "inputs", "raw_input_contents"} <= fields
        watch = pool.FindServiceByName(HEALTH).methods_by_name["Watch"]
        assert watch.server_streaming and not watch.client_streaming
        assert watch.output_type.full_name == "grpc.health.v1.HealthCheckResponse"
        # An unknown symbol is a NOT_FOUND answer on the same stream, which goes on.
        with pytest.raises(KeyError):
            pool.FindServiceByName("nope.Nothing")
        assert pool.FindServiceByName(REFLECTION).methods[0].name == "ServerReflectionInfo"
    _door_calls_over(door)


def test_reflection_answers_each_message_of_a_stream_until_the_client_ends_it(
    door: Door,
) -> None:
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="nope.Nothing"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="grpc_health/v1/health.proto"),
    ]
    with grpc.insecure_channel(door.grpc_url) as channel:
        stream = channel.stream_stream(
            f"/{REFLECTION}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = stream(iter(asks), timeout=10)  # half-closes after the last message
        answers = list(call)
        assert call.code() == grpc.StatusCode.OK
    assert [a.WhichOneof("message_response") for a in answers] == [
        "list_services_response",
        "error_response",
        "file_descriptor_response",
    ]
    assert answers[1].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert [a.original_request for a in answers] == asks
    _door_calls_over(door)
