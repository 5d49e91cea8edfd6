"""Soak: does memory stay flat under steady load?

Starts ``gpugate serve`` on free ports with a temporary state folder and the bench
model (``systems.gpugate_system``, as ``bench.py`` does), drives closed-loop gRPC load
(``loadgen.closed_loop``, 1 row per request, two tenants' keys in turn) for a warm-up
and then ``--minutes``, and every ``--every-minutes`` prints the median resident set
size (``VmRSS`` from ``/proc/<pid>/status``, read every ``--sample-seconds``) of each
Ray Serve replica -- the gateway and
each model replica, found among the serve process's descendants by the title Ray gives
them (``ray::ServeReplica:<app>:<deployment>``) -- beside the requests served. At the
end: each replica's growth since the end of the warm-up. The exit code is 1 if any
replica grew more than ``--max-growth-mb``, was replaced (a new PID resets its memory),
or the server did not exit cleanly, and 2 on bad arguments.

    make soak                                     # 2 min warm-up + 30 min, c=32
    make soak SOAK_ARGS="--minutes 10 --every-minutes 1"
    .venv/bin/python loadtests/soak.py --minutes 10 --trace   # + tracemalloc reports

The /proc readings are in ``procmem.py``. ``--trace`` puts ``soak_probe/`` on the
server's ``PYTHONPATH``: its ``sitecustomize`` makes every Serve replica write, at each
sample after the warm-up, what grew since: with ``--trace gc`` the collector's figures
and the object types it tracks (about full speed); with ``--trace`` (``malloc``) also
tracemalloc's allocation sites, which slows the replicas several times over: use it to
find a leak, not to measure one. Reports go to ``<state>/trace/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inprocess import bench_row
from kserve_client import (
    MODEL_NAME,
    MODEL_VERSION,
    _grpc_metadata,
    _grpc_request,
    grpc_probe,
    grpc_sender,
)
from loadgen import LevelResult, closed_loop, summarize
from procmem import RssTrace, mappings_mb, replicas
from systems import SystemRun, gpugate_system, running

PROBE_DIR = Path(__file__).resolve().parent / "soak_probe"
# ------------------------------------------------------------------- samples


@dataclass
class Sample:
    minute: float  # since the end of the warm-up; negative: during it
    requests: int  # successful, since the load started
    errors: int
    req_per_s: float  # in the interval that ended here
    p50_ms: float | None
    p99_ms: float | None
    # Per process: the median of the interval's RSS readings, and their lowest and highest.
    rss_mb: dict[int, float | None] = field(default_factory=dict)
    rss_span_mb: dict[int, tuple[float, float] | None] = field(default_factory=dict)
    # Per process: resident MB per mapping (see mappings_mb), for where growth sits.
    mappings_mb: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class Process:
    pid: int
    name: str
    growth_mb: float | None = None
    mb_per_min: float | None = None
    # The last minute's median minus that of the minute around half-time: whether the
    # growth goes on, or was settling after the warm-up.
    second_half_mb: float | None = None


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _fmt_mb(value: float | None) -> str:
    return "gone" if value is None else f"{value:.1f}"


def _line(sample: Sample, procs: dict[int, Process]) -> str:
    def rss(pid: int) -> str:
        span = sample.rss_span_mb.get(pid)
        within = f" ({span[0]:.1f}-{span[1]:.1f})" if span else ""
        return f"{procs[pid].name} {_fmt_mb(sample.rss_mb.get(pid))}{within} MB"

    rss_all = "  ".join(rss(pid) for pid in procs)
    p99 = "-" if sample.p99_ms is None else f"{sample.p99_ms:.1f}"
    return (
        f"t={sample.minute:+6.1f} min  requests {sample.requests:,} "
        f"({sample.req_per_s:,.0f} req/s, p99 {p99} ms, errors {sample.errors})  RSS {rss_all}"
    )


def table(samples: list[Sample], procs: dict[int, Process]) -> str:
    """One row per replica: its median RSS in each interval (MB), the growth after
    the warm-up."""
    heads = [
        "process",
        "pid",
        *(f"{s.minute:+g} min" for s in samples),
        "growth",
        "MB/min",
        "2nd half",
    ]
    rows = [heads]
    for pid, p in procs.items():
        rows.append(
            [
                p.name,
                str(pid),
                *(_fmt_mb(s.rss_mb.get(pid)) for s in samples),
                "-" if p.growth_mb is None else f"{p.growth_mb:+.1f}",
                "-" if p.mb_per_min is None else f"{p.mb_per_min:+.3f}",
                "-" if p.second_half_mb is None else f"{p.second_half_mb:+.1f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


def mapping_changes(samples: list[Sample]) -> dict[int, dict[str, list[float]]]:
    """Per process, [after the warm-up, at the end] resident MB of each mapping that held
    at least 0.1 MB at either (the JSON's record; every mapping of every sample is bulky)."""
    base = next((s for s in samples if s.minute >= -1e-9), samples[0])
    out: dict[int, dict[str, list[float]]] = {}
    for pid, before in base.mappings_mb.items():
        after = samples[-1].mappings_mb.get(pid, {})
        out[pid] = {
            k: [round(before.get(k, 0.0), 3), round(after.get(k, 0.0), 3)]
            for k in sorted(before.keys() | after.keys())
            if max(before.get(k, 0.0), after.get(k, 0.0)) >= 0.1
        }
    return out


def where_it_grew(samples: list[Sample], procs: dict[int, Process], top: int = 4) -> str:
    """Per replica, the mappings whose resident size changed most after the warm-up."""
    base = next((s for s in samples if s.minute >= -1e-9), samples[0])
    lines = ["resident MB by mapping, change after the warm-up (largest first):"]
    for pid, p in procs.items():
        before, after = base.mappings_mb.get(pid, {}), samples[-1].mappings_mb.get(pid, {})
        diffs = sorted(
            ((after.get(k, 0.0) - before.get(k, 0.0), k) for k in before.keys() | after.keys()),
            key=lambda d: -abs(d[0]),
        )
        parts = [f"{k.rsplit('/', 1)[-1]} {d:+.1f}" for d, k in diffs[:top] if abs(d) >= 0.05]
        lines.append(f"  {p.name}: " + (", ".join(parts) or "no change"))
    return "\n".join(lines)


# ---------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="gpugate's memory under sustained gRPC load.")
    p.add_argument("--minutes", type=float, default=30.0, help="after the warm-up (default 30)")
    p.add_argument(
        "--every-minutes", type=float, default=5.0, help="RSS sampling interval (default 5)"
    )
    p.add_argument(
        "--warmup-minutes",
        type=float,
        default=2.0,
        help="load before the baseline sample that growth is counted from (default 2)",
    )
    p.add_argument(
        "--sample-seconds",
        type=float,
        default=10.0,
        help="RSS reading interval; each printed figure is a median of these (default 10)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    p.add_argument(
        "--max-growth-mb",
        type=float,
        default=5.0,
        help="fail if a replica's RSS grew more than this after the warm-up (default 5)",
    )
    p.add_argument(
        "--grpc-server",
        choices=("auto", "native", "grpcio"),
        help="gpugate's server.grpc_server (default: the gateway's own)",
    )
    p.add_argument(
        "--replica-transport",
        choices=("direct", "grpc", "actor"),
        help="gpugate's server.replica_transport (default: the gateway's own)",
    )
    p.add_argument(
        "--trace",
        nargs="?",
        const="malloc",
        choices=("malloc", "gc"),
        help="reports from every replica into <state>/trace: malloc = tracemalloc's growing "
        "allocation sites and live object types (slow); gc = the collector's figures and "
        "the types of all objects it tracks, garbage included (about full speed)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="weights, config, server log (default: a temporary folder, removed after a "
        "passing run unless --keep-state)",
    )
    p.add_argument("--keep-state", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=240.0)
    p.add_argument("--json-out", type=Path, help="write the samples and growth as JSON here")
    args = p.parse_args(argv)
    if min(args.minutes, args.every_minutes, args.sample_seconds) <= 0 or args.warmup_minutes < 0:
        p.error(
            "--minutes, --every-minutes and --sample-seconds must be positive, "
            "--warmup-minutes not negative"
        )
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM, and SIGINT where a shell started this in the background with it ignored,
    # end the run through the same path as Ctrl-C: the server is stopped by PID.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    tmp: Path | None = None
    if args.state_dir is None:
        tmp = state_dir = Path(tempfile.mkdtemp(prefix="gpugate-soak-"))
    else:
        state_dir = args.state_dir.resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
    code = 1
    try:
        # One event loop for every client: grpc.aio binds to the loop it first runs on.
        with asyncio.Runner() as loop:
            code = _run(args, state_dir, loop)
    finally:
        if tmp is not None:
            if code == 0 and not args.keep_state:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                _log(f"kept {state_dir} (server log{', traces' if args.trace else ''})")
    return code


def _run(args: argparse.Namespace, state_dir: Path, loop: asyncio.Runner) -> int:
    from serving.demo import bench_model_config

    model = bench_model_config(
        state_dir,
        name=MODEL_NAME,
        version=MODEL_VERSION,
        max_batch_size=32,
        max_queue_delay_ms=0,
        replicas=1,
        num_cpus=1.0,
    )
    row = bench_row()
    keys = [secrets.token_urlsafe(24) for _ in range(2)]
    settings = {"grpc_server": args.grpc_server, "replica_transport": args.replica_transport}
    server, target, _ = gpugate_system(state_dir, model, keys, set(), _log, settings)
    trace_dir = state_dir / "trace"
    if args.trace:
        trace_dir.mkdir(exist_ok=True)
        path = os.pathsep.join(filter(None, [str(PROBE_DIR), server.env.get("PYTHONPATH")]))
        server.env.update(
            PYTHONPATH=path,
            GPUGATE_SOAK_TRACE_DIR=str(trace_dir),
            GPUGATE_SOAK_TRACE_MODE=args.trace,
        )
    run = SystemRun("gpugate")
    samples: list[Sample] = []
    procs: dict[int, Process] = {}
    with running(server, args.startup_timeout, run):
        assert server.proc is not None
        loop.run(grpc_probe(target, keys, row, 60))
        found = replicas(server.proc.pid)
        if not found:
            _log("no Serve replica found among the server's processes")
            return 1
        procs = {pid: Process(pid, name) for pid, name in sorted(found.items(), key=lambda x: x[1])}
        _log(
            f"load: c={args.concurrency} gRPC, {args.warmup_minutes:g} min warm-up + "
            f"{args.minutes:g} min; replicas: "
            + ", ".join(f"{p.name} (pid {pid})" for pid, p in procs.items())
        )
        rss = loop.run(_drive(args, target, keys, row, procs, samples, trace_dir))
    problems = _judge(args, samples, procs, rss, run)
    print()
    print(
        f"RSS (MB) per Serve replica, c={args.concurrency} gRPC closed loop, "
        f"{samples[-1].requests:,} requests, {os.cpu_count()} CPUs; t=0 is the end of the "
        f"{args.warmup_minutes:g} min warm-up"
    )
    print(table(samples, procs))
    measured = [s for s in samples if s.minute > 0]
    if measured:
        total = measured[-1].requests - samples[0].requests
        minutes = measured[-1].minute
        print(
            f"after warm-up: {total:,} requests in {minutes:g} min, "
            f"{total / minutes / 60:,.0f} req/s"
        )
    print(where_it_grew(samples, procs))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpus": os.cpu_count(),
            "samples": [
                {k: v for k, v in asdict(s).items() if k != "mappings_mb"} for s in samples
            ],
            "rss_readings": [{"minute": m, "rss_mb": r} for m, r in rss.readings],
            "mappings_mb": mapping_changes(samples),
            "processes": [asdict(p) for p in procs.values()],
            "server_exit_code": run.exit_code,
            "problems": problems,
        }
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    if args.trace:
        _log(f"tracemalloc reports: {trace_dir}")
    return 1 if problems else 0


async def _drive(
    args: argparse.Namespace,
    target: str,
    keys: list[str],
    row: Any,
    procs: dict[int, Process],
    samples: list[Sample],
    trace_dir: Path,
) -> RssTrace:
    """The warm-up, then one closed-loop window per interval, a sample after each."""
    import grpc
    from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

    request = _grpc_request(row)
    requests = errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        senders = [grpc_sender(stub, request, meta) for meta in _grpc_metadata(keys)]

        async def send(index: int) -> str | None:
            return await senders[index % len(senders)](index)

        windows = [args.warmup_minutes] if args.warmup_minutes > 0 else []
        left = args.minutes
        while left > 1e-9:
            windows.append(min(args.every_minutes, left))
            left -= windows[-1]
        minute = -args.warmup_minutes
        rss = RssTrace(
            list(procs), time.monotonic() + args.warmup_minutes * 60, args.sample_seconds
        )
        with rss:
            if args.warmup_minutes == 0:  # the baseline: before any load
                samples.append(_sample(rss, 0.0, 0.0, 0, 0, None, procs, trace_dir, 0))
            for window in windows:
                rec = await closed_loop(send, args.concurrency, 0.0, window * 60)
                result = summarize(rec, "gpugate", "grpc", args.concurrency, window * 60)
                requests += result.requests
                errors += result.errors
                if result.error_sample:
                    _log(f"{result.errors} errors in the interval, e.g. {result.error_sample}")
                since, minute = minute, minute + window
                samples.append(
                    _sample(
                        rss, since, minute, requests, errors, result, procs, trace_dir, len(samples)
                    )
                )
                _log(_line(samples[-1], procs))
    return rss


def _sample(
    rss: RssTrace,
    since: float,
    minute: float,
    requests: int,
    errors: int,
    result: LevelResult | None,
    procs: dict[int, Process],
    trace_dir: Path,
    index: int,
) -> Sample:
    if trace_dir.is_dir():
        # Each replica's probe reports what grew since the first mark (soak_probe/).
        (trace_dir / f"mark-{index}").touch()
    return Sample(
        minute,
        requests,
        errors,
        result.req_per_s if result else 0.0,
        result.p50_ms if result else None,
        result.p99_ms if result else None,
        {pid: rss.median(pid, since, minute) for pid in procs},
        {pid: rss.span(pid, since, minute) for pid in procs},
        {pid: mappings_mb(pid) for pid in procs},
    )


def _judge(
    args: argparse.Namespace,
    samples: list[Sample],
    procs: dict[int, Process],
    rss: RssTrace,
    run: SystemRun,
) -> list[str]:
    """Growth: the median RSS of the last minute minus that of the first minute after
    the warm-up (or of each half, for a shorter run)."""
    problems = []
    end = samples[-1].minute
    window = min(1.0, end / 2)
    for pid, p in procs.items():
        before, after = rss.median(pid, 0.0, window), rss.median(pid, end - window, end)
        if before is None or after is None:
            problems.append(f"{p.name} (pid {pid}) exited during the soak")
            continue
        p.growth_mb = after - before
        middle = rss.median(pid, (end - window) / 2, (end + window) / 2)
        p.second_half_mb = None if middle is None else after - middle
        if end > window:
            p.mb_per_min = p.growth_mb / (end - window)
        if p.growth_mb > args.max_growth_mb:
            problems.append(
                f"{p.name} grew {p.growth_mb:.1f} MB after the warm-up "
                f"(limit {args.max_growth_mb:g} MB)"
            )
    if samples[-1].requests == 0:
        problems.append("no request succeeded")
    if run.exit_code != 0:
        problems.append(f"the server exited with {run.exit_code} after SIGTERM")
    return problems


if __name__ == "__main__":
    sys.exit(main())
