"""A short run of the raw HTTP/2 frame fuzz (tests/fuzz/h2_frames.py) against each door.

``make fuzz-native`` runs the long one against a sanitizer build of the native door;
this one keeps the driver working and catches what a few hundred cases find on the
regular builds: the server keeps answering and every call ends; on the native door
every call object is freed and the event loop reports no error.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from router.native_server import DEFAULT_ACCEPTS, NativeServer
from tests.fuzz import h2_frames
from tests.integration.router.helpers import (
    DOORS,
    HOST,
    ErrorsSeen,
    Stack,
    main_models,
    start_stack,
    stop_stack,
    wait_for,
)
from tests.integration.router.native_door import require_native_door

pytestmark = pytest.mark.timeout(180)

CASES = 200
SEED = 20261206


# grpcio 1.85's own core crashes the process (SIGSEGV in a grpcio thread) on some of
# these frame sequences: about one 200-case run in two, and most 2,000-case runs. Run
# here, it would take the whole test session down with it; `make fuzz-grpcio` runs it in
# a process of its own and reports the crash (docs/grpc.md, "Hardening").
GRPCIO_CRASHES = (
    "grpcio 1.85 segfaults on some raw HTTP/2 frame sequences: `make fuzz-grpcio` "
    "reproduces it out of process; the native door survives the same cases"
)
FUZZED_DOORS = [
    pytest.param(door, marks=pytest.mark.xfail(run=False, reason=GRPCIO_CRASHES))
    if door == "grpcio"
    else door
    for door in DOORS
]


@pytest.fixture(scope="module", params=FUZZED_DOORS)
def fuzzed(request: pytest.FixtureRequest) -> Iterator[tuple[Stack, ErrorsSeen]]:
    """A main stack of its own, on a loop that records the errors it reports: the fuzz
    leaves nothing for the other modules' stacks."""
    if request.param == "native":
        require_native_door()
    seen = ErrorsSeen()
    stack: Stack = seen.lt.run(start_stack(main_models(), request.param))
    try:
        yield stack, seen
    finally:
        seen.lt.run(stop_stack(stack))
        seen.lt.stop()


def test_frame_fuzz_leaves_the_door_serving(fuzzed: tuple[Stack, ErrorsSeen]) -> None:
    stack, seen = fuzzed
    probe = h2_frames.probe_good_call(stack.grpc_url)
    stats = h2_frames.run(
        HOST, stack.doors.grpc_port, seed=SEED, cases=CASES, probe=probe, probe_every=100
    )
    assert (stats.cases, stats.probes) == (CASES, 2)
    # The scripts reach the kinds of frames they are meant to.
    for kind in ("HEADERS", "DATA", "RST_STREAM", "WINDOW_UPDATE", "GOAWAY", "damaged"):
        assert stats.frames[kind] > 0, stats.frames
    wait_for(lambda: stack.service.in_flight == 0, timeout=30)
    door = stack.doors._door
    if isinstance(door, NativeServer):
        assert door.taken > 0  # calls reached the service, not only refusals
        wait_for(lambda: door._tasks == {} and door._door.allocated == DEFAULT_ACCEPTS, 30)
        seen.collect_garbage()
        # grpc.aio's own server loop fails on some of these requests (the door starts
        # it again), so only the native door's loop must stay free of errors.
        assert seen.errors == [], seen.errors
    probe()


def test_cases_are_reproducible() -> None:
    authority = "127.0.0.1:8001"
    for index in (0, 7, 123):
        first = h2_frames.build_case(SEED, index, authority)
        again = h2_frames.build_case(SEED, index, authority)
        assert first.steps == again.steps and first.ending == again.ending
    assert h2_frames.build_case(SEED, 1, authority).steps != first.steps
