"""The closed-loop load generator and its statistics, independent of the protocol.

``concurrency`` workers each send their next request when the last returns; only
requests that complete inside the measured window (after the warm-up) count.
Each level becomes a :class:`LevelResult`: req/s, latency percentiles, errors,
the CPU cores busy in the window (:class:`CpuMeter`) and the server's mean rows
per model batch (from a :data:`BatchCounter`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from procmem import TITLE as SERVE_TITLE  # a neighbour: this folder is on sys.path
from procmem import proc_stats

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
    ratio_vs_peer: float | None = None  # req/s over plain Ray Serve's (gRPC), same concurrency
    ratio_vs_triton: float | None = None  # over Triton's, same protocol and concurrency
    share_of_limit: float | None = None  # rows/s over the in-process limit
    # Cores busy in the measured window: the whole machine, this benchmark (load
    # generator + the server's process session), and everything else.
    cpu_cores_busy: float | None = None
    cpu_cores_bench: float | None = None
    cpu_cores_other: float | None = None
    # Of cpu_cores_bench, by part: "load generator" (this process and its children),
    # each Serve deployment by name ("gateway" summed over its replicas, "model-...",
    # "control"), and "ray and driver" (the rest of the server's session).
    cpu_cores_by_part: dict[str, float] | None = None
    # Rows per model batch in the window, from the server's own counters.
    mean_batch_rows: float | None = None
    # Mean ms per request in the window of each part in STAGES (server's statistics).
    stage_ms: dict[str, float] | None = None
    # Several gateways: requests each one answered in the window (its own metrics), to
    # show how the kernel spread the client's connections over them.
    gateway_requests: list[int] | None = None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def one_line(r: LevelResult) -> str:
    return (
        f"{r.system:>8} {r.protocol:<4} c={r.concurrency:<3} {r.req_per_s:8.1f} req/s  "
        f"p50 {fmt(r.p50_ms, '.2f')} ms  p99 {fmt(r.p99_ms, '.2f')} ms  errors {r.errors}"
        + (f" (warm-up errors {r.warmup_errors})" if r.warmup_errors else "")
        + (f"  [{r.error_sample}]" if r.error_sample else "")
    )


# ------------------------------------------------------------------------- meters


class CpuMeter:
    """CPU seconds used by the machine and by this benchmark, from /proc (Linux).

    "This benchmark" is this process plus every process in the server's session
    (servers start with ``start_new_session``, and Ray's raylet, GCS and workers
    inherit the session) and the descendants of all of those. The rest is other
    work on the machine -- another test run, say -- which the table
    shows so a noisy run is visible.
    """

    def __init__(self, session: int | None) -> None:
        self.session = session
        self.tick = float(os.sysconf("SC_CLK_TCK"))
        self.available = Path("/proc/stat").is_file()

    def snapshot(self) -> tuple[float, float, dict[str, float]] | None:
        """(CPU seconds of the machine, of this benchmark, of this benchmark by part)."""
        if not self.available:
            return None
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest is inside user).
        busy = sum(fields[:3]) + sum(fields[5:8])
        procs = {  # pid -> (ppid, session, ticks)
            pid: (int(rest[1]), int(rest[3]), int(rest[11]) + int(rest[12]))
            for pid, rest in proc_stats().items()
        }
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)

        def with_descendants(roots: set[int]) -> set[int]:
            found, stack = set(roots), list(roots)
            while stack:
                for child in children.get(stack.pop(), []):
                    if child not in found:
                        found.add(child)
                        stack.append(child)
            return found

        # The server's session, plus descendants that started a session of their own
        # (PyTriton starts tritonserver that way), and this process's children. The
        # server is one of those children, so the load generator is what is left.
        server = with_descendants({p for p, (_, sid, _) in procs.items() if sid == self.session})
        generator = with_descendants({os.getpid()}) - server
        parts: dict[str, float] = {}
        for pid in generator | server:
            if pid not in procs:
                continue
            part = "load generator" if pid in generator else _serve_part(pid)
            parts[part] = parts.get(part, 0.0) + procs[pid][2] / self.tick
        return busy / self.tick, sum(parts.values()), parts


def _serve_part(pid: int) -> str:
    """A server process's part: its Serve deployment (from the title Ray gives a replica,
    ``ray::ServeReplica:<app>:<deployment>``), or "ray and driver"."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "ray and driver"
    if SERVE_TITLE not in title:
        return "ray and driver"
    return title.split(SERVE_TITLE, 1)[1].split()[0].split(".")[0].rsplit(":", 1)[-1]


