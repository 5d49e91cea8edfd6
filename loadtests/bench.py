"""Side-by-side benchmark: gpugate vs. plain Ray Serve, one run, one machine.

1. Prepare the bench model once (``serving.demo.bench_model_config``: BenchMLP,
   input "x" FP32 [256], output "y" FP32 [128]) with ``max_batch_size`` 32 for
   every system.
2. In-process limit: :class:`serving.models.ModelRunner`, 1 torch thread, full
   batches of 32 rows (rows/s) and the forward time of one row.
3. gpugate: ``gpugate serve`` as a subprocess on free ports, two config tenants
   whose keys are passed in environment variables; load over gRPC and HTTP.
4. Plain Ray Serve peer: ``loadtests/peer_rayserve.py`` as a subprocess (Serve's
   own gRPC proxy + ``@serve.batch``); load over gRPC.
5. One load generator for all: closed loop in this process, 1 row per request,
   KServe v2 ``ModelInfer`` with ``raw_input_contents`` over ``grpc.aio`` (or the
   binary-tensor HTTP/REST form over aiohttp), at each concurrency a warm-up and
   then a fixed measured window.
6. One table (and ``--json-out``): req/s, rows/s, p50, p99, errors and the
   gateway/peer throughput ratio at each concurrency, plus the mean rows per
   model batch (from each server's own counters) and the cores busy in the
   window -- machine-wide and outside this benchmark, so a run disturbed by
   other work on the machine shows as such.
7. Calibration ("null"): ``loadtests/null_server.py``, a grpc.aio server that
   runs no model, driven the same way -- the most this client can do here.

    python loadtests/bench.py                       # full run, a few minutes
    python loadtests/bench.py --quick --json-out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = Path(__file__).resolve().parent / "peer_rayserve.py"
NULL_SCRIPT = Path(__file__).resolve().parent / "null_server.py"
SYSTEMS = ("gpugate", "rayserve", "null")
MODEL_NAME = "bench"
MODEL_VERSION = "1"
PEER_APP = "bench-peer"
RESERVED_PORTS = range(8000, 8003)  # a developer's gateway may be on its defaults
REQUEST_TIMEOUT_S = 30.0
ROW_SEED = 1234


# ------------------------------------------------------------------------ results


@dataclass
class LevelResult:
    system: str
    protocol: str
    concurrency: int
    duration_s: float
    requests: int
    req_per_s: float
    rows_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    errors: int
    warmup_requests: int
    warmup_errors: int
    error_sample: str | None = None
    ratio_vs_peer: float | None = None
    # Cores busy in the measured window: the whole machine, this benchmark (load
    # generator + the server's process session), and everything else.
    cpu_cores_busy: float | None = None
    cpu_cores_bench: float | None = None
    cpu_cores_other: float | None = None
    # Rows per model batch in the window, from the server's own counters.
    mean_batch_rows: float | None = None


@dataclass
class InProcessResult:
    batch_rows: int
    batches: int
    batch_ms_median: float
    rows_per_s: float
    forward_1row_ms: float
    run_1row_ms: float
    rows_per_s_batch1: float


@dataclass
class SystemRun:
    name: str
    startup_s: float = 0.0
    probe_matches_reference: bool | None = None
    probe_max_abs_diff: float | None = None
    exit_code: int | None = None
    log_path: str | None = None
    levels: list[LevelResult] = field(default_factory=list)


# -------------------------------------------------------------------- load driver


class CpuMeter:
    """CPU seconds used by the machine and by this benchmark, from /proc (Linux).

    "This benchmark" is this process plus every process in the server's session
    (servers start with ``start_new_session``, and Ray's raylet, GCS and workers
    inherit the session). The rest is other work on the machine -- e.g. other
    engineers' test runs -- which the table shows so a noisy run is visible.
    """

    def __init__(self, session: int | None) -> None:
        self.session = session
        self.tick = float(os.sysconf("SC_CLK_TCK"))
        self.available = Path("/proc/stat").is_file()

    def snapshot(self) -> tuple[float, float] | None:
        if not self.available:
            return None
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest is inside user).
        busy = sum(fields[:3]) + sum(fields[5:8])
        ours = 0
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            rest = raw[raw.rfind(")") + 2 :].split()
            # After "pid (comm) ": state ppid pgrp session ... utime(11) stime(12).
            if int(entry.name) == me or int(rest[3]) == self.session:
                ours += int(rest[11]) + int(rest[12])
        return busy / self.tick, ours / self.tick


# Cumulative (batches, rows) the server has run so far, or None if unknown.
BatchCounter = Callable[[], "tuple[float, float] | None"]


@dataclass
class Meters:
    """What is sampled at the start and end of each measured window."""

    cpu: CpuMeter | None = None
    batches: BatchCounter | None = None


def gateway_batches(metrics_url: str) -> BatchCounter:
    """gpugate's ``gpugate_batch_size_rows`` histogram: (_count, _sum) over all labels."""

    def read() -> tuple[float, float] | None:
        try:
            with urllib.request.urlopen(metrics_url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        count = total = 0.0
        for line in text.splitlines():
            if line.startswith("gpugate_batch_size_rows_count"):
                count += float(line.rsplit(" ", 1)[1])
            elif line.startswith("gpugate_batch_size_rows_sum"):
                total += float(line.rsplit(" ", 1)[1])
        return count, total

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


def _cpu_window(
    before: tuple[float, float] | None, after: tuple[float, float] | None, seconds: float
) -> tuple[float | None, float | None, float | None]:
    if before is None or after is None or seconds <= 0:
        return None, None, None
    busy = (after[0] - before[0]) / seconds
    bench = (after[1] - before[1]) / seconds
    return busy, bench, max(0.0, busy - bench)


class Recorder:
    """Per-request outcomes of one level; only what completes in the window counts."""

    def __init__(self) -> None:
        self.window_start = float("inf")
        self.window_end = float("inf")
        self.latencies_ns: list[int] = []
        self.errors = 0
        self.warmup_requests = 0
        self.warmup_errors = 0
        self.error_sample: str | None = None
        self.cpu_before: tuple[float, float] | None = None
        self.cpu_after: tuple[float, float] | None = None
        self.batches_before: tuple[float, float] | None = None
        self.batches_after: tuple[float, float] | None = None

    def record(self, started: float, finished: float, error: str | None) -> None:
        if finished < self.window_start:
            self.warmup_requests += 1
            if error is not None:
                self.warmup_errors += 1
                self.error_sample = self.error_sample or f"(warm-up) {error}"
            return
        if finished >= self.window_end:
            return
        if error is not None:
            self.errors += 1
            if self.error_sample is None or self.error_sample.startswith("(warm-up)"):
                self.error_sample = error
        else:
            self.latencies_ns.append(round((finished - started) * 1e9))


# One request: returns None on success or a short error text.
SendFn = Callable[[int], Awaitable[str | None]]


async def closed_loop(
    send: SendFn,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    meters: Meters | None = None,
    drain_s: float = 35.0,
) -> Recorder:
    """``concurrency`` workers, each sending its next request when the last returns."""
    rec = Recorder()
    loop_start = time.perf_counter()
    rec.window_start = loop_start + warmup_s
    rec.window_end = rec.window_start + duration_s

    async def sample() -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
        assert meters is not None
        cpu = meters.cpu.snapshot() if meters.cpu is not None else None
        batches = await asyncio.to_thread(meters.batches) if meters.batches else None
        return cpu, batches

    async def watch() -> None:
        if meters is None:
            return
        await asyncio.sleep(max(0.0, rec.window_start - time.perf_counter()))
        rec.cpu_before, rec.batches_before = await sample()
        await asyncio.sleep(max(0.0, rec.window_end - time.perf_counter()))
        rec.cpu_after, rec.batches_after = await sample()

    async def worker(index: int) -> None:
        while time.perf_counter() < rec.window_end:
            started = time.perf_counter()
            try:
                error = await send(index)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            rec.record(started, time.perf_counter(), error)

    watcher = asyncio.create_task(watch())
    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + drain_s)
    for task in pending:
        task.cancel()
    for task in done:
        task.result()
    await watcher
    return rec


