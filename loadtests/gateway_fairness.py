"""Tenant fairness across several gateways: what share of one replica each tenant gets.

Each gateway replica forms its own tenant-fair batches (weighted virtual counters kept
per gateway), and the model replica runs the batches of all gateways in the order they
arrive. So fairness holds within a gateway's batches, not across gateways. This script
measures how far the split moves when tenants reach different gateways.

It starts ``gpugate serve`` (``systems.Server``, free ports, a temporary state folder)
with two config tenants of weights 1 (``fair-a``) and 3 (``fair-b``) and one replica
of a BenchMLP slow enough to be the bottleneck (``--hidden``, ``--depth``), first with
one gateway and then with ``server.gateway_replicas: 2``. Per scenario:

* ``1gw``: both tenants on the one gateway (one connection each);
* ``2gw-worst``: two gateways, the worst case: fair-a only on the gateway of rank 0,
  fair-b only on rank 1;
* ``2gw-spread``: two gateways, each tenant on both (a connection on each, its
  streams split evenly between them).

A connection stays on the gateway that accepted it, so the script opens gRPC channels,
each on a connection of its own, sends one request on each and keeps the ones that
landed where the scenario wants them (read from the per-tenant
``gpugate_requests_total`` on each gateway's metrics port, ``metrics_port`` + rank).
Then every tenant keeps ``--streams`` requests in flight (closed loop) for a
``--warmup`` and a ``--window``; the rows served to each tenant in the window come from
the gateways' counters (requests answered 200 times rows per request, summed over the
gateways) and the device time from ``gpugate_tenant_device_seconds``.

    python loadtests/gateway_fairness.py                 # about 3 minutes
    python loadtests/gateway_fairness.py --window 10 --json-out /tmp/fair.json

The exit code is 1 if a scenario could not be set up, a tenant had errors, or a
server did not exit 0 after SIGTERM; 0 otherwise (the split itself is reported, not
judged).
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
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kserve_client import OWN_CONNECTION, REQUEST_TIMEOUT_S
from loadgen import CpuMeter, cpu_window
from provenance import git_state, machine, versions
from systems import (
    SystemRun,
    gpugate_system,
    in_state_dir,
    prometheus_sum,
    running,
)

MODEL = "fair"
TENANTS = {"fair-a": 1.0, "fair-b": 3.0}  # name -> weight
# Scenario -> (gateways, tenant -> the ranks of the gateways it reaches).
SCENARIOS: dict[str, tuple[int, dict[str, list[int]]]] = {
    "1gw": (1, {"fair-a": [0], "fair-b": [0]}),
    "2gw-worst": (2, {"fair-a": [0], "fair-b": [1]}),
    "2gw-spread": (2, {"fair-a": [0, 1], "fair-b": [0, 1]}),
}
PLACEMENT_TRIES = 40  # connections opened to land one on a given gateway


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- metrics


@dataclass
class GatewayFigures:
    """One gateway's cumulative counters at one moment."""

    requests: Counter[str]  # tenant -> requests answered 200
    device_s: dict[str, float]  # tenant -> device seconds charged
    batches: float
    batch_rows: float
    queued_rows: float  # now, over the model's versions


def read_gateway(url: str) -> GatewayFigures:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    # Every tenant's answers (a tenant not seen yet has none); device seconds of ours.
    requests: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("gpugate_requests_total{") and 'code="200"' in line:
            tenant = line.split('tenant="', 1)[1].split('"', 1)[0]
            requests[tenant] += float(line.rsplit(" ", 1)[1])
    device = {
        tenant: prometheus_sum(text, "gpugate_tenant_device_seconds_total{", f'tenant="{tenant}"')
        for tenant in TENANTS
    }
    return GatewayFigures(
        requests,
        device,
        prometheus_sum(text, "gpugate_batch_size_rows_count"),
        prometheus_sum(text, "gpugate_batch_size_rows_sum"),
        prometheus_sum(text, "gpugate_queue_rows{"),
    )


def read_all(urls: list[str]) -> list[GatewayFigures]:
    return [read_gateway(u) for u in urls]


# ---------------------------------------------------------------------- placement


def infer_request(rows: np.ndarray, model: str = MODEL) -> Any:
    """A gRPC ModelInfer request of ``rows`` for the BenchMLP ``model``."""
    from gpugate_proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
    return request