# Cumulative (batches, rows) the server has run so far, or None if unknown.
BatchCounter = Callable[[], "tuple[float, float] | None"]
# Cumulative (count, ns) per part of a request's time inside the server, from its own
# statistics extension (Triton's /v2/models/{m}/stats), or None if unknown.
StageCounter = Callable[[], "dict[str, tuple[int, int]] | None"]
STAGES = ("success", "queue", "compute_input", "compute_infer", "compute_output")
# Cumulative requests answered by each gateway of a server, or None if unknown.
GatewayCounter = Callable[[], "list[float] | None"]


@dataclass
class Meters:
    """What is sampled at the start and end of each measured window."""

    cpu: CpuMeter | None = None
    batches: BatchCounter | None = None
    stages: StageCounter | None = None
    gateways: GatewayCounter | None = None


CpuSnapshot = tuple[float, float, dict[str, float]]


def cpu_window(
    before: CpuSnapshot | None, after: CpuSnapshot | None, seconds: float
) -> tuple[float | None, float | None, float | None, dict[str, float] | None]:
    if before is None or after is None or seconds <= 0:
        return None, None, None, None
    busy = (after[0] - before[0]) / seconds
    bench = (after[1] - before[1]) / seconds
    # A part's processes that started or ended inside the window count only their share.
    parts = {
        part: round(max(0.0, ticks - before[2].get(part, 0.0)) / seconds, 3)
        for part, ticks in sorted(after[2].items())
    }
    return busy, bench, max(0.0, busy - bench), parts


# ---------------------------------------------------------------------- the loop


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
        self.cpu_before: CpuSnapshot | None = None
        self.cpu_after: CpuSnapshot | None = None
        self.batches_before: tuple[float, float] | None = None
        self.batches_after: tuple[float, float] | None = None
        self.stages_before: dict[str, tuple[int, int]] | None = None
        self.stages_after: dict[str, tuple[int, int]] | None = None
        self.gateways_before: list[float] | None = None
        self.gateways_after: list[float] | None = None

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


@dataclass(frozen=True)
class LoadPlan:
    """How every system is driven: the same keys, row, levels and windows."""

    keys: list[str]
    row: np.ndarray
    levels: list[int]
    warmup_s: float
    duration_s: float
    log: Callable[[str], None]
    # gRPC connections the load is spread over (kserve_client.grpc_channel_pool).
    grpc_channels: int = 16


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

    async def sample() -> tuple[
        CpuSnapshot | None,
        tuple[float, float] | None,
        dict[str, tuple[int, int]] | None,
        list[float] | None,
    ]:
        assert meters is not None
        cpu = meters.cpu.snapshot() if meters.cpu is not None else None
        batches = await asyncio.to_thread(meters.batches) if meters.batches else None
        stages = await asyncio.to_thread(meters.stages) if meters.stages else None
        gateways = await asyncio.to_thread(meters.gateways) if meters.gateways else None
        return cpu, batches, stages, gateways

    async def watch() -> None:
        if meters is None:
            return
        await asyncio.sleep(max(0.0, rec.window_start - time.perf_counter()))
        rec.cpu_before, rec.batches_before, rec.stages_before, rec.gateways_before = await sample()
        await asyncio.sleep(max(0.0, rec.window_end - time.perf_counter()))
        rec.cpu_after, rec.batches_after, rec.stages_after, rec.gateways_after = await sample()

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


def _stage_means(
    before: dict[str, tuple[int, int]] | None, after: dict[str, tuple[int, int]] | None
) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    means = {}
    for stage in STAGES:
        count = after[stage][0] - before[stage][0]
        if count > 0:
            means[stage] = (after[stage][1] - before[stage][1]) / count / 1e6
    return means or None


def summarize(
    rec: Recorder, system: str, protocol: str, concurrency: int, duration_s: float
) -> LevelResult:
    lat = np.sort(np.asarray(rec.latencies_ns, dtype=np.float64)) / 1e6
    n = len(lat)

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q)) if n else None

    busy, bench, other, parts = cpu_window(rec.cpu_before, rec.cpu_after, duration_s)
    mean_batch = None
    if rec.batches_before is not None and rec.batches_after is not None:
        batches = rec.batches_after[0] - rec.batches_before[0]
        if batches > 0:
            mean_batch = (rec.batches_after[1] - rec.batches_before[1]) / batches
    gateways = None
    if rec.gateways_before is not None and rec.gateways_after is not None:
        gateways = [
            round(a - b) for a, b in zip(rec.gateways_after, rec.gateways_before, strict=True)
        ]
    return LevelResult(
        stage_ms=_stage_means(rec.stages_before, rec.stages_after),
        gateway_requests=gateways,
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
        cpu_cores_by_part=parts,
        mean_batch_rows=mean_batch,
    )


