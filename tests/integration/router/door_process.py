"""The router's front doors alone in a process, so a test can measure that process's memory.

``python -m tests.integration.router.door_process DOOR MAX_BYTES`` serves the main
stack's ``affine`` model (tests/integration/router/helpers.py) on free ports with gRPC
door DOOR and message limit MAX_BYTES, prints ``ports HTTP GRPC`` once serving, and
stops when its stdin closes.
"""

from __future__ import annotations

import asyncio
import sys

from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings, ServedModel
from scheduler import BatchPolicy, ModelBatcher
from tests.fakes import StaticModelTable
from tests.integration.router.helpers import AFFINE_SIGNATURE, HOST, AffineBackend, Directory


async def main(door: str, max_bytes: int) -> None:
    batcher = ModelBatcher("affine", "2", AffineBackend(2), BatchPolicy(max_batch_size=64))
    batcher.start()
    service = InferenceService(
        StaticModelTable([ServedModel("affine", "2", AFFINE_SIGNATURE, batcher)]),
        Directory(),
        RouterSettings(max_request_bytes=max_bytes, default_timeout_s=30.0),
    )
    doors = FrontDoors(service, HOST, max_bytes, grpc_server=door)
    await doors.start(0, 0)
    print(f"ports {doors.http_port} {doors.grpc_port}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    await doors.stop(0.5)
    await batcher.close(drain=False)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
