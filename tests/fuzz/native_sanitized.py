"""The native gRPC door under AddressSanitizer and UndefinedBehaviorSanitizer.

``make fuzz-native`` builds the door with ``-fsanitize=address,undefined`` into a
directory of its own and runs this, which:

1. checks that the sanitizers report at all here (a deliberate heap overflow in a
   child process must leave a report);
2. runs the router's integration tests on the native door (``-k native``: the door's
   own module, the protocol suite's native half, the short frame fuzz) against the
   sanitizer build;
3. starts tests/fuzz/door_server.py on the sanitizer build and sends it the raw
   HTTP/2 frame fuzz (tests/fuzz/h2_frames.py) from this process, probing with a good
   call every ``--probe-every`` cases and at the end;
4. stops the server, which must exit 0 with every call object freed and no error
   reported by its event loop;
5. fails when any sanitizer report was written (the runtimes' ``log_path`` files) or
   printed (the processes' stderr).

The processes under test are plain CPython with the sanitizer runtime preloaded
(``LD_PRELOAD``): ASan must come first in a process, and CPython is not built with
it. ``detect_leaks=0``: CPython keeps many objects alive until exit on purpose and
gRPC's core keeps process-wide singletons, so leak reports at exit would be noise; the
door's own leaks are checked instead by the server's count of live call objects.
``PYTHONMALLOC=malloc`` makes Python's own objects (the bytes the door fills) heap
blocks that ASan watches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.fuzz import h2_frames

ROOT = Path(__file__).resolve().parents[2]
# What a sanitizer runtime prints when it reports (and aborts, under these options).
_REPORT = re.compile(
    r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|SUMMARY: \w+Sanitizer"
)


def sanitizer_environment(door_dir: Path, logs: Path) -> dict[str, str]:
    """The environment of a process that loads the sanitizer build of the door."""
    compiler = os.environ.get("CXX", "g++").split()[0]
    runtime = subprocess.run(
        [compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(runtime):
        raise SystemExit(f"{compiler} has no AddressSanitizer runtime (libasan)")
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=os.path.realpath(runtime),
        ASAN_OPTIONS=":".join(
            [
                "detect_leaks=0",
                "halt_on_error=1",
                "abort_on_error=1",
                "disable_coredump=1",
                "strict_string_checks=1",
                "check_initialization_order=1",
                f"log_path={logs / 'asan'}",
            ]
        ),
        UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:log_path={logs / 'ubsan'}",
        PYTHONMALLOC="malloc",
        GPUGATE_TEST_GRPCDOOR_DIR=str(door_dir),
        GPUGATE_REQUIRE_NATIVE="1",
    )
    return env


def sanitized_door(door_dir: Path) -> Path:
    """The door in ``door_dir``, checked to be a sanitizer build."""
    found = sorted(door_dir.glob("_grpcdoor*.so"))
    if not found:
        raise SystemExit(f"no router._grpcdoor in {door_dir}: run `make fuzz-native`")
    needed = subprocess.run(
        ["readelf", "-d", str(found[0])], capture_output=True, text=True, check=True
    ).stdout
    for runtime in ("libasan", "libubsan"):
        if runtime not in needed:
            raise SystemExit(f"{found[0]} is not a sanitizer build (it does not need {runtime})")
    return found[0]


def reports(logs: Path, *stderr_files: Path) -> list[str]:
    """Every sanitizer report written to ``logs`` or printed to the stderr files."""
    found = [
        f"{path.name}:\n{path.read_text(errors='replace')}" for path in sorted(logs.glob("*san.*"))
    ]
    for path in stderr_files:
        if path.exists():
            text = path.read_text(errors="replace")
            if _REPORT.search(text):
                found.append(f"{path.name}:\n{text[-20_000:]}")
    return found


def canary(env: dict[str, str], logs: Path) -> None:
    """A heap overflow in a child process under ``env`` must be reported."""
    canary_logs = logs / "canary"
    canary_logs.mkdir()
    env = dict(env)
    for key in ("ASAN_OPTIONS",):
        env[key] = env[key].replace(f"log_path={logs / 'asan'}", f"log_path={canary_logs}/asan")
    overflow = (
        "import ctypes; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
        "p = libc.malloc(8); ctypes.memmove(p, b'x' * 16, 16)"
    )
    subprocess.run([sys.executable, "-c", overflow], env=env, capture_output=True, check=False)
    if not any("heap-buffer-overflow" in path.read_text() for path in canary_logs.glob("asan.*")):
        raise SystemExit("the sanitizer runtime reported nothing for a deliberate overflow")


def run_tests(env: dict[str, str], logs: Path, pytest_args: Sequence[str]) -> str:
    """The router's native-door tests under ``env``; returns pytest's summary line."""
    stderr = logs / "pytest.stderr"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
    print("$", " ".join(command), flush=True)
    with stderr.open("w") as err:
        done = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
    output = done.stdout.decode(errors="replace")
    print(output[-3000:], flush=True)
    if done.returncode != 0:
        raise SystemExit(f"the native door's tests failed under the sanitizers ({stderr})")
    return output.strip().splitlines()[-1]


def run_fuzz(
    env: dict[str, str], logs: Path, seed: int, cases: int, workers: int, probe_every: int
) -> tuple[h2_frames.Stats, dict[str, Any]]:
    """The frame fuzz against a sanitizer-built door server; returns its figures and the
    server's final report."""
    stderr = logs / "door_server.stderr"
    with stderr.open("w") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz.door_server"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            assert server.stdout is not None
            started = json.loads(server.stdout.readline() or "null")
            if not started:
                raise SystemExit(f"the door server did not start ({stderr})")
            target = f"127.0.0.1:{started['grpc_port']}"
            print(f"door server {server.pid} on {target} with {started['door']}", flush=True)
            good_call = h2_frames.probe_good_call(target)

            def probe() -> None:
                if server.poll() is not None:
                    raise SystemExit(f"the door server died ({server.returncode}; {stderr})")
                good_call()

            stats = h2_frames.run(
                "127.0.0.1",
                int(started["grpc_port"]),
                seed=seed,
                cases=cases,
                workers=workers,
                probe=probe,
                probe_every=probe_every,
                progress=lambda s: print(f"  {s.cases} cases, {s.seconds:.0f} s", flush=True),
            )
            server.send_signal(signal.SIGTERM)
            out, _ = server.communicate(timeout=120)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    lines = [line for line in out.splitlines() if line.strip()]
    final = json.loads(lines[-1]) if lines else {}
    if server.returncode != 0 or not final.get("stopped"):
        raise SystemExit(f"the door server ended with {server.returncode}, {final} ({stderr})")
    return stats, final


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--door-dir", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--probe-every", type=int, default=1000)
    parser.add_argument("--logs", type=Path, default=ROOT / "build" / "fuzz-native")
    parser.add_argument(
        "--pytest-args",
        default="tests/integration/router -k native",
        help="what the sanitized test run runs ('' to skip it)",
    )
    args = parser.parse_args(argv)
    door = sanitized_door(args.door_dir.resolve())
    logs = args.logs.resolve()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    env = sanitizer_environment(args.door_dir.resolve(), logs)
    print(f"sanitizer build: {door}\nruntime: {env['LD_PRELOAD']}\nlogs: {logs}", flush=True)

    began = time.monotonic()
    canary(env, logs)
    tests = "skipped"
    if args.pytest_args.strip():
        tests = run_tests(env, logs, args.pytest_args.split())
    stats, server = run_fuzz(env, logs, args.seed, args.cases, args.workers, args.probe_every)
    found = reports(logs, logs / "pytest.stderr", logs / "door_server.stderr")
    print(
        f"\nfuzz-native: {stats.summary()}\n"
        f"  door server: {server['calls_taken']} calls handed to the service, "
        f"{server['calls_left']} call objects left after the clients went, "
        f"{len(server['loop_errors'])} event-loop errors\n"
        f"  tests under the sanitizers: {tests}\n"
        f"  sanitizer reports: {len(found)}\n"
        f"  total {time.monotonic() - began:.0f} s",
        flush=True,
    )
    for report in found:
        print(report, file=sys.stderr)
    if found:
        return 1
    if server["calls_left"] != 0:
        print("the door left call objects alive after every client went", file=sys.stderr)
        return 1
    if server["loop_errors"]:
        print(f"the door server's event loop reported: {server['loop_errors']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
