"""`gpugate serve` stopped while it starts: exit 0, and nothing of Ray left running."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import GPUGATE, free_port, wait_for

pytestmark = pytest.mark.timeout(300)


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(command name, state, parent pid) from /proc, or None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, _, rest = stat.partition("(")[2].rpartition(")")
    state, ppid = rest.split()[:2]
    return name, state, int(ppid)


def _descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, command name) of every process below ``pid``, from /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        stat = _stat(int(entry))
        if stat is not None:
            children.setdefault(stat[2], []).append((int(entry), stat[0]))
    found: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


@pytest.mark.parametrize(
    "moment",
    [
        "gcs_server",  # ray.init is starting the local cluster
        "ray::ServeContr",  # Serve's controller is up: the deploy is under way
    ],
)
def test_sigterm_during_startup_stops_cleanly(tmp_path: Path, moment: str) -> None:
    proc = subprocess.Popen(
        [
            GPUGATE,
            "serve",
            "--state-dir",
            str(tmp_path),
            "--http-port",
            str(free_port()),
            "--grpc-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    seen: set[tuple[int, str]] = set()
    try:

        def reached() -> bool:
            seen.update(_descendants(proc.pid))
            return proc.poll() is not None or any(n.startswith(moment) for _, n in seen)

        wait_for(f"a {moment} process", reached, timeout_s=120, every_s=0.02)
        assert proc.poll() is None, "gpugate serve exited before the signal"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert "gpugate stopped during start-up" in output, output[-3000:]
    assert "gpugate ready" not in output
    wait_for(
        "Ray's processes to end",
        lambda: not [n for p, n in seen if _running(p)],
        timeout_s=30,
        explain=lambda: f"still running: {sorted(n for p, n in seen if _running(p))}",
    )


def _running(pid: int) -> bool:
    """Alive and not a zombie (an ended child its parent has not reaped yet)."""
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z"
