"""A real `gpugate serve` subprocess, shared by the e2e tests of a module."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

GPUGATE = str(Path(sys.executable).with_name("gpugate"))
READY_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    state_dir: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    demo_key: str
    lines: list[str] = field(default_factory=list)
    config: Path | None = None  # the --config it was started with

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [GPUGATE, *args, "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def admin_cli(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        """An admin command with the gateway's config (e.g. registry policies) and a token."""
        extra = ["--config", str(self.config)] if self.config is not None else []
        return self.cli(*args, *extra, *(["--token", token] if token else []))

    def restart(self) -> None:
        """SIGTERM, then start again on the same state and config (new ports)."""
        assert self.stop() == 0
        extra = ("--config", str(self.config)) if self.config is not None else ()
        new = start_gateway(self.state_dir, *extra)
        self.proc, self.http_port, self.grpc_port = new.proc, new.http_port, new.grpc_port
        self.metrics_port, self.lines = new.metrics_port, new.lines

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus series' samples matching ``labels``, scraped now."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
        )

    def close(self) -> None:
        """Fixture teardown: SIGTERM, and SIGKILL if it has not exited in 90 s."""
        if self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_gateway(state_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Gateway:
    http, grpc_, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [
            GPUGATE,
            "serve",
            "--state-dir",
            str(state_dir),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_),
            "--metrics-port",
            str(metrics),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "", **(env or {})},
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("gpugate ready"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise RuntimeError("gateway did not become ready:\n" + "".join(lines[-40:]))
    key_line = next(line for line in lines if "demo tenant key" in line)
    match = re.search(r"demo tenant key: (\S+)", key_line)
    assert match is not None
    return Gateway(proc, state_dir, http, grpc_, metrics, match.group(1), lines)


@contextlib.contextmanager
def configured_gateway(
    tmp_path_factory: pytest.TempPathFactory, name: str, config_text: str
) -> Iterator[Gateway]:
    """A gateway on a fresh state folder with ``config_text`` as its --config."""
    state = tmp_path_factory.mktemp(name)
    config = state.parent / f"{state.name}-config.yaml"
    config.write_text(config_text)
    gw = start_gateway(state, "--config", str(config))
    gw.config = config
    try:
        yield gw
    finally:
        gw.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("state"))
    try:
        yield gw
    finally:
        gw.close()