async def landed_on(
    channel: Any, request: Any, key: str, tenant: str, urls: list[str]
) -> int | None:
    """Send one request on ``channel``; the rank of the gateway whose count of the
    tenant's answers went up (the counter moves as the answer leaves, so poll briefly)."""
    from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

    before = await asyncio.to_thread(read_all, urls)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    await stub.ModelInfer(
        request, metadata=(("authorization", f"Bearer {key}"),), timeout=REQUEST_TIMEOUT_S
    )
    for _ in range(40):
        after = await asyncio.to_thread(read_all, urls)
        moved = [
            rank
            for rank, (b, a) in enumerate(zip(before, after, strict=True))
            if a.requests[tenant] > b.requests[tenant]
        ]
        if len(moved) == 1:
            return moved[0]
        await asyncio.sleep(0.05)
    return None


async def channel_on(
    target: str, rank: int, request: Any, key: str, tenant: str, urls: list[str]
) -> Any:
    """A channel (a connection of its own) that the kernel handed to gateway ``rank``."""
    import grpc

    seen = []
    for _ in range(PLACEMENT_TRIES):
        channel = grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
        got = await landed_on(channel, request, key, tenant, urls)
        seen.append(got)
        if got == rank:
            return channel
        await channel.close()
    raise RuntimeError(f"no connection landed on gateway {rank} in {seen}")


# ----------------------------------------------------------------------- the load


@dataclass
class TenantResult:
    weight: float
    gateways: list[int]
    streams: int
    rows_served: float  # in the window, from the gateways' counters
    rows_per_gateway: list[float]
    device_s: float
    client_requests: int  # answered in the window, as the client counted them
    errors: int
    error_sample: str | None = None


@dataclass
class ScenarioResult:
    name: str
    gateways: int
    window_s: float
    tenants: dict[str, TenantResult] = field(default_factory=dict)
    batches_per_gateway: list[float] = field(default_factory=list)
    mean_batch_rows_per_gateway: list[float | None] = field(default_factory=list)
    queued_rows_mid_window: list[float] = field(default_factory=list)
    rows_per_s: float = 0.0
    # Cores busy in the window: machine-wide, outside this script and its server, and
    # of those inside by part (loadgen.CpuMeter).
    cpu_busy: float | None = None
    cpu_other: float | None = None
    cpu_by_part: dict[str, float] | None = None
    share_a: float | None = None  # fair-a's share of the rows served (ideal 0.25)
    ratio_b_per_a: float | None = None  # rows served to fair-b per row to fair-a (ideal 3)
    device_share_a: float | None = None