def summarize(
    rec: Recorder, system: str, protocol: str, concurrency: int, duration_s: float
) -> LevelResult:
    lat = np.sort(np.asarray(rec.latencies_ns, dtype=np.float64)) / 1e6
    n = len(lat)

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q)) if n else None

    busy, bench, other = _cpu_window(rec.cpu_before, rec.cpu_after, duration_s)
    mean_batch = None
    if rec.batches_before is not None and rec.batches_after is not None:
        batches = rec.batches_after[0] - rec.batches_before[0]
        if batches > 0:
            mean_batch = (rec.batches_after[1] - rec.batches_before[1]) / batches
    return LevelResult(
        system=system,
        protocol=protocol,
        concurrency=concurrency,
        duration_s=duration_s,
        requests=n,
        req_per_s=n / duration_s,
        rows_per_s=n / duration_s,  # one row per request
        p50_ms=pct(50),
        p99_ms=pct(99),
        mean_ms=float(lat.mean()) if n else None,
        max_ms=float(lat[-1]) if n else None,
        errors=rec.errors,
        warmup_requests=rec.warmup_requests,
        warmup_errors=rec.warmup_errors,
        error_sample=rec.error_sample,
        cpu_cores_busy=busy,
        cpu_cores_bench=bench,
        cpu_cores_other=other,
        mean_batch_rows=mean_batch,
    )


