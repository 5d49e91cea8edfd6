"""The servers under test: start one as a subprocess, wait for it, stop it by PID.

* gpugate: ``gpugate serve`` on free ports with a config of two tenants whose
  keys are passed in environment variables; with ``gateways`` > 1 (the system
  ``gpugate-2gw``) that many gateway replicas share the HTTP and gRPC ports and
  serve metrics on consecutive ports;
* rayserve: ``loadtests/peer_rayserve.py``, plain Ray Serve with its own gRPC
  proxy and ``@serve.batch``;
* triton: ``loadtests/peer_triton.py``, NVIDIA Triton through PyTriton, under its
  own virtual environment (``triton_venv.py``);
* null: ``loadtests/null_server.py``, a grpc.aio server that runs no model.

Each runs with a fresh local Ray (never a cluster someone else started) in its
own process session, so the CPU it and its Ray helpers use can be told apart
from other work on the machine. :func:`running` records startup time, exit code
and log path in a :class:`SystemRun`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from loadgen import (
    STAGES,
    BatchCounter,
    CpuMeter,
    GatewayCounter,
    LevelResult,
    Meters,
    StageCounter,
)

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = Path(__file__).resolve().parent / "peer_rayserve.py"
NULL_SCRIPT = Path(__file__).resolve().parent / "null_server.py"
TRITON_SCRIPT = Path(__file__).resolve().parent / "peer_triton.py"
RESERVED_PORTS = range(8000, 8003)  # a developer's gateway may be on its defaults


@dataclass
class SystemRun:
    name: str
    startup_s: float = 0.0
    probe_matches_reference: bool | None = None
    probe_max_abs_diff: float | None = None
    exit_code: int | None = None
    log_path: str | None = None
    version: str | None = None  # the server's own, where it reports one
    levels: list[LevelResult] = field(default_factory=list)


# ------------------------------------------------------------- batch counters


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def prometheus_sum(text: str, name: str, label: str | None = None) -> float:
    """One series of a Prometheus text page summed over its labels (only the lines
    holding ``label`` when given)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (label is None or label in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def prometheus_totals(
    metrics_urls: list[str], first: str, second: str, label: str | None = None
) -> BatchCounter:
    """Two series summed over their labels and over every page in ``metrics_urls`` (only
    the lines holding ``label`` when given): (sum of ``first``, sum of ``second``). Several
    pages: one per gateway, each forms and counts only its own batches."""

    def read() -> tuple[float, float] | None:
        a = b = 0.0
        for url in metrics_urls:
            text = _scrape(url)
            if text is None:
                return None
            a += prometheus_sum(text, first, label)
            b += prometheus_sum(text, second, label)
        return a, b

    return read


def gateway_batches(metrics_urls: list[str]) -> BatchCounter:
    """gpugate's ``gpugate_batch_size_rows`` histogram: (_count, _sum) over all labels
    and every gateway."""
    return prometheus_totals(
        metrics_urls, "gpugate_batch_size_rows_count", "gpugate_batch_size_rows_sum"
    )


def gateway_tenant_latency(metrics_urls: list[str], tenant: str) -> BatchCounter:
    """gpugate's ``gpugate_request_duration_seconds`` for one tenant: (_count, _sum) over
    every gateway."""
    return prometheus_totals(
        metrics_urls,
        "gpugate_request_duration_seconds_count",
        "gpugate_request_duration_seconds_sum",
        f'tenant="{tenant}"',
    )


def gateway_answers(metrics_urls: list[str]) -> GatewayCounter:
    """Requests each gateway answered so far (``gpugate_requests_total``, every code),
    one figure per metrics page: how the kernel spread the connections."""

    def read() -> list[float] | None:
        counts = []
        for url in metrics_urls:
            text = _scrape(url)
            if text is None:
                return None
            counts.append(prometheus_sum(text, "gpugate_requests_total{"))
        return counts

    return read


def peer_batches(stats_url: str) -> BatchCounter:
    """The peer deployment's own counters, served at its HTTP route."""

    def read() -> tuple[float, float] | None:
        try:
            with urllib.request.urlopen(stats_url, timeout=5) as resp:
                stats = json.loads(resp.read())
        except (OSError, ValueError):
            return None
        return float(stats["batches"]), float(stats["rows"])

    return read


def triton_batches(metrics_url: str) -> BatchCounter:
    """Triton's own counters: ``nv_inference_exec_count`` (batches run) and
    ``nv_inference_count`` (rows inferred), summed over models."""
    return prometheus_totals([metrics_url], "nv_inference_exec_count{", "nv_inference_count{")


def model_stages(stats_url: str) -> StageCounter:
    """The (count, ns) of each part in STAGES, summed over the versions listed at a
    KServe server's statistics URL (Triton's extension: gpugate and Triton both serve it)."""

    def read() -> dict[str, tuple[int, int]] | None:
        try:
            with urllib.request.urlopen(stats_url, timeout=5) as resp:
                found = json.loads(resp.read())["model_stats"]
        except (OSError, ValueError, KeyError):
            return None
        totals = dict.fromkeys(STAGES, (0, 0))
        for version in found:
            for stage in STAGES:
                part = version["inference_stats"][stage]
                count, ns = totals[stage]
                totals[stage] = (count + int(part["count"]), ns + int(part["ns"]))
        return totals

    return read


# ------------------------------------------------------------------ subprocesses


def free_port(taken: set[int]) -> int:
    """A port the kernel calls free on 127.0.0.1, not one of 8000-8002 nor already chosen."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in RESERVED_PORTS and port not in taken:
            taken.add(port)
            return port
    raise RuntimeError("no free port found")


def free_port_run(taken: set[int], n: int) -> int:
    """The first of ``n`` consecutive free ports (several gateways' metrics ports are
    ``metrics_port`` + their rank)."""
    for _ in range(100):
        first = free_port(taken)
        run = range(first, first + n)
        ok = True
        for port in run[1:]:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok and not any(p in RESERVED_PORTS or p in taken for p in run[1:]):
            taken.update(run)
            return first
    raise RuntimeError(f"no {n} consecutive free ports found")


class Server:
    """A server subprocess: waits for its ready line, stops with SIGTERM on exit."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        ready_prefix: str,
        log_path: Path,
        log: Callable[[str], None],
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.ready_prefix = ready_prefix
        self.log_path = log_path
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._logfile: TextIO | None = None
        self._log_lock = threading.Lock()  # two pumps write the log
        self.exit_code: int | None = None
        self.batch_counter: BatchCounter | None = None
        self.stages: StageCounter | None = None  # servers with the statistics extension
        # gpugate only: (count, sum) of the light tenant's time inside the gateway.
        self.light_inside: BatchCounter | None = None
        # gpugate only: requests answered so far by each gateway.
        self.gateway_answers: GatewayCounter | None = None
        self.metrics_urls: list[str] = []  # gpugate only: each gateway's metrics

    def start(self, timeout_s: float) -> float:
        """Start and wait for the ready line; returns the seconds it took."""
        started = time.monotonic()
        self._logfile = self.log_path.open("w")
        # Own session: a last-resort SIGKILL can reach Ray's helpers through the group.
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            # Two pipes: the ready line is read from stdout alone, so a server's own
            # log lines on stderr (tritonserver's, Ray's) cannot split it in two.
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, lines in ((self.proc.stdout, self._lines), (self.proc.stderr, None)):
            threading.Thread(
                target=self._pump, args=(stream, lines), daemon=True, name=f"{self.name}-log"
            ).start()
        deadline = started + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"{self.name} not ready after {timeout_s:.0f}s; log: {self.log_path}\n"
                    + self.tail()
                )
            try:
                line = self._lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                raise RuntimeError(
                    f"{self.name} exited with {code} before it was ready; log: {self.log_path}\n"
                    + self.tail()
                )
            if line.startswith(self.ready_prefix):
                self.log(f"{self.name}: {line.strip()}")
                return time.monotonic() - started

    def meters(self) -> Meters:
        """CPU of this server's process session (plus the load generator) and its batches."""
        return Meters(
            CpuMeter(self.proc.pid if self.proc else None),
            self.batch_counter,
            self.stages,
            self.gateway_answers,
        )

    def _pump(self, stream: TextIO, lines: queue.Queue[str | None] | None) -> None:
        """Copy one of the server's streams to its log; stdout's lines also to ``lines``."""
        for line in stream:
            with self._log_lock:
                if self._logfile is not None:
                    self._logfile.write(line)
                    self._logfile.flush()
            if lines is not None:
                lines.put(line)
        if lines is not None:
            lines.put(None)

    def tail(self, n: int = 30) -> str:
        try:
            return "".join(self.log_path.read_text().splitlines(keepends=True)[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 120.0) -> int | None:
        """SIGTERM by PID and wait; SIGKILL the process group only if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.log(f"{self.name}: no exit {timeout_s:.0f}s after SIGTERM; killing")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.exit_code = self.proc.returncode
        if self._logfile is not None:
            # Give the pump a moment to copy the last lines.
            time.sleep(0.2)
            with self._log_lock:
                self._logfile.close()
                self._logfile = None
        self.log(f"{self.name}: exited with {self.exit_code}")
        return self.exit_code


@contextlib.contextmanager
def running(server: Server, timeout_s: float, run: SystemRun) -> Iterator[Server]:
    try:
        run.startup_s = server.start(timeout_s)
        yield server
    finally:
        run.exit_code = server.stop()
        run.log_path = str(server.log_path)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # A fresh local Ray for each system, never a cluster someone else started.
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def in_state_dir(
    given: Path | None,
    prefix: str,
    keep: bool,
    log: Callable[[str], None],
    run: Callable[[Path], int],
) -> int:
    """``run(state_dir)`` in ``given``, or in a new temporary folder that is removed after
    a run that returned 0 (unless ``keep``), and kept for inspection otherwise."""
    if given is not None:
        state_dir = given.resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        return run(state_dir)
    # mkdtemp, not TemporaryDirectory: the latter's finalizer would delete a folder
    # kept for inspection when the interpreter exits.
    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    code = 1
    try:
        code = run(state_dir)
    finally:
        if code == 0 and not keep:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            log(f"kept {state_dir} (server logs) for inspection")
    return code


def gpugate_command() -> list[str]:
    script = Path(sys.executable).parent / "gpugate"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "serving.cli"]


def write_gateway_config(
    path: Path,
    model: Any,
    tenants: dict[str, tuple[float, str]],
    server: dict[str, Any],
) -> None:
    """``tenants``: name -> (weight, the variable holding its key); ``server``: the
    config's server settings, where a None value leaves the gateway's default."""
    config = {
        "server": {k: v for k, v in server.items() if v is not None},
        "models": [model.model_dump(mode="json")],
        "tenants": [
            {"name": name, "weight": weight, "api_key_env": env}
            for name, (weight, env) in tenants.items()
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


# ------------------------------------------------------------------ the systems


def gpugate_system(
    state_dir: Path,
    model: Any,
    keys: list[str],
    taken: set[int],
    log: Callable[[str], None],
    server_settings: dict[str, Any],
    gateways: int = 1,
    name: str = "gpugate",
    weights: dict[str, float] | None = None,
) -> tuple[Server, str, str]:
    """``gpugate serve`` with a tenant per key (``weights``: their names and weights;
    default bench-0, bench-1... at weight 1) and ``gateways`` gateway replicas; returns
    it, its gRPC target and its HTTP base."""
    http_port, grpc_port = free_port(taken), free_port(taken)
    metrics_port = free_port_run(taken, gateways)
    weights = weights or {f"bench-{i}": 1.0 for i in range(len(keys))}
    key_envs = [f"GPUGATE_BENCH_KEY_{i}" for i in range(len(keys))]
    tenants = {t: (w, env) for (t, w), env in zip(weights.items(), key_envs, strict=True)}
    config_path = state_dir / f"{name}-bench.yaml"
    settings = dict(server_settings)
    if gateways > 1:
        settings["gateway_replicas"] = gateways
    write_gateway_config(config_path, model, tenants, settings)
    gw_state = state_dir / f"{name}-state"
    server = Server(
        name,
        [
            *gpugate_command(),
            "serve",
            "--config",
            str(config_path),
            "--state-dir",
            str(gw_state),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics_port),
        ],
        child_env(dict(zip(key_envs, keys, strict=True))),
        "gpugate ready",
        state_dir / f"{name}.log",
        log,
    )
    # Each gateway counts only its own batches and requests: sum over every port.
    metrics_urls = [f"http://127.0.0.1:{metrics_port + rank}/metrics" for rank in range(gateways)]
    server.metrics_urls = metrics_urls
    server.batch_counter = gateway_batches(metrics_urls)
    if gateways == 1:
        # The statistics route answers for the gateway that accepted the connection,
        # and gateways sharing the port cannot be told apart: one gateway only.
        server.stages = model_stages(f"http://127.0.0.1:{http_port}/v2/models/{model.name}/stats")
    else:
        server.gateway_answers = gateway_answers(metrics_urls)
    # The noisy-neighbour light tenant sends with the first key (kserve_client.grpc_noisy).
    server.light_inside = gateway_tenant_latency(metrics_urls, "bench-0")
    return server, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"


def peer_system(
    state_dir: Path,
    taken: set[int],
    max_batch_size: int,
    batch_wait_ms: float,
    forward: str,
    access_log: str,
    log: Callable[[str], None],
) -> tuple[Server, str]:
    """The plain Ray Serve peer; returns it and its gRPC target."""
    grpc_port, http_port = free_port(taken), free_port(taken)
    server = Server(
        "rayserve",
        [
            sys.executable,
            str(PEER_SCRIPT),
            "--state-dir",
            str(state_dir),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--max-batch-size",
            str(max_batch_size),
            "--batch-wait-ms",
            str(batch_wait_ms),
            "--forward",
            forward,
            "--access-log",
            access_log,
        ],
        child_env({}),
        "rayserve-peer ready",
        state_dir / "rayserve.log",
        log,
    )
    server.batch_counter = peer_batches(f"http://127.0.0.1:{http_port}/bench")
    return server, f"127.0.0.1:{grpc_port}"


def null_system(state_dir: Path, taken: set[int], log: Callable[[str], None]) -> tuple[Server, str]:
    """The gRPC server that runs no model; returns it and its gRPC target."""
    grpc_port = free_port(taken)
    server = Server(
        "null",
        [sys.executable, str(NULL_SCRIPT), "--grpc-port", str(grpc_port)],
        child_env({}),
        "null-server ready",
        state_dir / "null.log",
        log,
    )
    return server, f"127.0.0.1:{grpc_port}"


def triton_system(
    state_dir: Path,
    taken: set[int],
    python: Path,
    max_batch_size: int,
    batch_wait_ms: float,
    log: Callable[[str], None],
) -> tuple[Server, str, str]:
    """The Triton peer under its own venv's ``python``; returns it, its gRPC target and
    its HTTP base."""
    from triton_venv import environment

    grpc_port, http_port, metrics_port = (free_port(taken) for _ in range(3))
    server = Server(
        "triton",
        [
            str(python),
            str(TRITON_SCRIPT),
            "--state-dir",
            str(state_dir),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--metrics-port",
            str(metrics_port),
            "--max-batch-size",
            str(max_batch_size),
            "--batch-wait-ms",
            str(batch_wait_ms),
        ],
        child_env(environment()),
        "triton-peer ready",
        state_dir / "triton.log",
        log,
    )
    server.batch_counter = triton_batches(f"http://127.0.0.1:{metrics_port}/metrics")
    server.stages = model_stages(f"http://127.0.0.1:{http_port}/v2/models/bench/stats")
    return server, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
