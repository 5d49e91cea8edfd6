"""The raw HTTP/2 frame fuzz against one door of an in-process router stack, in a
process of its own: ``python -m tests.fuzz.door_run grpcio|native --cases N --seed S``.

Exit 0 when every case ran and the door still answers a good call; a crash of the
process (a signal) is the finding ``make fuzz-grpcio`` reports.
"""

from __future__ import annotations

import argparse
import faulthandler
from collections.abc import Sequence

from tests.fuzz import h2_frames
from tests.integration.router.helpers import (
    HOST,
    ErrorsSeen,
    main_models,
    start_stack,
    stop_stack,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.door_run")
    parser.add_argument("door", choices=("grpcio", "native"))
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=20261206)
    args = parser.parse_args(argv)
    faulthandler.enable(all_threads=True)
    seen = ErrorsSeen()
    stack = seen.lt.run(start_stack(main_models(), args.door))
    try:
        probe = h2_frames.probe_good_call(stack.grpc_url)
        stats = h2_frames.run(
            HOST,
            stack.doors.grpc_port,
            seed=args.seed,
            cases=args.cases,
            probe=probe,
            probe_every=200,
        )
        probe()
        print(f"{args.door}: {stats.cases} cases, seed {args.seed}, {stats.probes} probes: ok")
    finally:
        seen.lt.run(stop_stack(stack))
        seen.lt.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