def _bench_row() -> np.ndarray:
    from serving.demo import BENCH_IN

    return np.random.default_rng(ROW_SEED).standard_normal((1, BENCH_IN), dtype=np.float32)


# ------------------------------------------------------------------------ gRPC


def _grpc_request(row: np.ndarray) -> Any:
    from gpugate_proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL_NAME, model_version=MODEL_VERSION)
    request.inputs.add(name="x", datatype="FP32", shape=list(row.shape))
    request.raw_input_contents.append(np.ascontiguousarray(row, dtype=np.float32).tobytes())
    return request


def _grpc_metadata(keys: list[str]) -> list[tuple[tuple[str, str], ...]]:
    # `application` picks the Serve app on Serve's proxy; gpugate ignores it. The
    # bearer key is ignored by the peer. Same metadata for both systems.
    return [(("authorization", f"Bearer {k}"), ("application", PEER_APP)) for k in keys]


def _decode_grpc_output(response: Any) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(
        tuple(response.outputs[0].shape)
    )


async def grpc_probe(target: str, keys: list[str], row: np.ndarray, timeout_s: float) -> np.ndarray:
    """Retry one request until it succeeds (the proxy may lag the app by a moment)."""
    import grpc
    from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

    request = _grpc_request(row)
    metadata = _grpc_metadata(keys)[0]
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                response = await stub.ModelInfer(request, metadata=metadata, timeout=10)
                return _decode_grpc_output(response)
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gRPC probe of {target} failed: {exc.details()}") from exc
                await asyncio.sleep(0.5)