async def run_scenario(
    name: str,
    placement: dict[str, list[int]],
    gateways: int,
    target: str,
    urls: list[str],
    keys: dict[str, str],
    args: argparse.Namespace,
    cpu: CpuMeter,
) -> ScenarioResult:
    from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

    rows = np.random.default_rng(7).standard_normal((args.rows, 256), dtype=np.float32)
    request = infer_request(rows)
    # Place every tenant's connections first, while nothing else is in flight.
    channels: dict[str, list[Any]] = {}
    for tenant, ranks in placement.items():
        channels[tenant] = [
            await channel_on(target, rank, request, keys[tenant], tenant, urls) for rank in ranks
        ]
        _log(f"{name}: {tenant} on gateway(s) {ranks}")
    window: dict[str, float] = {}  # start, end
    done = {t: 0 for t in TENANTS}
    errors = {t: 0 for t in TENANTS}
    samples: dict[str, str | None] = dict.fromkeys(TENANTS)
    stop = asyncio.Event()

    async def worker(tenant: str, channel: Any) -> None:
        import grpc

        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = (("authorization", f"Bearer {keys[tenant]}"),)
        while not stop.is_set():
            try:
                await stub.ModelInfer(request, metadata=metadata, timeout=REQUEST_TIMEOUT_S)
                failed = None
            except grpc.aio.AioRpcError as exc:
                failed = f"{exc.code().name}: {exc.details()}"
            now = time.monotonic()
            if "start" in window and now < window.get("end", float("inf")):
                if failed is None:
                    done[tenant] += 1
                else:
                    errors[tenant] += 1
                    samples[tenant] = samples[tenant] or failed

    workers = []
    for tenant, chans in channels.items():
        for i in range(args.streams):  # the tenant's streams, split evenly over its channels
            workers.append(asyncio.create_task(worker(tenant, chans[i % len(chans)])))
    try:
        await asyncio.sleep(args.warmup)
        start = await asyncio.to_thread(read_all, urls)
        cpu_start = cpu.snapshot()
        window["start"] = time.monotonic()
        await asyncio.sleep(args.window / 2)
        middle = await asyncio.to_thread(read_all, urls)
        await asyncio.sleep(max(0.0, window["start"] + args.window - time.monotonic()))
        end = await asyncio.to_thread(read_all, urls)
        cpu_end = cpu.snapshot()
        window["end"] = time.monotonic()
    finally:
        stop.set()
        await asyncio.wait(workers, timeout=REQUEST_TIMEOUT_S + 5)
        for chans in channels.values():
            for channel in chans:
                await channel.close()
    seconds = window["end"] - window["start"]
    result = ScenarioResult(name, gateways, seconds)
    result.cpu_busy, _, result.cpu_other, result.cpu_by_part = cpu_window(
        cpu_start, cpu_end, seconds
    )
    for tenant, weight in TENANTS.items():
        per_gateway = [
            (e.requests[tenant] - s.requests[tenant]) * args.rows
            for s, e in zip(start, end, strict=True)
        ]
        result.tenants[tenant] = TenantResult(
            weight=weight,
            gateways=placement[tenant],
            streams=args.streams,
            rows_served=sum(per_gateway),
            rows_per_gateway=per_gateway,
            device_s=sum(
                e.device_s[tenant] - s.device_s[tenant] for s, e in zip(start, end, strict=True)
            ),
            client_requests=done[tenant],
            errors=errors[tenant],
            error_sample=samples[tenant],
        )
    for s, e in zip(start, end, strict=True):
        batches = e.batches - s.batches
        result.batches_per_gateway.append(batches)
        result.mean_batch_rows_per_gateway.append(
            (e.batch_rows - s.batch_rows) / batches if batches else None
        )
    result.queued_rows_mid_window = [m.queued_rows for m in middle]
    a, b = result.tenants["fair-a"], result.tenants["fair-b"]
    total = a.rows_served + b.rows_served
    result.rows_per_s = total / seconds
    if total:
        result.share_a = a.rows_served / total
    if a.rows_served:
        result.ratio_b_per_a = b.rows_served / a.rows_served
    if a.device_s + b.device_s:
        result.device_share_a = a.device_s / (a.device_s + b.device_s)
    _log(
        f"{name}: rows served fair-a {a.rows_served:,.0f}, fair-b {b.rows_served:,.0f} "
        f"(A:B = 1:{result.ratio_b_per_a or 0:.2f}, A's share {100 * (result.share_a or 0):.1f}%"
        f"; ideal 1:3, 25%); {result.rows_per_s:,.0f} rows/s; mean rows per batch "
        + ", ".join("-" if r is None else f"{r:.1f}" for r in result.mean_batch_rows_per_gateway)
    )
    return result


# ----------------------------------------------------------------------- serving