async def measure_level(
    send: SendFn,
    system: str,
    protocol: str,
    concurrency: int,
    plan: LoadPlan,
    meters: Meters | None,
) -> LevelResult:
    """One concurrency level of ``plan``: run the loop, summarize it, log one line."""
    rec = await closed_loop(send, concurrency, plan.warmup_s, plan.duration_s, meters)
    result = summarize(rec, system, protocol, concurrency, plan.duration_s)
    plan.log(one_line(result))
    return result


# ---------------------------------------------------------------- noisy neighbour


@dataclass
class NoisyResult:
    """A light tenant's latency alone and beside a heavy tenant, on one system."""

    system: str
    protocol: str
    light_rate: float
    heavy_concurrency: int
    duration_s: float
    light_alone: LevelResult
    light_beside: LevelResult
    heavy: LevelResult
    # gpugate: the light tenant's mean time inside the gateway (from its own metrics, the
    # phase's warm-up included); the rest of its latency is the door, the network, the client.
    light_inside_alone_ms: float | None = None
    light_inside_beside_ms: float | None = None

    @property
    def p99_ratio(self) -> float | None:
        a, b = self.light_alone.p99_ms, self.light_beside.p99_ms
        return b / a if a and b is not None else None


class _BySendTime(Recorder):
    """Open loop: a request belongs to the window it was sent in, however late it returns."""

    def record(self, started: float, finished: float, error: str | None) -> None:
        if started < self.window_start:
            self.warmup_requests += 1
            self.warmup_errors += error is not None
        elif started >= self.window_end:
            return
        elif error is not None:
            self.errors += 1
            self.error_sample = self.error_sample or error
        else:
            self.latencies_ns.append(round((finished - started) * 1e9))


async def open_loop(send: SendFn, rate: float, warmup_s: float, duration_s: float) -> Recorder:
    """Requests at a fixed rate, each on its own task, whatever the server's latency."""
    rec = _BySendTime()
    start = time.perf_counter()
    rec.window_start = start + warmup_s
    rec.window_end = rec.window_start + duration_s
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int) -> None:
        started = time.perf_counter()
        try:
            error = await send(index)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        rec.record(started, time.perf_counter(), error)

    index = 0
    while True:
        due = start + index / rate
        if due >= rec.window_end:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        task = asyncio.create_task(one(index))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
    if tasks:
        # Late answers still count: their latency is the point of this measurement.
        await asyncio.wait(set(tasks), timeout=60)
    return rec


# Runs the light tenant for one phase (warm-up + window) and returns its figures.
LightFn = Callable[[], Awaitable[LevelResult]]


async def noisy_neighbour(
    light: LightFn,
    send_heavy: SendFn,
    system: str,
    protocol: str,
    light_rate: float,
    heavy_concurrency: int,
    plan: LoadPlan,
) -> NoisyResult:
    """The light tenant alone, then beside ``heavy_concurrency`` requests of the heavy
    tenant always in flight (closed loop, started a warm-up earlier and kept up until the
    light tenant's second phase is over)."""
    alone = await light()
    rec = Recorder()
    rec.window_start = time.perf_counter() + plan.warmup_s
    stop = asyncio.Event()

    async def worker(index: int) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                error = await send_heavy(index)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            rec.record(started, time.perf_counter(), error)

    workers = [asyncio.create_task(worker(i)) for i in range(heavy_concurrency)]
    try:
        await asyncio.sleep(plan.warmup_s)
        beside = await light()
    finally:
        rec.window_end = time.perf_counter()
        stop.set()
        _, pending = await asyncio.wait(workers, timeout=40)
        for task in pending:
            task.cancel()
    result = NoisyResult(
        system=system,
        protocol=protocol,
        light_rate=light_rate,
        heavy_concurrency=heavy_concurrency,
        duration_s=plan.duration_s,
        light_alone=alone,
        light_beside=beside,
        heavy=summarize(
            rec, system, protocol, heavy_concurrency, rec.window_end - rec.window_start
        ),
    )
    plan.log(
        f"{system:>8} {protocol:<4} noisy-neighbour: light p99 alone "
        f"{fmt(result.light_alone.p99_ms, '.2f')} ms, beside heavy "
        f"{fmt(result.light_beside.p99_ms, '.2f')} ms ({fmt(result.p99_ratio, '.2f')}x); heavy "
        f"{result.heavy.req_per_s:.1f} req/s, errors light {result.light_alone.errors}+"
        f"{result.light_beside.errors} heavy {result.heavy.errors}"
    )
    return result
