"""Model classes that the smoke test's child process imports (``model_class``) to show
what that process sees and may do. Each refuses to build, with its finding in the
error, which the smoke test's refusal carries back."""

from __future__ import annotations

import json
import mmap
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from torch import nn

LIMITS = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE")
REPORT = "REPORT:"


class EnvSpy(nn.Module):
    """Reports the names in the environment its process started with and in its
    environment now (imports add some), whether any value holds ``secret``, its working
    directory and home, what stdin holds, and its resource limits."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        started = Path("/proc/self/environ").read_bytes().split(b"\0")
        report = {
            "started": sorted(e.split(b"=", 1)[0].decode() for e in started if e),
            "env": sorted(os.environ),
            "secret_seen": any(secret in value for value in os.environ.values())
            or any(secret.encode() in e for e in started),
            "cwd": os.getcwd(),
            "home": os.environ.get("HOME"),
            "stdin": sys.stdin.read() if sys.stdin is not None else None,
            "limits": {name: resource.getrlimit(getattr(resource, name)) for name in LIMITS},
        }
        raise RuntimeError(REPORT + json.dumps(report, separators=(",", ":")))


class AddressSpaceHog(nn.Module):
    """Maps ``nbytes`` of anonymous memory without touching it: refused only by an
    address-space limit, never by the machine running short."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        mapped = mmap.mmap(-1, nbytes)
        mapped.close()
        raise RuntimeError(f"{REPORT}mapped {nbytes} bytes")


class Sleeper(nn.Module):
    """Starts a process that sleeps, writes its process ID to ``pid_file``, and sleeps."""

    def __init__(self, pid_file: str) -> None:
        super().__init__()
        child = subprocess.Popen(["sleep", "600"])
        Path(pid_file).write_text(str(child.pid))
        time.sleep(600)
