"""What rate quotas add to a request at c=1: the router's real front doors and service,
in process, with an echo model, and two tenants that differ only in their quotas.

``plain`` has none; ``quota`` has a request and a rows quota over every model and both
for the model too (every bucket a request can meet), set high enough never to refuse.
Rounds alternate between them (A B A B ...) on one keep-alive connection each, over HTTP
and gRPC, so drift on the host weighs on both alike; the figures are the medians and
p99s over all rounds and the difference of the medians.

    .venv/bin/python loadtests/quota_overhead.py [--requests 2000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable, Sequence

import grpc
import numpy as np
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

from router.metrics import RouterMetrics
from router.model_table import LiveModelTable
from router.quota import Quotas
from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings, ServedModel
from router.types import ModelSignature, Quota, Rate, Tenant, TensorSpec
from scheduler import BatchPolicy, BatchResult, ModelBatcher, Share, Tensors

SIG = ModelSignature((TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (4,)),), 8)
HIGH = Rate(1e9, 1e9)
TENANTS = {
    "key-plain": Tenant("plain", 1.0, frozenset({"*"})),
    "key-quota": Tenant(
        "quota",
        1.0,
        frozenset({"*"}),
        quota=Quota(HIGH, HIGH),
        model_quotas=(("echo", Quota(HIGH, HIGH)),),
    ),
}


class Directory:
    async def authenticate(self, api_key: str) -> Tenant | None:
        return TENANTS.get(api_key)


class Echo:
    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        return BatchResult({"y": inputs["x"]}, 1000, "cpu", 1.0)


def _serve(ready: threading.Event, box: dict[str, object]) -> None:
    async def main() -> None:
        batcher = ModelBatcher("echo", "1", Echo(), BatchPolicy(max_batch_size=8))
        batcher.start()
        table = LiveModelTable()
        table.swap([ServedModel("echo", "1", SIG, batcher)])
        service = InferenceService(table, Directory(), RouterSettings())
        doors = FrontDoors(service, "127.0.0.1", 1 << 20)
        await doors.start(0, 0)
        box["doors"], box["loop"] = doors, asyncio.get_running_loop()
        box["stop"] = asyncio.Event()
        ready.set()
        await box["stop"].wait()  # type: ignore[attr-defined]
        await doors.stop(0.5)
        await batcher.close()

    asyncio.run(main())


def http_round(port: int, key: str, n: int) -> list[float]:
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    )
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", "/v2/models/echo/infer", body, headers)
            resp = conn.getresponse()
            resp.read()
            times.append(time.perf_counter() - t0)
            assert resp.status == 200, resp.status
    finally:
        conn.close()
    return times


def grpc_round(port: int, key: str, n: int) -> list[float]:
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    metadata = (("authorization", f"Bearer {key}"),)
    times = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(n):
            t0 = time.perf_counter()
            stub.ModelInfer(request, metadata=metadata, timeout=10)
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per tenant and protocol")
    args = parser.parse_args(argv)
    ready, box = threading.Event(), {}
    server = threading.Thread(target=_serve, args=(ready, box), daemon=True)
    server.start()
    assert ready.wait(30)
    doors: FrontDoors = box["doors"]  # type: ignore[assignment]
    protocols: dict[str, tuple[int, Callable[[int, str, int], list[float]]]] = {
        "http": (doors.http_port, http_round),
        "grpc": (doors.grpc_port, grpc_round),
    }
    print(
        f"rate quota overhead at c=1 -- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{args.rounds} alternating rounds of {args.requests} requests per tenant"
    )
    for name, (port, run) in protocols.items():
        run(port, "key-plain", 200)  # warm
        times: dict[str, list[float]] = {"plain": [], "quota": []}
        for _ in range(args.rounds):
            for tenant in ("plain", "quota"):
                times[tenant] += run(port, f"key-{tenant}", args.requests)
        med = {t: statistics.median(v) * 1e6 for t, v in times.items()}
        p99 = {t: float(np.percentile(v, 99)) * 1e6 for t, v in times.items()}
        print(
            f"{name:<5} median plain {med['plain']:.1f} us, quota {med['quota']:.1f} us "
            f"(+{med['quota'] - med['plain']:.1f} us); p99 plain {p99['plain']:.1f} us, "
            f"quota {p99['quota']:.1f} us"
        )
    # The checks alone, without the doors' noise: the four buckets one request meets.
    quotas = Quotas(RouterMetrics(None))
    tenant = TENANTS["key-quota"]
    own = tenant.quota_of("echo")

    def checks() -> None:
        quotas.take("quota", "", "requests", tenant.quota.requests, 1)
        quotas.take("quota", "echo", "requests", own.requests, 1)
        quotas.take("quota", "", "rows", tenant.quota.rows, 1)
        quotas.take("quota", "echo", "rows", own.rows, 1)

    n = 200_000
    best = min(timeit.repeat(checks, number=n, repeat=5)) / n * 1e6
    print(f"the quota checks of one request alone: {best:.2f} us (best of 5 x {n:,})")
    loop: asyncio.AbstractEventLoop = box["loop"]  # type: ignore[assignment]
    loop.call_soon_threadsafe(box["stop"].set)  # type: ignore[attr-defined]
    server.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
