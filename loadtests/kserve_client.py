"""KServe v2 clients of the bench model: request encoders, response decoders and drivers.

One row per request, input "x" FP32 [1, 256] and output "y" FP32 [1, 128]:

* gRPC: ``ModelInfer`` with ``raw_input_contents`` over ``grpc.aio``, a pool of
  channels (``LoadPlan.grpc_channels``, each its own HTTP/2 connection) for the
  whole run, the workers spread over them (:func:`grpc_channel_pool`);
* HTTP/REST: the binary-tensor form (``Inference-Header-Content-Length``) over
  aiohttp, one keep-alive connection per worker.

Each has a probe (one request, retried until the server answers, whose output is
compared with the in-process forward) and a driver that runs every concurrency
level of a :class:`loadgen.LoadPlan` through :func:`loadgen.measure_level`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from loadgen import (
    BatchCounter,
    LevelResult,
    LoadPlan,
    Meters,
    NoisyResult,
    SendFn,
    measure_level,
    noisy_neighbour,
)

MODEL_NAME = "bench"
MODEL_VERSION = "1"
PEER_APP = "bench-peer"
REQUEST_TIMEOUT_S = 30.0
OUTPUT_BYTES = 128 * 4  # "y": 128 FP32 values for the one row
LIGHT_SCRIPT = Path(__file__).resolve().parent / "light_tenant.py"


# ------------------------------------------------------------------------ gRPC

# A channel of its own connection. grpc.aio channels to one target with the same
# arguments share their subchannel, so their TCP connection, through gRPC core's
# global subchannel pool: eight plain channels are still one connection.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@contextlib.asynccontextmanager
async def grpc_channel_pool(target: str, size: int) -> AsyncIterator[list[Any]]:
    """``size`` channels to ``target``, each on its own TCP connection (opened lazily,
    at its first call).

    Why a pool: a gateway that runs several replicas on one node shares its port with
    SO_REUSEPORT, and the kernel picks a replica per connection, never per call, so
    one channel would pin all of a load generator's calls to one gateway. Every system
    is driven through the same pool, so a comparison between them stays fair; a real
    fleet of clients (or a load balancer) opens many connections too."""
    import grpc

    channels = [grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(size)]
    try:
        yield channels
    finally:
        for channel in channels:
            await channel.close()


def channel_of(index: int, tenants: int, channels: int) -> int:
    """The pool channel of worker ``index``, whose key is ``index % tenants``: consecutive
    workers of the tenants share a channel, so every channel carries every tenant (with
    ``index % channels`` a channel would carry one tenant only whenever ``tenants``
    divides ``channels``, and its gateway would batch that tenant alone)."""
    return (index // tenants) % channels


def _grpc_request(row: np.ndarray) -> Any:
    from gpugate_proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL_NAME, model_version=MODEL_VERSION)
    request.inputs.add(name="x", datatype="FP32", shape=list(row.shape))
    request.raw_input_contents.append(np.ascontiguousarray(row, dtype=np.float32).tobytes())
    return request


def _grpc_metadata(keys: list[str]) -> list[tuple[tuple[str, str], ...]]:
    # `application` picks the Serve app on Serve's proxy; gpugate ignores it. The
    # bearer key is ignored by the peer. Same metadata for both systems.
    return [(("authorization", f"Bearer {k}"), ("application", PEER_APP)) for k in keys]


def _decode_grpc_output(response: Any) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(
        tuple(response.outputs[0].shape)
    )


async def grpc_probe(target: str, keys: list[str], row: np.ndarray, timeout_s: float) -> np.ndarray:
    """Retry one request until it succeeds (the proxy may lag the app by a moment)."""
    import grpc
    from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

    request = _grpc_request(row)
    metadata = _grpc_metadata(keys)[0]
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                response = await stub.ModelInfer(request, metadata=metadata, timeout=10)
                return _decode_grpc_output(response)
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gRPC probe of {target} failed: {exc.details()}") from exc
                await asyncio.sleep(0.5)


async def grpc_levels(
    system: str, target: str, plan: LoadPlan, meters: Meters | None = None
) -> list[LevelResult]:
    from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

    request = _grpc_request(plan.row)
    metadata = _grpc_metadata(plan.keys)
    results = []
    # One pool for the whole run: its connections stay open from level to level.
    async with grpc_channel_pool(target, plan.grpc_channels) as channels:
        senders = [
            [grpc_sender(pb_grpc.GRPCInferenceServiceStub(c), request, md) for c in channels]
            for md in metadata
        ]

        async def send(index: int) -> str | None:
            tenant = index % len(metadata)
            return await senders[tenant][channel_of(index, len(metadata), len(channels))](index)

        for concurrency in plan.levels:
            results.append(await measure_level(send, system, "grpc", concurrency, plan, meters))
    return results


def grpc_sender(stub: Any, request: Any, metadata: Any) -> SendFn:
    """One KServe v2 ``ModelInfer`` per call; None on success, else a short error."""
    import grpc

    async def send(index: int) -> str | None:
        try:
            response = await stub.ModelInfer(request, metadata=metadata, timeout=REQUEST_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        raw = response.raw_output_contents
        if len(raw) != 1 or len(raw[0]) != OUTPUT_BYTES:
            return "bad response: wrong output size"
        return None

    return send


async def light_tenant_process(
    system: str, target: str, key: str, row_file: Path, rate: float, plan: LoadPlan
) -> LevelResult:
    """One phase of the light tenant, run by ``light_tenant.py`` in a process of its own:
    a separate application, so it does not queue behind the heavy tenant's requests in
    this process's event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(LIGHT_SCRIPT),
        "--system",
        system,
        "--target",
        target,
        "--row-file",
        str(row_file),
        "--rate",
        str(rate),
        "--warmup",
        str(plan.warmup_s),
        "--duration",
        str(plan.duration_s),
        env={**os.environ, "GPUGATE_LIGHT_KEY": key},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"light tenant failed ({proc.returncode}): {err.decode()[-2000:]}")
    return LevelResult(**json.loads(out.decode().strip().splitlines()[-1]))


