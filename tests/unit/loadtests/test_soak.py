"""The soak's measuring parts (``loadtests/soak.py``, ``loadtests/procmem.py``): finding
the Serve replicas among a server's processes, reading their memory, and judging growth
from the readings.

The soak itself starts a real ``gpugate serve`` (``make soak``); here its processes are
stand-ins with the titles Ray gives its workers, and /proc is the real one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

LOADTESTS = Path(__file__).resolve().parents[3] / "loadtests"

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="Linux /proc")


@pytest.fixture(scope="module")
def soak() -> Iterator[ModuleType]:
    # The script imports its neighbours as top-level modules (its folder is on sys.path).
    sys.path.insert(0, str(LOADTESTS))
    try:
        import soak as module

        yield module
    finally:
        sys.path.remove(str(LOADTESTS))


@pytest.fixture(scope="module")
def procmem(soak: ModuleType) -> ModuleType:
    return sys.modules["procmem"]  # imported by soak.py


def _titled(title: str) -> subprocess.Popen[bytes]:
    # argv[0] is what /proc/<pid>/cmdline shows first, as Ray's retitled workers do.
    return subprocess.Popen([title, "30"], executable="/bin/sleep")


def test_replicas_are_found_by_their_ray_title(procmem: ModuleType) -> None:
    procs = [
        _titled("ray::ServeReplica:gpugate:gateway"),
        _titled("ray::ServeReplica:gpugate-bench-1:model-bench-1"),
        _titled("ray::ServeController"),
    ]
    try:
        deadline = time.monotonic() + 10
        while True:
            found = procmem.replicas(os.getpid())
            if len(found) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # between fork and exec the child still has pytest's title
        assert found == {procs[0].pid: "gateway", procs[1].pid: "model-bench-1"}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def test_rss_and_its_mappings_add_up(procmem: ModuleType) -> None:
    rss = procmem.rss_mb(os.getpid())
    mappings = procmem.mappings_mb(os.getpid())
    assert rss is not None and rss > 1.0
    assert "[anon]" in mappings or "[heap]" in mappings
    # Read a moment apart, so equal only to within what the process touched meanwhile.
    assert sum(mappings.values()) == pytest.approx(rss, rel=0.05)


def test_a_process_that_is_gone_reads_as_none(procmem: ModuleType) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    assert procmem.rss_mb(proc.pid) is None
    assert procmem.mappings_mb(proc.pid) == {}


def _judge(
    soak: ModuleType, readings: list[tuple[float, float | None]]
) -> tuple[list[str], ModuleType]:
    pid = 4242
    trace = soak.RssTrace([pid], 0.0, 10.0)
    trace.readings = [(minute, {pid: mb}) for minute, mb in readings]
    samples = [
        soak.Sample(m, 1000, 0, 100.0, 1.0, 2.0, {pid: trace.median(pid, m - 10, m)})
        for m in (0.0, 10.0, 20.0, 30.0)
    ]
    procs = {pid: soak.Process(pid, "gateway")}
    run = soak.SystemRun("gpugate", exit_code=0)
    problems = soak._judge(argparse.Namespace(max_growth_mb=5.0), samples, procs, trace, run)
    return problems, procs[pid]


def test_one_high_reading_is_not_growth(soak: ModuleType) -> None:
    flat = [(m / 6, 380.0) for m in range(0, 181)]
    flat[-2] = (flat[-2][0], 395.0)  # one reading 15 MB up, in the last minute
    problems, proc = _judge(soak, flat)
    assert problems == []
    assert proc.growth_mb == 0.0


def test_steady_growth_fails_and_says_by_how_much(soak: ModuleType) -> None:
    rising = [(m / 6, 380.0 + m / 6 * 0.25) for m in range(0, 181)]  # 0.25 MB a minute
    problems, proc = _judge(soak, rising)
    assert proc.growth_mb == pytest.approx(7.25, abs=0.01)  # minute 0-1 to minute 29-30
    assert proc.second_half_mb == pytest.approx(3.625, abs=0.01)  # minute 15 to 29.5
    assert problems == ["gateway grew 7.2 MB after the warm-up (limit 5 MB)"]


def test_settling_then_flat_passes_and_shows_a_flat_second_half(soak: ModuleType) -> None:
    settling = [(m / 6, 380.0 + min(m / 6, 8.0) * 0.5) for m in range(0, 181)]
    problems, proc = _judge(soak, settling)
    assert problems == []
    assert proc.growth_mb == pytest.approx(3.75, abs=0.01)
    assert proc.second_half_mb == 0.0


def test_a_replica_that_went_away_is_a_problem(soak: ModuleType) -> None:
    readings: list[tuple[float, float | None]] = [(m / 6, 380.0) for m in range(0, 181)]
    readings[-1] = (30.0, None)
    problems, _ = _judge(soak, readings)
    assert problems == ["gateway (pid 4242) exited during the soak"]


@pytest.mark.parametrize(
    "argv", [["--minutes", "0"], ["--every-minutes", "-1"], ["--concurrency", "0"]]
)
def test_bad_arguments_exit_2(soak: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        soak.parse_args(argv)
    assert exc.value.code == 2
