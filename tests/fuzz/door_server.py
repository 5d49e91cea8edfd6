"""The router's main test stack on the native gRPC door, as a process of its own.

``python -m tests.fuzz.door_server`` serves the models and tenants of
tests/integration/router (affine, slow, vec, broken, misfit; key ``key-alice``) on
127.0.0.1, ephemeral ports, and prints one JSON line: ``{"grpc_port": ..,
"http_port": ..}``. On SIGTERM or SIGINT it waits until every call has ended and the
door has freed every call object (only its outstanding accepts remain), drains and
stops, prints ``{"stopped": true, "calls_taken": .., "calls_left": .., "loop_errors":
[..]}`` (calls handed to the service, call objects still alive, the errors the event
loop reported, such as an exception in the door's callback) and exits 0.

Under ``make fuzz-native`` it runs with the sanitizer build of the door
(``GPUGATE_TEST_GRPCDOOR_DIR``) and the sanitizer runtime preloaded, so that the frame
fuzz (tests/fuzz/h2_frames.py) hits instrumented code.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Any

from router.native_server import DEFAULT_ACCEPTS, NativeServer
from tests.integration.router.helpers import main_models, start_stack, stop_stack
from tests.integration.router.native_door import use_door_from_environment

# How long a stop waits for the calls of connections the client has gone from.
_SETTLE_S = 30.0


async def serve() -> int:
    door_file = use_door_from_environment()
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []

    def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        loop_errors.append(f"{context.get('message')}: {context.get('exception')!r}")
        loop.default_exception_handler(context)

    loop.set_exception_handler(record)
    stack = await start_stack(main_models(), "native")
    door = stack.doors._door
    assert isinstance(door, NativeServer)
    print(
        json.dumps(
            {
                "grpc_port": stack.doors.grpc_port,
                "http_port": stack.doors.http_port,
                "door": str(door_file) if door_file else None,
            }
        ),
        flush=True,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    deadline = time.monotonic() + _SETTLE_S
    while time.monotonic() < deadline and not (
        stack.service.in_flight == 0 and door._door.allocated == DEFAULT_ACCEPTS
    ):
        await asyncio.sleep(0.05)
    calls_left = int(door._door.allocated) - DEFAULT_ACCEPTS
    await stop_stack(stack)
    report = {
        "stopped": True,
        "calls_taken": door.taken,
        "calls_left": calls_left,
        "loop_errors": loop_errors[:20],
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(serve()))