async def grpc_noisy(
    system: str,
    target: str,
    plan: LoadPlan,
    row_file: Path,
    light_rate: float,
    heavy_concurrency: int,
    light_inside: BatchCounter | None = None,
) -> NoisyResult:
    """The noisy-neighbour scenario over gRPC: the light tenant sends with the first key
    from its own process; the heavy one with the second key from this process.
    ``light_inside`` (gpugate): the light tenant's (count, sum) of time inside the server,
    read around each light phase for its mean."""
    from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

    inside_ms: list[float | None] = []

    async def light() -> LevelResult:
        # A blocking HTTP read: off this loop, which the heavy tenant's calls share.
        before = await asyncio.to_thread(light_inside) if light_inside else None
        result = await light_tenant_process(
            system, target, plan.keys[0], row_file, light_rate, plan
        )
        after = await asyncio.to_thread(light_inside) if light_inside else None
        if before and after and after[0] > before[0]:
            inside_ms.append((after[1] - before[1]) / (after[0] - before[0]) * 1e3)
        else:
            inside_ms.append(None)
        return result

    heavy_meta = _grpc_metadata(plan.keys)[1]
    # The heavy tenant through the same pool as the levels (the light tenant is one
    # application with one connection, light_tenant.py).
    async with grpc_channel_pool(target, plan.grpc_channels) as channels:
        heavy_senders = [
            grpc_sender(pb_grpc.GRPCInferenceServiceStub(c), _grpc_request(plan.row), heavy_meta)
            for c in channels
        ]

        async def send_heavy(index: int) -> str | None:
            return await heavy_senders[index % len(heavy_senders)](index)

        result = await noisy_neighbour(
            light, send_heavy, system, "grpc", light_rate, heavy_concurrency, plan
        )
    result.light_inside_alone_ms, result.light_inside_beside_ms = inside_ms
    return result


# ------------------------------------------------------------------------ HTTP


def _infer_url(base: str) -> str:
    return f"{base}/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/infer"


def _http_body(row: np.ndarray) -> tuple[bytes, int]:
    raw = np.ascontiguousarray(row, dtype=np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": list(row.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    return header + raw, len(header)


def _decode_http_output(body: bytes, header_length: str | None) -> np.ndarray:
    if header_length is None:
        head = json.loads(body)
        return np.asarray(head["outputs"][0]["data"], dtype=np.float32).reshape(
            head["outputs"][0]["shape"]
        )
    n = int(header_length)
    head = json.loads(body[:n])
    return np.frombuffer(body[n:], dtype=np.float32).reshape(head["outputs"][0]["shape"])


def _http_headers(keys: list[str], header_length: int) -> list[dict[str, str]]:
    return [
        {
            "Authorization": f"Bearer {k}",
            "Inference-Header-Content-Length": str(header_length),
            "Content-Type": "application/octet-stream",
        }
        for k in keys
    ]


async def http_probe(base: str, keys: list[str], row: np.ndarray, timeout_s: float) -> np.ndarray:
    import aiohttp

    body, header_length = _http_body(row)
    headers = _http_headers(keys, header_length)[0]
    url = _infer_url(base)
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    payload = await resp.read()
                    if resp.status == 200:
                        return _decode_http_output(
                            payload, resp.headers.get("Inference-Header-Content-Length")
                        )
                    problem = f"HTTP {resp.status}: {payload[:200]!r}"
            except aiohttp.ClientError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"HTTP probe of {url} failed: {problem}")
            await asyncio.sleep(0.5)


async def http_levels(
    system: str, base: str, plan: LoadPlan, meters: Meters | None = None
) -> list[LevelResult]:
    import aiohttp

    body, header_length = _http_body(plan.row)
    headers = _http_headers(plan.keys, header_length)
    url = _infer_url(base)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    results = []
    for concurrency in plan.levels:
        # Keep-alive connections, one per worker; opened during the warm-up.
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def send(index: int, session: Any = session) -> str | None:
                async with session.post(
                    url, data=body, headers=headers[index % len(headers)]
                ) as resp:
                    payload = await resp.read()
                    if resp.status != 200:
                        return f"HTTP {resp.status}: {payload[:200]!r}"
                    n = resp.headers.get("Inference-Header-Content-Length")
                    if n is None or len(payload) - int(n) != OUTPUT_BYTES:
                        return "bad response: wrong output size"
                    return None

            results.append(await measure_level(send, system, "http", concurrency, plan, meters))
    return results
