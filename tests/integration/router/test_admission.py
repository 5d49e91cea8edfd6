"""Tenant admission through the front doors, over real sockets, on both gRPC doors:
the in-flight caps are exact and answer 429 with ``Retry-After`` /
RESOURCE_EXHAUSTED with the retry delay in trailing metadata; a priority level is a
grant, refused 403 / PERMISSION_DENIED, so a weight-1 tenant cannot take a weight-10
tenant's share by asking for a more urgent level."""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings, ServedModel
from router.types import ModelSignature, Tenant, TensorSpec
from scheduler import BatchPolicy, BatchRecord, BatchResult, ModelBatcher, Share, Tensors
from tests.fakes import StaticModelTable
from tests.integration.router.helpers import DOORS, HOST, MAX_BYTES, LoopThread
from tests.integration.router.native_door import require_native_door

SIG = ModelSignature((TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (4,)),), 10)
BIG = ModelSignature((TensorSpec("v", "FP32", (-1,)),), (TensorSpec("n", "FP32", (1,)),), 1)
ROW_BYTES = 16
CAP = 4  # requests in flight of tenant "capped"
BYTES_CAP = 4 * ROW_BYTES  # input bytes in flight of tenant "bytes"

TENANTS = {
    "key-capped": Tenant("capped", 1.0, frozenset({"*"}), max_requests_in_flight=CAP),
    "key-bytes": Tenant("bytes", 1.0, frozenset({"*"}), max_bytes_in_flight=BYTES_CAP),
    "key-light": Tenant("light", 1.0, frozenset({"*"})),  # the default level only
    "key-light-granted": Tenant("light", 1.0, frozenset({"*"}), frozenset({1, 2})),
    "key-heavy": Tenant("heavy", 10.0, frozenset({"*"})),
    # Two maximum-size requests in flight at most.
    "key-flood": Tenant("flood", 1.0, frozenset({"*"}), max_bytes_in_flight=2 * MAX_BYTES),
}


class Directory:
    async def authenticate(self, api_key: str) -> Tenant | None:
        return TENANTS.get(api_key)


