"""What a benchmark run was measured on: package versions, the commit, the machine.

Recorded in ``bench.py``'s JSON next to the figures, so a table can be traced to
the code and the machine that produced it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from typing import Any

from systems import REPO


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ray", "torch", "grpcio", "numpy", "aiohttp", "protobuf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_state() -> dict[str, Any]:
    """The commit benchmarked and any uncommitted changes to the code it runs."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "router", "scheduler", "serving", "proto")
    return {
        "commit": git("rev-parse", "HEAD") or None,
        "uncommitted": [line[3:] for line in dirty.splitlines()],
    }


def server_version(http_base: str) -> str | None:
    """The server's own version from KServe v2 server metadata (``GET /v2``)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{http_base}/v2", timeout=5) as resp:
            meta = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return f"{meta.get('name')} {meta.get('version')}"


def machine(loadavg_at_start: tuple[float, float, float]) -> dict[str, Any]:
    gpu = "none"
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    return {
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_at_start": list(loadavg_at_start),
        "loadavg_at_end": list(os.getloadavg()),
    }