async def grpc_levels(
    system: str,
    target: str,
    keys: list[str],
    row: np.ndarray,
    levels: list[int],
    warmup_s: float,
    duration_s: float,
    log: Callable[[str], None],
    meters: Meters | None = None,
) -> list[LevelResult]:
    import grpc
    from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

    request = _grpc_request(row)
    metadata = _grpc_metadata(keys)
    expected_bytes = 128 * 4
    results = []
    # One channel (one HTTP/2 connection) for the whole run, as tritonclient does.
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def send(index: int) -> str | None:
            try:
                response = await stub.ModelInfer(
                    request, metadata=metadata[index % len(metadata)], timeout=REQUEST_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            raw = response.raw_output_contents
            if len(raw) != 1 or len(raw[0]) != expected_bytes:
                return "bad response: wrong output size"
            return None

        for concurrency in levels:
            rec = await closed_loop(send, concurrency, warmup_s, duration_s, meters)
            result = summarize(rec, system, "grpc", concurrency, duration_s)
            log(_one_line(result))
            results.append(result)
    return results


# ------------------------------------------------------------------------ HTTP


def _http_body(row: np.ndarray) -> tuple[bytes, int]:
    raw = np.ascontiguousarray(row, dtype=np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": list(row.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    return header + raw, len(header)


def _decode_http_output(body: bytes, header_length: str | None) -> np.ndarray:
    if header_length is None:
        head = json.loads(body)
        return np.asarray(head["outputs"][0]["data"], dtype=np.float32).reshape(
            head["outputs"][0]["shape"]
        )
    n = int(header_length)
    head = json.loads(body[:n])
    return np.frombuffer(body[n:], dtype=np.float32).reshape(head["outputs"][0]["shape"])


def _http_headers(keys: list[str], header_length: int) -> list[dict[str, str]]:
    return [
        {
            "Authorization": f"Bearer {k}",
            "Inference-Header-Content-Length": str(header_length),
            "Content-Type": "application/octet-stream",
        }
        for k in keys
    ]


async def http_probe(base: str, keys: list[str], row: np.ndarray, timeout_s: float) -> np.ndarray:
    import aiohttp

    body, header_length = _http_body(row)
    headers = _http_headers(keys, header_length)[0]
    url = f"{base}/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/infer"
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    payload = await resp.read()
                    if resp.status == 200:
                        return _decode_http_output(
                            payload, resp.headers.get("Inference-Header-Content-Length")
                        )
                    problem = f"HTTP {resp.status}: {payload[:200]!r}"
            except aiohttp.ClientError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"HTTP probe of {url} failed: {problem}")
            await asyncio.sleep(0.5)


async def http_levels(
    system: str,
    base: str,
    keys: list[str],
    row: np.ndarray,
    levels: list[int],
    warmup_s: float,
    duration_s: float,
    log: Callable[[str], None],
    meters: Meters | None = None,
) -> list[LevelResult]:
    import aiohttp

    body, header_length = _http_body(row)
    headers = _http_headers(keys, header_length)
    url = f"{base}/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/infer"
    expected_bytes = 128 * 4
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    results = []
    for concurrency in levels:
        # Keep-alive connections, one per worker; opened during the warm-up.
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def send(index: int, session: Any = session) -> str | None:
                async with session.post(
                    url, data=body, headers=headers[index % len(headers)]
                ) as resp:
                    payload = await resp.read()
                    if resp.status != 200:
                        return f"HTTP {resp.status}: {payload[:200]!r}"
                    n = resp.headers.get("Inference-Header-Content-Length")
                    if n is None or len(payload) - int(n) != expected_bytes:
                        return "bad response: wrong output size"
                    return None

            rec = await closed_loop(send, concurrency, warmup_s, duration_s, meters)
        result = summarize(rec, system, "http", concurrency, duration_s)
        log(_one_line(result))
        results.append(result)
    return results


# ------------------------------------------------------------------- in-process


def in_process_limit(config: Any, seconds: float, log: Callable[[str], None]) -> InProcessResult:
    """ModelRunner with 1 thread: full batches of max_batch_size rows, and single rows."""
    from serving.models import ModelRunner

    runner = ModelRunner(config, num_threads=1)
    runner.warmup()
    rows = config.max_batch_size
    rng = np.random.default_rng(ROW_SEED)
    batch = {"x": rng.standard_normal((rows, config.inputs[0].shape[0]), dtype=np.float32)}
    one = {"x": batch["x"][:1].copy()}
    for _ in range(5):
        runner.run(batch)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 10:
        t0 = time.perf_counter()
        runner.run(batch)
        times.append(time.perf_counter() - t0)
    batch_elapsed = time.perf_counter() - start
    for _ in range(20):
        runner.run(one)
    forward_ns: list[int] = []
    run_s: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds / 2 or len(run_s) < 20:
        t0 = time.perf_counter()
        _, ns = runner.run(one)
        run_s.append(time.perf_counter() - t0)
        forward_ns.append(ns)
    one_elapsed = time.perf_counter() - start
    result = InProcessResult(
        batch_rows=rows,
        batches=len(times),
        batch_ms_median=statistics.median(times) * 1e3,
        rows_per_s=rows * len(times) / batch_elapsed,
        forward_1row_ms=statistics.median(forward_ns) / 1e6,
        run_1row_ms=statistics.median(run_s) * 1e3,
        rows_per_s_batch1=len(run_s) / one_elapsed,
    )
    log(
        f"in-process limit: {result.rows_per_s:.0f} rows/s at batch {rows} "
        f"({result.batch_ms_median:.2f} ms/batch); 1-row forward {result.forward_1row_ms:.3f} ms "
        f"({result.rows_per_s_batch1:.0f} rows/s at batch 1)"
    )
    return result


def reference_output(config: Any, row: np.ndarray) -> np.ndarray:
    from serving.models import ModelRunner

    runner = ModelRunner(config, num_threads=1)
    outputs, _ = runner.run({"x": row})
    return outputs["y"]


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
        self.exit_code: int | None = None
        self.batch_counter: BatchCounter | None = None

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
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True, name=f"{self.name}-log").start()
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
        return Meters(CpuMeter(self.proc.pid if self.proc else None), self.batch_counter)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if self._logfile is not None:
                self._logfile.write(line)
                self._logfile.flush()
            self._lines.put(line)
        self._lines.put(None)

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