class GatedBackend:
    """y = x; batches wait for the gate, so requests stay in flight as long as a test needs."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        await self.gate.wait()
        await asyncio.sleep(0.002)
        return BatchResult({"y": inputs["x"].copy()}, 1000, "cpu", 1.0)


class SumBackend:
    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        await asyncio.sleep(0.005)  # a forward pass
        n = inputs["v"].sum(axis=1, keepdims=True, dtype=np.float32)
        return BatchResult({"n": n}, 1000, "cpu", 1.0)


@dataclass
class Admission:
    loop: LoopThread
    service: InferenceService
    doors: FrontDoors
    batcher: ModelBatcher
    backend: GatedBackend
    records: list[BatchRecord]
    big: ModelBatcher

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.doors.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.doors.grpc_port}"

    def open_gate(self) -> None:
        self.loop.loop.call_soon_threadsafe(self.backend.gate.set)

    def close_gate(self) -> None:
        self.loop.loop.call_soon_threadsafe(self.backend.gate.clear)

    def load(self, tenant: str) -> tuple[int, int]:
        got = self.loop.run(_load(self.service, tenant))
        return got.requests, got.bytes

    def wait_load(self, tenant: str, requests: int) -> None:
        deadline = time.monotonic() + 10
        while self.load(tenant)[0] != requests:
            assert time.monotonic() < deadline, (tenant, self.load(tenant), requests)
            time.sleep(0.01)

    def refusals(self, tenant: str, reason: str) -> float:
        return self.metric("gpugate_admission_refusals_total", tenant=tenant, reason=reason)

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metrics.registry.get_sample_value(name, labels) or 0.0


async def _load(service: InferenceService, tenant: str) -> Any:
    return service.tenant_load(tenant)


async def _start(loop: LoopThread, door: str) -> Admission:
    backend = GatedBackend()
    records: list[BatchRecord] = []
    batcher = ModelBatcher(
        "m",
        "1",
        backend,
        BatchPolicy(max_batch_size=10, max_queue_delay_s=0.0, max_in_flight=1),
        observer=records.append,
    )
    batcher.start()
    big = ModelBatcher("big", "1", SumBackend(), BatchPolicy(max_batch_size=1, max_in_flight=2))
    big.start()
    service = InferenceService(
        StaticModelTable([ServedModel("m", "1", SIG, batcher), ServedModel("big", "1", BIG, big)]),
        Directory(),
        RouterSettings(max_request_bytes=MAX_BYTES, default_timeout_s=20.0),
    )
    doors = FrontDoors(service, HOST, MAX_BYTES, grpc_server=door)
    await doors.start(0, 0)
    return Admission(loop, service, doors, batcher, backend, records, big)


async def _stop(a: Admission) -> None:
    a.backend.gate.set()
    await a.service.drain(5.0)
    await a.batcher.close(drain=True)
    await a.big.close(drain=True)
    await a.doors.stop(0.5)


@pytest.fixture(scope="module", params=DOORS)
def admission(loop_thread: LoopThread, request: pytest.FixtureRequest) -> Iterator[Admission]:
    if request.param == "native":
        require_native_door()
    a: Admission = loop_thread.run(_start(loop_thread, request.param))
    yield a
    loop_thread.run(_stop(a))


@pytest.fixture(autouse=True)
def gate_open_after(admission: Admission) -> Iterator[None]:
    yield
    admission.open_gate()


def x_rows(n: int) -> np.ndarray:
    return np.arange(n * 4, dtype=np.float32).reshape(n, 4)


def http_infer(url: str, key: str, rows: int = 1, **params: Any) -> httpx.Response:
    body = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": x_rows(rows).tolist()}
        ],
        "parameters": params,
    }
    with httpx.Client(base_url=f"http://{url}", timeout=30) as web:
        return web.post("/v2/models/m/infer", json=body, headers={"Authorization": f"Bearer {key}"})


def grpc_request(rows: int = 1, priority: int | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    request.raw_input_contents.append(x_rows(rows).tobytes())
    if priority is not None:
        request.parameters["priority"].int64_param = priority
    return request


def grpc_call(
    url: str, key: str, rows: int = 1, priority: int | None = None
) -> grpc.RpcError | Any:
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            return stub.ModelInfer(
                grpc_request(rows, priority),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=30,
            )
        except grpc.RpcError as exc:
            return exc


def hold(
    pool: concurrent.futures.Executor, n: int, call: Callable[[], Any]
) -> list[concurrent.futures.Future[Any]]:
    return [pool.submit(call) for _ in range(n)]


def test_the_request_cap_is_exact_on_both_protocols(admission: Admission) -> None:
    a = admission
    a.close_gate()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        held = hold(pool, 2, lambda: http_infer(a.http_url, "key-capped"))
        held += hold(pool, 2, lambda: grpc_call(a.grpc_url, "key-capped"))
        a.wait_load("capped", CAP)  # CAP at once are admitted

        over = http_infer(a.http_url, "key-capped")
        assert over.status_code == 429, over.text
        assert over.headers["retry-after"] == "1"
        assert over.json() == {"error": f"tenant 'capped' has {CAP} requests in flight, its limit"}

        refused = grpc_call(a.grpc_url, "key-capped")
        assert isinstance(refused, grpc.RpcError)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests in flight" in refused.details()
        trailers = dict(refused.trailing_metadata())
        assert trailers["retry-after"] == "1"
        assert trailers["grpc-retry-pushback-ms"] == "1000"

        # tritonclient sees the same refusal.
        client = grpcclient.InferenceServerClient(a.grpc_url)
        try:
            x = grpcclient.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(x_rows(1))
            with pytest.raises(InferenceServerException, match="requests in flight"):
                client.infer("m", [x], headers={"authorization": "Bearer key-capped"})
        finally:
            client.close()
        assert a.refusals("capped", "requests_in_flight") == 3

        a.open_gate()
        for future in held:
            got = future.result(30)
            if isinstance(got, httpx.Response):
                assert got.status_code == 200, got.text
            else:
                assert not isinstance(got, grpc.RpcError), got
    # Every exit gave its slot back: the full cap is there again.
    assert a.load("capped") == (0, 0)
    assert http_infer(a.http_url, "key-capped").status_code == 200


def test_a_refusal_for_load_is_held_within_a_bound_per_tenant(admission: Admission) -> None:
    """A gRPC call refused for load is answered after the service's refusal hold; past
    the tenant's bound of held answers, and within half a short deadline, at once."""
    a = admission
    pacing = a.service.refusals
    hold_s, max_per_tenant = pacing.hold_s, pacing.max_per_tenant
    bound = 6
    pacing.hold_s = 1.0  # long enough that every call below overlaps the held ones
    pacing.max_per_tenant = bound
    a.close_gate()
    try:
        with concurrent.futures.ThreadPoolExecutor(CAP + bound + 4) as pool:
            held = hold(pool, CAP, lambda: grpc_call(a.grpc_url, "key-capped"))
            a.wait_load("capped", CAP)

            def timed() -> tuple[float, Any]:
                started = time.monotonic()
                got = grpc_call(a.grpc_url, "key-capped")
                return time.monotonic() - started, got

            refusing = hold(pool, bound + 4, timed)
            deadline = time.monotonic() + 10
            while pacing.held("capped") < bound:
                assert time.monotonic() < deadline, pacing.held("capped")
                time.sleep(0.01)
            assert a.metric("gpugate_refusals_held") == bound  # the bound, and no more
            refused = [f.result(30) for f in refusing]
            assert all(
                isinstance(got, grpc.RpcError)
                and got.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                and dict(got.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
                for _, got in refused
            ), refused
            waits = sorted(took for took, _ in refused)
            assert all(took >= 1.0 for took in waits[-bound:]), waits  # held
            assert all(took < 1.0 for took in waits[:4]), waits  # past the bound: at once
            assert pacing.held("capped") == 0
            assert a.metric("gpugate_refusals_held") == 0

            # A deadline shorter than the hold: still the refusal, within half of it.
            with grpc.insecure_channel(a.grpc_url) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                md = (("authorization", "Bearer key-capped"),)
                with pytest.raises(grpc.RpcError) as short:
                    stub.ModelInfer(grpc_request(1), metadata=md, timeout=0.6)
            assert short.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            a.open_gate()
            assert all(not isinstance(f.result(30), grpc.RpcError) for f in held)
    finally:
        pacing.hold_s, pacing.max_per_tenant = hold_s, max_per_tenant
    assert a.load("capped") == (0, 0)


def test_the_byte_cap_is_exact_on_both_protocols(admission: Admission) -> None:
    a = admission
    a.close_gate()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(http_infer, a.http_url, "key-bytes", 3)
        a.wait_load("bytes", 1)
        assert a.load("bytes") == (1, 3 * ROW_BYTES)
        over = http_infer(a.http_url, "key-bytes", 2)
        assert over.status_code == 429 and over.headers["retry-after"] == "1", over.text
        assert (
            "48 input bytes in flight; 32 more would pass its limit of 64" in over.json()["error"]
        )
        refused = grpc_call(a.grpc_url, "key-bytes", 2)
        assert isinstance(refused, grpc.RpcError)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(refused.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
        last = pool.submit(grpc_call, a.grpc_url, "key-bytes", 1)  # exactly up to the cap
        a.wait_load("bytes", 2)
        assert a.load("bytes") == (2, BYTES_CAP)
        # One request larger than the whole cap can never pass: 413, no Retry-After.
        too_big = http_infer(a.http_url, "key-bytes", 5)
        assert too_big.status_code == 413 and "retry-after" not in too_big.headers
        a.open_gate()
        assert first.result(30).status_code == 200
        assert not isinstance(last.result(30), grpc.RpcError)
    assert a.load("bytes") == (0, 0)


def rows_by_tenant(records: list[BatchRecord], first_rows: int) -> dict[str, int]:
    """Rows each tenant got in the first ``first_rows`` rows served."""
    served: dict[str, int] = {}
    total = 0
    for record in records:
        if total >= first_rows:
            break
        for tenant, share in record.by_tenant.items():
            served[tenant] = served.get(tenant, 0) + share.rows
        total += record.rows
    return served


def contend(
    a: Admission, light_key: str, light_priority: int | None
) -> tuple[dict[str, int], list[Any]]:
    """Both tenants backlogged (20 requests of 10 rows each), then the gate opens;
    the rows each got in the first 110, and what the light tenant's requests got."""
    a.close_gate()
    a.records.clear()
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        # One batch goes out first and holds the single batch slot at the gate.
        plug = pool.submit(grpc_call, a.grpc_url, "key-heavy", 1)
        deadline = time.monotonic() + 10
        while a.batcher.queued_rows or a.load("heavy")[0] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        heavy = [pool.submit(grpc_call, a.grpc_url, "key-heavy", 10) for _ in range(20)]
        light = [
            pool.submit(grpc_call, a.grpc_url, light_key, 10, light_priority) for _ in range(20)
        ]
        light_answers = []
        # Wait until everything admitted is queued before the gate opens.
        while True:
            done_light = [f for f in light if f.done()]
            queued = a.batcher.queued_rows
            if queued + 10 * len(done_light) >= 400:
                break
            assert time.monotonic() < deadline + 10, queued
            time.sleep(0.01)
        a.open_gate()
        plug.result(30)
        for f in heavy:
            assert not isinstance(f.result(30), grpc.RpcError)
        light_answers = [f.result(30) for f in light]
    served = a.records[1:]  # past the plug
    return rows_by_tenant(served, 110), light_answers


def test_a_weight_1_tenant_cannot_take_a_weight_10_tenants_share_by_priority(
    admission: Admission,
) -> None:
    a = admission
    # At the default level: the fair share, about 10 rows for heavy per row for light.
    fair, answers = contend(a, "key-light", None)
    assert all(not isinstance(r, grpc.RpcError) for r in answers)
    assert fair["heavy"] >= 90, fair

    # Asking for level 1 without a grant: refused, and heavy's share is unchanged.
    refused, answers = contend(a, "key-light", 1)
    assert all(
        isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.PERMISSION_DENIED
        for r in answers
    )
    assert "may not use priority level 1" in answers[0].details()
    assert refused.get("heavy", 0) >= fair["heavy"]
    assert a.refusals("light", "priority") == 20
    over_http = http_infer(a.http_url, "key-light", 1, priority=1)
    assert over_http.status_code == 403
    assert over_http.json()["error"].startswith("tenant 'light' may not use priority level 1")

    # Granted, the level works, and is served first as its grant allows.
    granted, answers = contend(a, "key-light-granted", 1)
    assert all(not isinstance(r, grpc.RpcError) for r in answers)
    assert granted["light"] >= 100, granted


FLOOD_SCRIPT = """
import sys, time, threading
import grpc, numpy as np
from gpugate_proto import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
url, floats, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
request = pb.ModelInferRequest(model_name="big")
request.inputs.add(name="v", datatype="FP32", shape=[1, floats])
request.raw_input_contents.append(np.ones((1, floats), np.float32).tobytes())
payload = request.SerializeToString()
codes = {}
lock = threading.Lock()
def run():
    with grpc.insecure_channel(url, options=[("grpc.max_send_message_length", 1 << 24)]) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=None, response_deserializer=None)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                call(payload, metadata=(("authorization", "Bearer key-flood"),), timeout=30)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                codes[code] = codes.get(code, 0) + 1
threads = [threading.Thread(target=run) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(codes)
"""


def quiet_latencies(a: Admission, n: int) -> list[float]:
    with grpc.insecure_channel(a.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        md = (("authorization", "Bearer key-heavy"),)
        request = grpc_request(1)
        stub.ModelInfer(request, metadata=md, timeout=10)  # warm
        out = []
        for _ in range(n):
            started = time.perf_counter()
            stub.ModelInfer(request, metadata=md, timeout=10)
            out.append(time.perf_counter() - started)
            time.sleep(0.005)
        return out


def test_a_flood_of_max_size_requests_is_shed_by_the_byte_cap(admission: Admission) -> None:
    """The flooder (its own process, 8 connections of back-to-back maximum-size requests)
    never has more than its byte cap admitted; the rest is refused, each refusal held
    (server.grpc_refusal_hold_s) so the flooder cannot cycle refused 1 MiB messages
    through the gateway as fast as it sends them. Another tenant's p99 is measured quiet
    and under the flood, and must stay within 2x on the native door (the default). What
    remains of the cost is the admitted flood (within the byte cap, one copy each on the
    event loop) and the flooding process itself on the same cores; the grpcio door, which
    keeps one more copy, ends in an xfail with its figures when over 2x.
    docs/benchmarks.md has the profile and the history."""
    a = admission
    a.open_gate()
    quiet = float(np.percentile(quiet_latencies(a, 300), 99))
    floats = (MAX_BYTES - 4096) // 4  # the largest request the port takes
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD_SCRIPT, a.grpc_url, str(floats), "6"],
        stdout=subprocess.PIPE,
        text=True,
    )
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], a.load("flood")[1])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    try:
        deadline = time.monotonic() + 10
        while a.load("flood")[0] == 0:  # the flood has reached admission
            assert time.monotonic() < deadline
            time.sleep(0.01)
        watcher.start()
        loaded = float(np.percentile(quiet_latencies(a, 300), 99))
        out, _ = flood.communicate(timeout=60)
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    codes = ast.literal_eval(out.strip())  # the flooder's printout: {code: count}
    figures = f"quiet p99 {quiet * 1e3:.2f} ms, under flood {loaded * 1e3:.2f} ms, flood {codes}"
    print(figures)
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0, codes  # the byte cap shed the excess
    assert codes.get("OK", 0) > 0, codes
    assert 0 < peak[0] <= 2 * MAX_BYTES, peak
    if loaded > 2 * quiet and a.doors.grpc_server == "grpcio":
        # The portable door keeps one copy of each admitted message inside grpcio (15% of
        # the loop under this flood); on a quiet 2-core host it met the bound in every run,
        # worst 1.95x, with no margin left for a busy one (docs/benchmarks.md).
        pytest.xfail(f"grpcio door: p99 over 2x quiet: {figures}")
    assert loaded <= 2 * quiet, figures


def test_a_tenant_at_its_request_cap_is_refused_before_its_body_is_read(
    admission: Admission,
) -> None:
    """At the cap, an HTTP request declaring a 60 MiB body is answered 429 from its head
    alone: nothing of the body is sent, and none is waited for (no read, no parse)."""
    a = admission
    a.close_gate()
    host, port = a.http_url.removeprefix("http://").split(":")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        held = hold(pool, CAP, lambda: http_infer(a.http_url, "key-capped"))
        a.wait_load("capped", CAP)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v2/models/m/infer HTTP/1.1\r\nHost: g\r\n"
                b"Authorization: Bearer key-capped\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (60 * 2**20)
            )
            answer = b""
            while b"}" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
        assert b"retry-after: 1" in answer.lower()
        a.open_gate()
        assert all(f.result(30).status_code == 200 for f in held)
    assert a.load("capped") == (0, 0)