def wait_for_metrics(urls: list[str], timeout_s: float) -> None:
    """Every gateway's metrics port answers (each opens it as it starts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            read_all(urls)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# -------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=float, default=20.0, help="measured seconds per scenario")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the window")
    p.add_argument("--streams", type=int, default=64, help="requests each tenant keeps in flight")
    p.add_argument("--rows", type=int, default=4, help="rows per request")
    p.add_argument("--hidden", type=int, default=4096, help="the BenchMLP's hidden size")
    p.add_argument("--depth", type=int, default=4, help="the BenchMLP's depth")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated, of: %(default)s",
    )
    p.add_argument("--startup-timeout", type=float, default=240.0)
    p.add_argument("--state-dir", type=Path, help="default: a temporary folder")
    p.add_argument("--keep-state", action="store_true")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}")
    if args.rows * args.streams < args.max_batch_size:
        p.error("--rows x --streams must reach --max-batch-size, or no tenant stays backlogged")
    return args


def render(results: list[ScenarioResult]) -> str:
    head = (
        f"{'scenario':<10} {'fair-a rows':>11} {'fair-b rows':>11} {'A:B':>7} {'A share':>8} "
        f"{'A device':>8} {'rows/s':>7} {'rows/batch per gw':>18} {'queued mid':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        a, b = r.tenants["fair-a"], r.tenants["fair-b"]
        per_batch = "/".join(
            "-" if x is None else f"{x:.1f}" for x in r.mean_batch_rows_per_gateway
        )
        lines.append(
            f"{r.name:<10} {a.rows_served:>11,.0f} {b.rows_served:>11,.0f} "
            f"{'1:' + format(r.ratio_b_per_a or 0, '.2f'):>7} {100 * (r.share_a or 0):>7.1f}% "
            f"{100 * (r.device_share_a or 0):>7.1f}% {r.rows_per_s:>7,.0f} {per_batch:>18} "
            f"{'/'.join(f'{q:.0f}' for q in r.queued_rows_mid_window):>11}"
        )
    lines.append("ideal (weights 1 and 3): A:B = 1:3, A's share 25.0%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = dt.datetime.now(dt.UTC)
    loadavg = os.getloadavg()
    return in_state_dir(
        args.state_dir,
        "gpugate-fairness-",
        args.keep_state,
        _log,
        lambda state_dir: _run(args, state_dir, started_at, loadavg),
    )


def _run(
    args: argparse.Namespace,
    state_dir: Path,
    started_at: dt.datetime,
    loadavg: tuple[float, float, float],
) -> int:
    from inprocess import in_process_limit

    from serving.demo import bench_model_config

    git_info = git_state()
    model = bench_model_config(
        state_dir,
        name=MODEL,
        version="1",
        hidden=args.hidden,
        depth=args.depth,
        max_batch_size=args.max_batch_size,
        replicas=1,
        num_cpus=1.0,
    )
    limit = in_process_limit(model, 3.0, _log)
    keys = {t: secrets.token_urlsafe(24) for t in TENANTS}
    taken: set[int] = set()
    results: list[ScenarioResult] = []
    runs: list[SystemRun] = []
    problems: list[str] = []
    by_gateways: dict[int, list[str]] = {}
    for name in args.scenarios:
        by_gateways.setdefault(SCENARIOS[name][0], []).append(name)
    for gateways, names in sorted(by_gateways.items()):
        server, target, _ = gpugate_system(
            state_dir,
            model,
            [keys[t] for t in TENANTS],
            taken,
            _log,
            {},
            gateways,
            name=f"gpugate-{gateways}gw",
            weights=TENANTS,
        )
        urls = server.metrics_urls
        run = SystemRun(server.name)
        runs.append(run)
        try:
            with running(server, args.startup_timeout, run), asyncio.Runner() as loop:
                wait_for_metrics(urls, 60)
                for name in names:
                    _, placement = SCENARIOS[name]
                    results.append(
                        loop.run(
                            run_scenario(
                                name,
                                placement,
                                gateways,
                                target,
                                urls,
                                keys,
                                args,
                                CpuMeter(server.proc.pid if server.proc else None),
                            )
                        )
                    )
        except RuntimeError as exc:
            problems.append(f"{server.name}: {exc}")
            _log(f"PROBLEM: {server.name}: {exc}")
        if run.exit_code not in (0, None):
            problems.append(f"{server.name} exited with {run.exit_code} after SIGTERM")
    for r in results:
        for tenant, t in r.tenants.items():
            if t.errors:
                problems.append(f"{r.name}: {tenant} had {t.errors} errors ({t.error_sample})")

    print()
    print(
        f"tenant fairness across gateways -- {started_at:%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs; one replica of BenchMLP hidden {args.hidden} depth "
        f"{args.depth}, max_batch_size {args.max_batch_size} (in-process limit "
        f"{limit.rows_per_s:,.0f} rows/s); fair-a weight 1, fair-b weight 3; {args.streams} "
        f"requests of {args.rows} rows in flight per tenant; {args.warmup:g}s warm-up + "
        f"{args.window:g}s window"
    )
    print(render(results))
    print(
        "rows = rows answered in the window (the gateways' gpugate_requests_total, code 200, "
        "x rows per request); A device = fair-a's share of gpugate_tenant_device_seconds; "
        "queued mid = gpugate_queue_rows per gateway half-way through the window"
    )
    for r in results:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in (r.cpu_by_part or {}).items())
        print(
            f"{r.name}: cores busy {r.cpu_busy or 0:.2f} (other work {r.cpu_other or 0:.2f}); "
            f"{parts}"
        )
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if args.json_out is not None:
        report = {
            "date": started_at.isoformat(timespec="seconds"),
            "machine": machine(loadavg),
            "versions": versions(),
            "git": git_info,
            "settings": {
                "window_s": args.window,
                "warmup_s": args.warmup,
                "streams_per_tenant": args.streams,
                "rows_per_request": args.rows,
                "tenants": TENANTS,
                "model": {
                    "class": model.model_class,
                    "kwargs": dict(model.model_kwargs),
                    "max_batch_size": model.max_batch_size,
                    "batches_in_flight_per_replica": model.batches_in_flight_per_replica,
                    "replicas": 1,
                },
            },
            "in_process": asdict(limit),
            "systems": [{k: v for k, v in asdict(r).items() if k != "levels"} for r in runs],
            "scenarios": [asdict(r) for r in results],
            "problems": problems,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        _log(f"wrote {args.json_out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