def gpugate_command() -> list[str]:
    script = Path(sys.executable).parent / "gpugate"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "serving.cli"]


def write_gateway_config(path: Path, model: Any, tenant_envs: list[str]) -> None:
    config = {
        "models": [model.model_dump(mode="json")],
        "tenants": [
            {"name": f"bench-{i}", "weight": 1.0, "api_key_env": env}
            for i, env in enumerate(tenant_envs)
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


# ------------------------------------------------------------------------ report


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


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _one_line(r: LevelResult) -> str:
    return (
        f"{r.system:>8} {r.protocol:<4} c={r.concurrency:<3} {r.req_per_s:8.1f} req/s  "
        f"p50 {_fmt(r.p50_ms, '.2f')} ms  p99 {_fmt(r.p99_ms, '.2f')} ms  errors {r.errors}"
        + (f" (warm-up errors {r.warmup_errors})" if r.warmup_errors else "")
        + (f"  [{r.error_sample}]" if r.error_sample else "")
    )


def add_ratios(rows: list[LevelResult]) -> None:
    peer = {r.concurrency: r.req_per_s for r in rows if r.system == "rayserve"}
    for r in rows:
        if r.system not in ("gpugate", "rayserve"):
            continue
        base = peer.get(r.concurrency)
        r.ratio_vs_peer = r.req_per_s / base if base else None


def render_table(rows: list[LevelResult], limit: InProcessResult | None) -> str:
    head = (
        f"{'system':<10} {'protocol':<8} {'conc':>4} {'req/s':>9} {'rows/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'gw/peer':>8} {'batch':>6} {'cpu':>5} "
        f"{'other':>5}"
    )
    lines = [head, "-" * len(head)]
    order = {name: i for i, name in enumerate(SYSTEMS)}
    for r in sorted(rows, key=lambda r: (r.concurrency, order.get(r.system, 9), r.protocol)):
        lines.append(
            f"{r.system:<10} {r.protocol:<8} {r.concurrency:>4} {r.req_per_s:>9.1f} "
            f"{r.rows_per_s:>9.1f} {_fmt(r.p50_ms, '.2f'):>8} {_fmt(r.p99_ms, '.2f'):>8} "
            f"{r.errors:>6} {_fmt(r.ratio_vs_peer, '.2f'):>8} {_fmt(r.mean_batch_rows, '.1f'):>6} "
            f"{_fmt(r.cpu_cores_busy, '.2f'):>5} {_fmt(r.cpu_cores_other, '.2f'):>5}"
        )
    if limit is not None:
        lines.append("-" * len(head))
        lines.append(
            f"{'in-process':<10} {'-':<8} {'-':>4} {'-':>9} {limit.rows_per_s:>9.1f} "
            f"{limit.forward_1row_ms:>8.2f} {'-':>8} {'-':>6} {'-':>8} {limit.batch_rows:>6} "
            f"{'-':>5} {'-':>5}"
            f"   (batch {limit.batch_rows}, {limit.batch_ms_median:.2f} ms/batch; p50 column "
            "= 1-row forward)"
        )
    return "\n".join(lines)


def overheads(rows: list[LevelResult], limit: InProcessResult) -> dict[str, float]:
    """At concurrency 1: p50 minus the in-process forward time of one row."""
    out = {}
    for r in rows:
        if r.system != "null" and r.concurrency == 1 and r.p50_ms is not None:
            out[f"{r.system}/{r.protocol}"] = r.p50_ms - limit.forward_1row_ms
    return out


# -------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="gpugate vs. plain Ray Serve, side by side.")
    p.add_argument("--quick", action="store_true", help="~1 s per level, levels 1 and 8 only")
    p.add_argument("--duration", type=float, help="measured seconds per level (default 10)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per level (default 2)")
    p.add_argument("--levels", help="comma-separated concurrencies (default 1,8,32,64)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per batch, all systems")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="gpugate max_queue_delay_ms and the peer's batch_wait_timeout_s (default 0: "
        "dispatch what is queued as soon as the model is free)",
    )
    p.add_argument(
        "--peer-forward",
        choices=("thread", "inline"),
        default="thread",
        help="where the peer runs the forward (see peer_rayserve.py)",
    )
    p.add_argument(
        "--peer-access-log",
        choices=("on", "off"),
        default="on",
        help="Serve's per-request access log on the peer (default on, as Serve ships)",
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="which servers to run (default all: gpugate, rayserve, and null, the load "
        "generator's ceiling against a server that runs no model)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="weights, configs and server logs (default: a temporary folder, removed after a "
        "successful run unless --keep-state)",
    )
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state folder")
    p.add_argument("--startup-timeout", type=float, default=240.0)
    p.add_argument("--json-out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = args.duration or 1.0
        args.warmup = args.warmup or 0.5
        args.levels = args.levels or "1,8"
    args.duration = args.duration or 10.0
    args.warmup = args.warmup if args.warmup is not None else 2.0
    args.levels = [int(c) for c in (args.levels or "1,8,32,64").split(",") if c.strip()]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}")
    return args


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = dt.datetime.now(dt.UTC)
    loadavg = os.getloadavg()
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gpugate-bench-")
        state_dir = Path(tmp.name)
    else:
        state_dir = args.state_dir.resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
    _log(
        f"state dir {state_dir}; levels {args.levels}; {args.warmup:g}s warm-up + "
        f"{args.duration:g}s per level"
    )
    code = 1
    try:
        # One event loop for every client: grpc.aio binds to the loop it first runs on.
        with asyncio.Runner() as loop:
            code = _run(args, state_dir, started_at, loadavg, loop)
    finally:
        if tmp is not None:
            if code == 0 and not args.keep_state:
                tmp.cleanup()
            else:
                _log(f"kept {state_dir} (server logs) for inspection")
    return code


def _run(
    args: argparse.Namespace,
    state_dir: Path,
    started_at: dt.datetime,
    loadavg: tuple[float, float, float],
    loop: asyncio.Runner,
) -> int:
    from serving.demo import bench_model_config

    git_info = git_state()  # before any server imports the code it describes
    # 1. The model, once; every system reads these weights.
    model = bench_model_config(
        state_dir,
        name=MODEL_NAME,
        version=MODEL_VERSION,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.batch_wait_ms,
        replicas=1,
        num_cpus=1.0,
    )
    row = _bench_row()
    expected = reference_output(model, row)

    # 2. In-process limit.
    limit = in_process_limit(model, 1.0 if args.quick else 5.0, _log)

    runs: dict[str, SystemRun] = {}
    rows: list[LevelResult] = []
    keys = [secrets.token_urlsafe(24) for _ in range(2)]
    taken: set[int] = set()
    failures: list[str] = []

    def measure(protocol: str, system: str, target: str, server: Server) -> list[LevelResult]:
        levels = grpc_levels if protocol == "grpc" else http_levels
        return loop.run(
            levels(
                system,
                target,
                keys,
                row,
                args.levels,
                args.warmup,
                args.duration,
                _log,
                server.meters(),
            )
        )

    def check_probe(run: SystemRun, got: np.ndarray) -> None:
        diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else None
        run.probe_max_abs_diff = diff
        run.probe_matches_reference = diff is not None and diff <= 1e-4
        if not run.probe_matches_reference:
            failures.append(f"{run.name}: output differs from the in-process forward ({diff})")

    # 3. gpugate, gRPC then HTTP.
    if "gpugate" in args.systems:
        run = runs["gpugate"] = SystemRun("gpugate")
        http_port, grpc_port, metrics_port = (free_port(taken) for _ in range(3))
        key_envs = ["GPUGATE_BENCH_KEY_A", "GPUGATE_BENCH_KEY_B"]
        config_path = state_dir / "gpugate-bench.yaml"
        write_gateway_config(config_path, model, key_envs)
        gw_state = state_dir / "gpugate-state"
        server = Server(
            "gpugate",
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
            state_dir / "gpugate.log",
            _log,
        )
        server.batch_counter = gateway_batches(f"http://127.0.0.1:{metrics_port}/metrics")
        with running(server, args.startup_timeout, run):
            target = f"127.0.0.1:{grpc_port}"
            base = f"http://127.0.0.1:{http_port}"
            check_probe(run, loop.run(grpc_probe(target, keys, row, 60)))
            check_probe(run, loop.run(http_probe(base, keys, row, 60)))
            run.levels += measure("grpc", "gpugate", target, server)
            run.levels += measure("http", "gpugate", base, server)
        rows += run.levels

    # 4. Plain Ray Serve, gRPC.
    if "rayserve" in args.systems:
        run = runs["rayserve"] = SystemRun("rayserve")
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
                str(args.max_batch_size),
                "--batch-wait-ms",
                str(args.batch_wait_ms),
                "--forward",
                args.peer_forward,
                "--access-log",
                args.peer_access_log,
            ],
            child_env({}),
            "rayserve-peer ready",
            state_dir / "rayserve.log",
            _log,
        )
        server.batch_counter = peer_batches(f"http://127.0.0.1:{http_port}/bench")
        with running(server, args.startup_timeout, run):
            target = f"127.0.0.1:{grpc_port}"
            check_probe(run, loop.run(grpc_probe(target, keys, row, 60)))
            run.levels += measure("grpc", "rayserve", target, server)
        rows += run.levels

    # Calibration: the same client against a server that runs no model.
    if "null" in args.systems:
        run = runs["null"] = SystemRun("null")
        grpc_port = free_port(taken)
        server = Server(
            "null",
            [sys.executable, str(NULL_SCRIPT), "--grpc-port", str(grpc_port)],
            child_env({}),
            "null-server ready",
            state_dir / "null.log",
            _log,
        )
        with running(server, args.startup_timeout, run):
            target = f"127.0.0.1:{grpc_port}"
            loop.run(grpc_probe(target, keys, row, 30))
            run.levels += measure("grpc", "null", target, server)
        rows += run.levels

    add_ratios(rows)
    over = overheads(rows, limit)
    table = render_table(rows, limit)
    print()
    print(
        f"gpugate vs. plain Ray Serve -- {started_at:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
        f"1 row per request, max_batch_size {args.max_batch_size}, batch wait "
        f"{args.batch_wait_ms:g} ms, {args.warmup:g}s warm-up + {args.duration:g}s per level"
    )
    print(table)
    print("gw/peer = req/s of the row / req/s of rayserve grpc at the same concurrency")
    print("batch = mean rows per model batch in the window, from the server's own counters")
    print(
        "cpu = cores busy machine-wide in the measured window (of "
        f"{os.cpu_count()}); other = cores used by processes outside this benchmark"
    )
    if "null" in runs:
        print("null = the load generator against a gRPC server that runs no model (ceiling)")
    for name, ms in over.items():
        label = "gateway" if name.startswith("gpugate") else "peer"
        print(
            f"{label} p50 minus forward time at concurrency 1 ({name}): {ms:.2f} ms "
            f"(1-row forward {limit.forward_1row_ms:.3f} ms)"
        )
    for name, run in runs.items():
        if run.exit_code not in (0, None):
            failures.append(f"{name} exited with {run.exit_code} after SIGTERM")
    for failure in failures:
        print(f"PROBLEM: {failure}")

    if args.json_out is not None:
        report = {
            "date": started_at.isoformat(timespec="seconds"),
            "machine": machine(loadavg),
            "versions": versions(),
            "git": git_info,
            "settings": {
                "quick": args.quick,
                "levels": args.levels,
                "warmup_s": args.warmup,
                "duration_s": args.duration,
                "max_batch_size": args.max_batch_size,
                "batch_wait_ms": args.batch_wait_ms,
                "peer_forward": args.peer_forward,
                "peer_access_log": args.peer_access_log,
                "rows_per_request": 1,
                "model": {
                    "class": model.model_class,
                    "kwargs": dict(model.model_kwargs),
                    "inputs": [t.model_dump() for t in model.inputs],
                    "outputs": [t.model_dump() for t in model.outputs],
                },
            },
            "in_process": asdict(limit),
            "systems": {
                name: {k: v for k, v in asdict(run).items() if k != "levels"}
                for name, run in runs.items()
            },
            "rows": [asdict(r) for r in rows],
            "p50_minus_forward_ms_at_c1": over,
            "problems": failures,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        _log(f"wrote {args.json_out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
