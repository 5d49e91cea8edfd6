"""A KServe v2 gRPC server that runs no model: the load generator's ceiling.

``bench.py`` drives it like the real systems so the table shows how many
requests per second the client side (and one Python grpc.aio server) can do on
this machine at all. ``ModelInfer`` answers every request with one FP32 output
of zeros shaped like the bench model's ("y", [rows, 128]). Prints one line
starting ``null-server ready``; exits 0 on SIGTERM/SIGINT.

    python loadtests/null_server.py --grpc-port 51000
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import grpc
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

OUT_NAME = "y"
OUT_WIDTH = 128


class NullServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        response.outputs.add(name=OUT_NAME, datatype="FP32", shape=[rows, OUT_WIDTH])
        response.raw_output_contents.append(bytes(4 * OUT_WIDTH * rows))
        return response


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(NullServicer(), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"null-server ready grpc={host}:{port}", flush=True)
    await stop.wait()
    await server.stop(grace=5)
    print("null-server stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.grpc_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
