"""Side-by-side benchmark: gpugate vs. plain Ray Serve vs. Triton, one run, one machine.

1. Prepare the bench model once (``serving.demo.bench_model_config``: BenchMLP,
   input "x" FP32 [256], output "y" FP32 [128]) with ``max_batch_size`` 32 for
   every system.
2. In-process limit: :class:`serving.replica.ModelRunner`, 1 torch thread, full
   batches of 32 rows (rows/s) and the forward time of one row.
3. gpugate: ``gpugate serve`` as a subprocess on free ports, two config tenants
   whose keys are passed in environment variables; load over gRPC and HTTP.
   On request (``--systems gpugate,gpugate-2gw``) the same with two gateway
   replicas sharing the ports (``server.gateway_replicas: 2``), whose batch
   counters are read from both gateways' metrics ports.
4. Plain Ray Serve peer: ``loadtests/peer_rayserve.py`` as a subprocess (Serve's
   own gRPC proxy + ``@serve.batch``); load over gRPC.
4b. NVIDIA Triton peer: ``loadtests/peer_triton.py`` (PyTriton, Triton's own
   dynamic batcher) under its own venv (``triton_venv.py``, built on demand);
   load over gRPC and HTTP.
5. One load generator for all: closed loop in this process, 1 row per request,
   KServe v2 ``ModelInfer`` with ``raw_input_contents`` over ``grpc.aio`` through
   a pool of channels, each on its own connection (or the binary-tensor HTTP/REST
   form over aiohttp, a connection per worker), at each concurrency a warm-up and
   then a fixed measured window.
6. One table (and ``--json-out``): req/s, rows/s, p50, p99, errors and the
   gateway/peer throughput ratio at each concurrency, plus the mean rows per
   model batch (from each server's own counters) and the cores busy in the
   window -- machine-wide and outside this benchmark, so a run disturbed by
   other work on the machine shows as such.
6b. Noisy neighbour (gRPC, every model server): a light tenant at a modest fixed
   rate alone, then beside a heavy tenant that keeps many requests in flight;
   the light tenant's p50/p99 in both phases (a second table).
7. Calibration ("null"): ``loadtests/null_server.py``, a grpc.aio server that
   runs no model, driven the same way -- the most this client can do here --
   and put through the noisy-neighbour scenario too: a server that does no
   work but isolates no tenant, saturated by the same heavy client.

    python loadtests/bench.py                       # full run, a few minutes
    python loadtests/bench.py --quick --json-out /tmp/bench.json

This file holds the CLI, the order of the steps above and the JSON output; the
pieces sit next to it and are imported as top-level modules (a script's own
folder is on ``sys.path``): ``report.py`` (the tables and headline figures),
``loadgen.py`` (closed loop, latency and CPU stats),
``kserve_client.py`` (KServe v2 gRPC/HTTP encoders, decoders, probes, drivers),
``systems.py`` (the server subprocesses and their configs) and ``inprocess.py``
(the bench row, its reference output and the in-process limit), and
``provenance.py`` (what a run was measured on: versions, commit, machine).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from inprocess import bench_row, in_process_limit, reference_output
from kserve_client import (
    MODEL_NAME,
    MODEL_VERSION,
    grpc_levels,
    grpc_noisy,
    grpc_probe,
    http_levels,
    http_probe,
)
from loadgen import LevelResult, LoadPlan, NoisyResult
from provenance import git_state, machine, server_version, versions
from report import (
    DEFAULT_SYSTEMS,
    GATEWAYS,
    SYSTEMS,
    add_ratios,
    cpu_parts,
    gateway_spread,
    headline,
    overheads,
    overheads_in_window,
    render_noisy,
    render_stages,
    render_table,
)
from systems import (
    Server,
    SystemRun,
    gpugate_system,
    in_state_dir,
    null_system,
    peer_system,
    running,
    triton_system,
)
from triton_venv import DEFAULT_VENV as DEFAULT_TRITON_VENV
from triton_venv import ensure as ensure_triton_venv
from triton_venv import is_built as triton_venv_built

# -------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="gpugate vs. plain Ray Serve, side by side.")
    p.add_argument("--quick", action="store_true", help="~1 s per level, levels 1 and 8 only")
    p.add_argument("--duration", type=float, help="measured seconds per level (default 10)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per level (default 2)")
    p.add_argument("--levels", help="comma-separated concurrencies (default 1,8,32,64)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per batch, all systems")
    p.add_argument(
        "--replica-transport",
        choices=("direct", "grpc", "actor"),
        default="direct",
        help="gpugate's server.replica_transport (how batches reach the model replica)",
    )
    p.add_argument(
        "--grpc-server",
        choices=("auto", "native", "grpcio"),
        default="auto",
        help="gpugate's server.grpc_server (which implementation serves its gRPC port)",
    )
    p.add_argument(
        "--gc-tuning",
        choices=("on", "off"),
        help="gpugate's server.gc_tuning (default: the gateway's own default, on)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="gpugate max_queue_delay_ms and the peer's batch_wait_timeout_s (default 0: "
        "dispatch what is queued as soon as the model is free)",
    )
    p.add_argument(
        "--latency-lane-rows",
        type=int,
        default=None,
        help="gpugate's models[].latency_lane_rows (0 = no latency lane; default: the "
        "gateway's own default)",
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
        default=",".join(DEFAULT_SYSTEMS),
        help=f"which servers to run, of {', '.join(SYSTEMS)} (default: %(default)s; null is "
        "the load generator's ceiling against a server that runs no model; gpugate-2gw is "
        "gpugate with two gateway replicas sharing its ports)",
    )
    p.add_argument(
        "--grpc-channels",
        type=int,
        default=16,
        help="gRPC connections the load generator spreads its calls over, for every system "
        "(a channel each; worker i on channel (i // 2) %% N; default %(default)s: 4 calls "
        "each at c=64). Gateways that share a port are picked per connection, so 1 would "
        "pin the load to one of them, and a few split it unevenly",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="weights, configs and server logs (default: a temporary folder, removed after a "
        "successful run unless --keep-state)",
    )
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state folder")
    p.add_argument(
        "--triton-venv",
        type=Path,
        default=DEFAULT_TRITON_VENV,
        help="the Triton peer's virtual environment, built here if missing (not with --quick, "
        "which then skips Triton) (default: %(default)s)",
    )
    p.add_argument(
        "--noisy",
        choices=("on", "off"),
        default="on",
        help="run the noisy-neighbour scenario on every model server (default on)",
    )
    p.add_argument(
        "--light-rate",
        type=float,
        default=20.0,
        help="noisy neighbour: the light tenant's requests/s, sent at a fixed rate (default 20)",
    )
    p.add_argument(
        "--heavy-concurrency",
        type=int,
        default=256,
        help="noisy neighbour: the heavy tenant's requests always in flight (default 256, "
        "4x the top level and 8 full batches)",
    )
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
    if args.grpc_channels < 1:
        p.error("--grpc-channels must be at least 1")
    return args


def gateway_settings(args: argparse.Namespace) -> dict[str, Any]:
    """gpugate's server settings under test (None: the gateway's own default)."""
    return {
        "replica_transport": args.replica_transport,
        "grpc_server": args.grpc_server,
        "gc_tuning": None if args.gc_tuning is None else args.gc_tuning == "on",
    }


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = dt.datetime.now(dt.UTC)
    loadavg = os.getloadavg()

    def run(state_dir: Path) -> int:
        _log(
            f"state dir {state_dir}; levels {args.levels}; {args.warmup:g}s warm-up + "
            f"{args.duration:g}s per level"
        )
        # One event loop for every client: grpc.aio binds to the loop it first runs on.
        with asyncio.Runner() as loop:
            return _run(args, state_dir, started_at, loadavg, loop)

    return in_state_dir(args.state_dir, "gpugate-bench-", args.keep_state, _log, run)


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
        **({} if args.latency_lane_rows is None else {"latency_lane_rows": args.latency_lane_rows}),
    )
    row = bench_row()
    expected = reference_output(model, row)
    row_file = state_dir / "row.npy"  # for the light tenant's own process
    np.save(row_file, row)

    # 2. In-process limit.
    limit = in_process_limit(model, 1.0 if args.quick else 5.0, _log)

    runs: dict[str, SystemRun] = {}
    rows: list[LevelResult] = []
    keys = [secrets.token_urlsafe(24) for _ in range(2)]
    plan = LoadPlan(keys, row, args.levels, args.warmup, args.duration, _log, args.grpc_channels)
    taken: set[int] = set()
    failures: list[str] = []

    def measure(protocol: str, system: str, target: str, server: Server) -> list[LevelResult]:
        levels = grpc_levels if protocol == "grpc" else http_levels
        return loop.run(levels(system, target, plan, server.meters()))

    noisy: list[NoisyResult] = []
    skipped: dict[str, str] = {}

    def noisy_run(system: str, target: str, server: Server) -> None:
        if args.noisy == "on":
            noisy.append(
                loop.run(
                    grpc_noisy(
                        system,
                        target,
                        plan,
                        row_file,
                        args.light_rate,
                        args.heavy_concurrency,
                        server.light_inside,
                    )
                )
            )

    def check_probe(run: SystemRun, got: np.ndarray) -> None:
        diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else None
        run.probe_max_abs_diff = diff
        run.probe_matches_reference = diff is not None and diff <= 1e-4
        if not run.probe_matches_reference:
            failures.append(f"{run.name}: output differs from the in-process forward ({diff})")

    # 3. gpugate (one gateway, then two when asked), gRPC then HTTP.
    for name, gateways in GATEWAYS.items():
        if name not in args.systems:
            continue
        run = runs[name] = SystemRun(name)
        server, target, base = gpugate_system(
            state_dir, model, keys, taken, _log, gateway_settings(args), gateways, name
        )
        with running(server, args.startup_timeout, run):
            check_probe(run, loop.run(grpc_probe(target, keys, row, 60)))
            check_probe(run, loop.run(http_probe(base, keys, row, 60)))
            run.levels += measure("grpc", name, target, server)
            run.levels += measure("http", name, base, server)
            noisy_run(name, target, server)
        rows += run.levels

    # 4. Plain Ray Serve, gRPC.
    if "rayserve" in args.systems:
        run = runs["rayserve"] = SystemRun("rayserve")
        server, target = peer_system(
            state_dir,
            taken,
            args.max_batch_size,
            args.batch_wait_ms,
            args.peer_forward,
            args.peer_access_log,
            _log,
        )
        with running(server, args.startup_timeout, run):
            check_probe(run, loop.run(grpc_probe(target, keys, row, 60)))
            run.levels += measure("grpc", "rayserve", target, server)
            noisy_run("rayserve", target, server)
        rows += run.levels

    # 4b. Triton (PyTriton), gRPC then HTTP, from its own venv.
    if "triton" in args.systems:
        if args.quick and not triton_venv_built(args.triton_venv):
            skipped["triton"] = (
                f"its venv {args.triton_venv} is not built and --quick does not build it "
                "(make triton-venv)"
            )
            _log(f"triton skipped: {skipped['triton']}")
        else:
            python = ensure_triton_venv(args.triton_venv, _log)
            run = runs["triton"] = SystemRun("triton")
            server, target, base = triton_system(
                state_dir, taken, python, args.max_batch_size, args.batch_wait_ms, _log
            )
            with running(server, args.startup_timeout, run):
                check_probe(run, loop.run(grpc_probe(target, keys, row, 60)))
                check_probe(run, loop.run(http_probe(base, keys, row, 60)))
                run.version = server_version(base)
                run.levels += measure("grpc", "triton", target, server)
                run.levels += measure("http", "triton", base, server)
                noisy_run("triton", target, server)
            rows += run.levels

    # Calibration: the same client against a server that runs no model.
    if "null" in args.systems:
        run = runs["null"] = SystemRun("null")
        server, target = null_system(state_dir, taken, _log)
        with running(server, args.startup_timeout, run):
            loop.run(grpc_probe(target, keys, row, 30))
            run.levels += measure("grpc", "null", target, server)
            # The same two tenants against a server that does no work but isolates
            # no one (first come, first served): what saturation alone does here.
            noisy_run("null", target, server)
        rows += run.levels

    add_ratios(rows, limit)
    over = overheads(rows, limit)
    in_window = overheads_in_window(rows)
    table = render_table(rows, limit)
    print()
    print(
        f"gpugate vs. plain Ray Serve vs. Triton -- {started_at:%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, "
        f"1 row per request, max_batch_size {args.max_batch_size}, batch wait "
        f"{args.batch_wait_ms:g} ms, {args.warmup:g}s warm-up + {args.duration:g}s per level"
    )
    print(table)
    print("gw/peer = req/s of the row / req/s of rayserve grpc at the same concurrency")
    print("gw/tri = req/s of the row / req/s of triton, same protocol and concurrency")
    print("limit = rows/s of the row / the in-process limit (one replica, no serving around it)")
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
    for name, (ms, forward) in in_window.items():
        print(
            f"gateway p50 minus the forward its replica measured in the same window at "
            f"concurrency 1 ({name}): {ms:.2f} ms (forward {forward:.3f} ms mean)"
        )
    for line in headline(rows, limit):
        print(line)
    for line in gateway_spread(rows):
        print(line)
    for line in cpu_parts(rows):
        print(line)
    stages = render_stages(rows)
    if stages is not None:
        print()
        print(
            "where a request's time goes (mean ms per request, from each server's own "
            "statistics extension, /v2/models/bench/stats):"
        )
        print(stages)
        print(
            "client = the load generator's mean; inside = the server's mean for a "
            "successful request; outside = client - inside (client, transport, front door)"
        )
        print(
            "queue = waiting for a batch (gpugate: and the batch's wait at the replica); "
            "c.infer = the forward; gpugate: c.input = the rest of the batch's round trip, "
            "c.output = ledger commit and release; Triton: input and output tensor copies. "
            "Each request counts its batch's times."
        )
    if noisy:
        print()
        print(
            f"noisy neighbour (gRPC): a light tenant at {args.light_rate:g} req/s alone, then "
            f"beside a heavy tenant keeping {args.heavy_concurrency} requests in flight; "
            f"{args.warmup:g}s warm-up + {args.duration:g}s per phase"
        )
        print(render_noisy(noisy))
        print("p99 x = light p99 beside the heavy tenant / light p99 alone")
        print(
            "gw mean a/b = gpugate: the light tenant's mean time inside the gateway, alone / "
            "beside (its own metrics; the rest is the door, the network and the client)"
        )
    for name, reason in skipped.items():
        print(f"SKIPPED: {name}: {reason}")
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
                "latency_lane_rows": model.latency_lane_rows,
                **gateway_settings(args),
                "grpc_channels": args.grpc_channels,
                "peer_forward": args.peer_forward,
                "peer_access_log": args.peer_access_log,
                "noisy": args.noisy,
                "light_rate": args.light_rate,
                "heavy_concurrency": args.heavy_concurrency,
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
            "noisy_neighbour": [{**asdict(r), "p99_ratio": r.p99_ratio} for r in noisy],
            "skipped": skipped,
            "p50_minus_forward_ms_at_c1": over,
            "p50_minus_replica_forward_ms_at_c1": {k: v[0] for k, v in in_window.items()},
            "problems": failures,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        _log(f"wrote {args.json_out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
