"""The noisy-neighbour scenario's light tenant, as an application of its own.

``bench.py`` runs this once per phase (alone, then beside the heavy tenant): KServe
v2 ``ModelInfer`` over gRPC at a fixed rate (open loop, each request on its own
task), with the key in ``GPUGATE_LIGHT_KEY``, and prints one JSON line: the
:class:`loadgen.LevelResult` of the measured window. Latency counts from each
request's send time, however late its answer.

    GPUGATE_LIGHT_KEY=... python loadtests/light_tenant.py --system gpugate \\
        --target 127.0.0.1:51000 --row-file row.npy --rate 20 --warmup 2 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from kserve_client import _grpc_metadata, _grpc_request, grpc_sender
from loadgen import open_loop, summarize


async def run(args: argparse.Namespace) -> dict[str, object]:
    import grpc
    from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

    row = np.load(args.row_file)
    metadata = _grpc_metadata([os.environ["GPUGATE_LIGHT_KEY"]])[0]
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        send = grpc_sender(stub, _grpc_request(row), metadata)
        await channel.channel_ready()
        rec = await open_loop(send, args.rate, args.warmup, args.duration)
    return asdict(summarize(rec, args.system, "grpc", 0, args.duration))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--row-file", type=Path, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--warmup", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
