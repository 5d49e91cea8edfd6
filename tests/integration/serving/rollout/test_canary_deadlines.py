"""A tenant's short deadlines cannot roll a candidate back; the candidate's own errors
still do. Requests go over real sockets (HTTP and gRPC) through the router, whose
windows the real rollout controller analyses against the real database (SQLite and
PostgreSQL)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

from router.canary import bucket
from router.metrics import RouterMetrics
from router.model_table import LiveModelTable
from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings, ServedModel
from router.types import Tenant
from scheduler import BatchPolicy, BatchResult, ModelBatcher, Share, Tensors
from serving.rollout.controller import RolloutController
from serving.rollout.rollouts import Rollouts, RolloutSpec
from tests.integration.router.helpers import HOST, LoopThread
from tests.integration.serving.rollout.test_rollouts import SIG, store  # noqa: F401

SALT = "fixed-salt"
HEADER = "x-user"
CANDIDATE_DELAY_S = 0.2  # longer than the attacker's deadlines, shorter than the floor


class Backend:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.fail = False
        self.gate = asyncio.Event()  # batches start only while it is set
        self.gate.set()
        self.running = 0

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        self.running += 1
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("candidate broke")
        y = np.zeros((len(inputs["pixels"]), 10), np.float32)
        return BatchResult({"y": y}, 1000, "cpu", 1.0)


class Directory:
    async def authenticate(self, api_key: str) -> Tenant | None:
        return Tenant("tenant", 1.0, frozenset({"*"})) if api_key == "key" else None


@dataclass
class Gateway:
    loop: LoopThread
    service: InferenceService
    doors: FrontDoors
    batchers: list[ModelBatcher]
    candidate: Backend
    controller: RolloutController


def users(to_candidate: bool, weight: float, n: int) -> list[str]:
    """Sticky header values that the rollout sends to the candidate (or not)."""
    found = []
    i = 0
    while len(found) < n:
        value = f"user-{i}"
        if (bucket(SALT, f"header:{value}") < weight) == to_candidate:
            found.append(value)
        i += 1
    return found


async def _start(loop: LoopThread, rollouts: Rollouts, candidate: str) -> Gateway:
    batchers = []
    served = []
    cand = Backend(CANDIDATE_DELAY_S)
    for version, backend in (("1", Backend(0.002)), (candidate, cand)):
        batcher = ModelBatcher(
            "digits", version, backend, BatchPolicy(max_batch_size=8, max_in_flight=2)
        )
        batcher.start()
        batchers.append(batcher)
        served.append(ServedModel("digits", version, SIG, batcher))
    table = LiveModelTable()
    table.swap([served[0]], [served[1]])
    service = InferenceService(table, Directory(), RouterSettings(default_timeout_s=10.0))
    doors = FrontDoors(service, HOST, 1 << 20, grpc_server="grpcio")
    await doors.start(0, 0)
    controller = RolloutController(rollouts, table, service.windows, RouterMetrics(None))
    await controller.tick()
    return Gateway(loop, service, doors, batchers, cand, controller)


async def _stop(gw: Gateway) -> None:
    await gw.service.drain(5.0)
    for batcher in gw.batchers:
        await batcher.close(drain=True)
    await gw.doors.stop(0.5)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    lt.start()
    yield lt
    lt.stop()


def pixels() -> list[float]:
    return [0.5] * 64


def http_call(gw: Gateway, user: str, timeout_us: int | None = None) -> int:
    params = {"timeout": timeout_us} if timeout_us else {}
    body = {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": pixels()}],
        "parameters": params,
    }
    headers = {"Authorization": "Bearer key", HEADER: user}
    url = f"http://{HOST}:{gw.doors.http_port}/v2/models/digits/infer"
    return httpx.post(url, json=body, headers=headers, timeout=30).status_code


def grpc_call(gw: Gateway, user: str, timeout_s: float) -> grpc.StatusCode:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.full((1, 64), 0.5, np.float32).tobytes())
    with grpc.insecure_channel(f"{HOST}:{gw.doors.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(
                request,
                metadata=(("authorization", "Bearer key"), (HEADER, user)),
                timeout=timeout_s,
            )
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def traffic(gw: Gateway, calls: list[tuple[Any, ...]]) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda c: c[0](gw, *c[1:]), calls))


def analyse(gw: Gateway, rollouts: Rollouts) -> Any:
    async def due() -> None:
        for tracked in gw.controller._tracked.values():
            tracked.due = 0.0
        await gw.controller.tick()
        # A verdict that moved the rollout opens the next window on the following pass.
        await gw.controller.tick()

    gw.loop.run(due())
    return rollouts.get("digits")


SPEC = {
    "steps": (10, 50, 100),
    "interval_s": 3600,  # analyses run when the test says
    "min_requests": 20,
    "max_error_rate": 0.05,
    "max_p99_ratio": 10_000,  # latency is not what this test is about
    "failure_threshold": 1,
    "sticky": f"header:{HEADER}",
    "salt": SALT,
}


def test_short_client_deadlines_on_the_candidate_do_not_roll_it_back(
    store: Rollouts,  # noqa: F811
    loop: LoopThread,
) -> None:
    store.start("carol", "digits", "2", RolloutSpec(**SPEC))
    gw: Gateway = loop.run(_start(loop, store, "2"))
    try:
        attacker = users(True, 0.1, 1)[0]  # one sticky key that lands on the candidate
        on_candidate = users(True, 0.1, 24)
        on_production = users(False, 0.1, 24)
        calls: list[tuple[Any, ...]] = [(http_call, u) for u in on_candidate + on_production]
        # The attacker's deadlines (50 ms, 20 ms) expire at the candidate (200 ms a batch).
        calls += [(http_call, attacker, 50_000)] * 30
        calls += [(grpc_call, attacker, 0.02)] * 30
        codes = traffic(gw, calls)
        assert codes.count(504) == 30, codes
        assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 30
        assert codes.count(200) == 48
        ro = analyse(gw, store)
        figures = ro.last_analysis
        assert (ro.state, ro.step, ro.failures) == ("running", 1, 0), figures
        cand = figures["candidate"]
        assert cand["errors"] == 0 and cand["requests"] >= 24, cand
        assert cand["short_deadline_expiries"] >= 30, cand  # seen, and not counted

        # The candidate's own errors still roll it back.
        gw.candidate.fail = True
        codes = traffic(gw, [(http_call, u) for u in users(True, 0.5, 24) + on_production])
        assert codes.count(500) >= 24, codes
        ro = analyse(gw, store)
        assert ro.state == "failed", ro.last_analysis
        assert ro.last_analysis["candidate"]["errors"] >= 24
    finally:
        loop.run(_stop(gw))


def test_a_deadline_at_least_the_floor_is_the_candidates_error(
    store: Rollouts,  # noqa: F811
    loop: LoopThread,
) -> None:
    # A floor below the candidate's latency: its expiries are its own slowness.
    store.start("carol", "digits", "2", RolloutSpec(**SPEC, min_deadline_ms=100))
    gw: Gateway = loop.run(_start(loop, store, "2"))
    try:
        slow_users = users(True, 0.1, 24)
        calls: list[tuple[Any, ...]] = [(http_call, u, 150_000) for u in slow_users]
        calls += [(http_call, u) for u in users(False, 0.1, 24)]
        codes = traffic(gw, calls)
        assert codes.count(504) >= 20, codes
        ro = analyse(gw, store)
        assert ro.state == "failed", ro.last_analysis
        assert ro.last_analysis["candidate"]["short_deadline_expiries"] == 0
    finally:
        loop.run(_stop(gw))


def test_deadlines_that_expire_in_the_queue_do_not_roll_it_back(
    store: Rollouts,  # noqa: F811
    loop: LoopThread,
) -> None:
    """A tenant pinned to the candidate floods its own sub-queue with deadlines at the
    floor: they expire before the candidate runs them, which says nothing about it."""
    store.start("carol", "digits", "2", RolloutSpec(**SPEC))
    gw: Gateway = loop.run(_start(loop, store, "2"))
    try:
        on_candidate = users(True, 0.1, 24)
        attacker = on_candidate[0]
        gw.loop.loop.call_soon_threadsafe(gw.candidate.gate.clear)
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            # Long deadlines first: they take both of the candidate's batches in flight.
            held = [pool.submit(http_call, gw, u) for u in on_candidate[:16]]
            deadline = time.monotonic() + 10
            while gw.candidate.running < 2:
                assert time.monotonic() < deadline, gw.candidate.running
                time.sleep(0.01)
            # 1 s, the floor: they wait behind the held batches and expire in the queue.
            flood = [pool.submit(http_call, gw, attacker, 1_000_000) for _ in range(40)]
            assert [f.result(30) for f in flood] == [504] * 40
            gw.loop.loop.call_soon_threadsafe(gw.candidate.gate.set)
            assert [f.result(30) for f in held] == [200] * 16
        rest = on_candidate[16:] + users(False, 0.1, 24)
        codes = traffic(gw, [(http_call, u) for u in rest])
        assert codes == [200] * 32, codes
        ro = analyse(gw, store)
        figures = ro.last_analysis
        assert (ro.state, ro.step, ro.failures) == ("running", 1, 0), (ro.state, figures)
        cand = figures["candidate"]
        assert (cand["requests"], cand["errors"]) == (24, 0), cand
        assert cand["queue_expiries"] == 40, cand  # seen, and not counted
        assert cand["short_deadline_expiries"] == 0, cand
    finally:
        loop.run(_stop(gw))
