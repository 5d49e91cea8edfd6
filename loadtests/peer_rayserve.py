"""Plain Ray Serve peer for the side-by-side benchmark (``loadtests/bench.py``).

What a Ray Serve user would write without gpugate: Serve's own gRPC proxy with
the KServe v2 servicer registered, and one deployment whose ``ModelInfer``
decodes the request and feeds ``@serve.batch``, which runs the same BenchMLP
(same safetensors weights, :class:`serving.replica.ModelRunner`, 1 torch thread,
``num_cpus=1``) on up to ``--max-batch-size`` rows.

Run by bench.py as a subprocess; prints one line starting ``rayserve-peer ready``
when the application is running and exits 0 after SIGTERM/SIGINT (Serve and Ray
shut down).

    python loadtests/peer_rayserve.py --state-dir DIR --grpc-port 51000 --http-port 51001
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

APP_NAME = "bench-peer"
DEPLOYMENT_NAME = "bench-peer-model"
SERVICER = "gpugate_proto.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"


class BenchPeer:
    """KServe v2 ``ModelInfer`` over Serve's gRPC proxy, batched with ``@serve.batch``."""

    def __init__(
        self,
        model: dict[str, Any],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        forward_in_thread: bool,
    ) -> None:
        from serving.config import ModelConfig
        from serving.replica import ModelRunner

        self.config = ModelConfig.model_validate(model)
        self.runner = ModelRunner(self.config, num_threads=1)
        self.runner.warmup()
        self.forward_in_thread = forward_in_thread
        self.input_name = self.config.inputs[0].name
        self.input_dtype = self.runner.signature.inputs[0].dtype
        self.row_shape = tuple(self.config.inputs[0].shape)
        self.batched.set_max_batch_size(max_batch_size)
        self.batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = 0
        self.rows = 0

    async def __call__(self, request: Any) -> Any:
        """HTTP GET on the app's route: batches and rows run so far (for bench.py)."""
        from starlette.responses import JSONResponse

        return JSONResponse({"batches": self.batches, "rows": self.rows})

    async def ModelInfer(self, request: Any) -> Any:
        # Decoded before batching, so a bad request fails alone, not its whole batch.
        return await self.batched(request, self._decode(request))

    async def ServerLive(self, request: Any) -> Any:
        from gpugate_proto import grpc_service_pb2 as pb

        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any) -> Any:
        from gpugate_proto import grpc_service_pb2 as pb

        return pb.ServerReadyResponse(ready=True)

    def _decode(self, request: Any) -> Any:
        if len(request.inputs) != 1 or len(request.raw_input_contents) != 1:
            raise ValueError("expected one input sent as raw_input_contents")
        tensor = request.inputs[0]
        if tensor.name != self.input_name or tensor.datatype != "FP32":
            raise ValueError(f"expected FP32 input {self.input_name!r}")
        shape = tuple(tensor.shape)
        if len(shape) != 1 + len(self.row_shape) or shape[1:] != self.row_shape:
            raise ValueError(f"input shape {list(shape)} is not [rows, {self.row_shape}]")
        return np.frombuffer(request.raw_input_contents[0], dtype=self.input_dtype).reshape(shape)

    # The limits set here are replaced per replica in __init__ from the command line.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)  # type: ignore[untyped-decorator]
    async def batched(self, requests: list[Any], arrays: list[Any]) -> list[Any]:
        from gpugate_proto import grpc_service_pb2 as pb

        batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        self.batches += 1
        self.rows += batch.shape[0]
        if self.forward_in_thread:
            outputs, _ = await asyncio.to_thread(self.runner.run, {self.input_name: batch})
        else:
            outputs, _ = self.runner.run({self.input_name: batch})
        responses = []
        start = 0
        for request, array in zip(requests, arrays, strict=True):
            rows = array.shape[0]
            response = pb.ModelInferResponse(
                model_name=request.model_name or self.config.name,
                model_version=self.config.version,
                id=request.id,
            )
            for name, out in outputs.items():
                part = out[start : start + rows]
                response.outputs.add(name=name, datatype="FP32", shape=part.shape)
                response.raw_output_contents.append(part.tobytes())
            responses.append(response)
            start += rows
        return responses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="where the weights live")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True, help="Serve's HTTP proxy (unused)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP proxy bind address")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    parser.add_argument("--max-ongoing-requests", type=int, default=256)
    parser.add_argument(
        "--forward",
        choices=("thread", "inline"),
        default="thread",
        help="run the forward in a worker thread (default; the replica's event loop keeps "
        "accepting requests) or inline on the event loop",
    )
    parser.add_argument(
        "--access-log",
        choices=("on", "off"),
        default="on",
        help="Serve's per-request access log in the proxy and replica (default on, as Serve "
        "ships; off is LoggingConfig(enable_access_log=False))",
    )
    parser.add_argument("--deploy-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Same footing as gpugate, which starts its local Ray with workers at nice 0.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import LoggingConfig

    from serving.demo import bench_model_config

    model = bench_model_config(args.state_dir, max_batch_size=args.max_batch_size)

    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging_config = LoggingConfig(enable_access_log=args.access_log == "on")
    try:
        serve.start(
            logging_config=logging_config,
            proxy_location="HeadOnly",
            http_options={"host": args.host, "port": args.http_port},
            grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[SERVICER]),
        )
        app = (
            serve.deployment(BenchPeer)
            .options(
                name=DEPLOYMENT_NAME,
                num_replicas=1,
                # Requests must reach @serve.batch rather than queue in the proxy.
                max_ongoing_requests=args.max_ongoing_requests,
                ray_actor_options={"num_cpus": 1},
                logging_config=logging_config,
            )
            .bind(
                model.model_dump(mode="json"),
                args.max_batch_size,
                args.batch_wait_ms / 1000,
                args.forward == "thread",
            )
        )
        serve.run(app, name=APP_NAME, route_prefix="/bench", blocking=False)
        deadline = time.monotonic() + args.deploy_timeout
        while True:
            status = serve.status().applications.get(APP_NAME)
            state = str(status.status) if status else "NOT_STARTED"
            if state.endswith("RUNNING"):
                break
            if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
                print(f"rayserve-peer: deploy failed: {status and status.message}", flush=True)
                return 1
            if time.monotonic() > deadline or stop.is_set():
                print(f"rayserve-peer: not running after deploy timeout: {state}", flush=True)
                return 1
            time.sleep(0.2)
        print(
            f"rayserve-peer ready grpc=127.0.0.1:{args.grpc_port} "
            f"http={args.host}:{args.http_port} app={APP_NAME} "
            f"max_batch_size={args.max_batch_size} batch_wait_ms={args.batch_wait_ms:g} "
            f"forward={args.forward} access_log={args.access_log}",
            flush=True,
        )
        stop.wait()
        print("rayserve-peer stopping", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    print("rayserve-peer stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
