"""One rate quota over two gateways: how close the rate granted is to the quota, wherever
the traffic lands.

``gpugate serve`` with two gateway replicas sharing the ports; tenant ``quota-t`` gets a
quota of ``--rate`` requests/s (burst ``--burst``) through the CLI, and is offered
``--offered`` requests/s for ``--window`` seconds, open loop over gRPC, on connections
the kernel handed to a known gateway (``gateway_fairness.channel_on``):

* ``one``: every request on the gateway of rank 0;
* ``even``: alternately on rank 0 and rank 1;
* ``moves``: on rank 0 for the first half of the window, then on rank 1.

Each scenario starts after ``--idle`` seconds without traffic. The figure is the
requests answered 200 per second over the window against the quota, the rest being 429.

    .venv/bin/python loadtests/quota_gateways.py [--json-out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from gateway_fairness import channel_on, infer_request, wait_for_metrics
from provenance import git_state, machine, versions
from systems import SystemRun, gpugate_command, gpugate_system, in_state_dir, running

from serving.demo import BENCH_IN

SCENARIOS = ("one", "even", "moves")
MODEL = "quota"
TENANT = "quota-t"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def scenario(
    name: str, channels: list[list[Any]], key: str, args: argparse.Namespace
) -> dict[str, Any]:
    import grpc
    from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

    request = infer_request(np.zeros((1, BENCH_IN), np.float32), MODEL)
    metadata = (("authorization", f"Bearer {key}"),)
    stubs = [[pb_grpc.GRPCInferenceServiceStub(c) for c in on_rank] for on_rank in channels]
    codes: dict[str, int] = {}
    total = int(args.offered * args.window)

    def rank_of(i: int) -> int:
        if name == "one":
            return 0
        if name == "even":
            return i % 2
        return 0 if i < total // 2 else 1

    async def one(i: int) -> None:
        on_rank = stubs[rank_of(i)]
        try:
            await on_rank[i % len(on_rank)].ModelInfer(request, metadata=metadata, timeout=30)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        codes[code] = codes.get(code, 0) + 1

    start = time.monotonic()
    tasks = []
    for i in range(total):
        delay = start + i / args.offered - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    seconds = time.monotonic() - start
    granted = codes.get("OK", 0) / seconds
    result = {
        "scenario": name,
        "seconds": seconds,
        "codes": codes,
        "offered_per_s": total / seconds,
        "granted_per_s": granted,
        "error": granted / args.rate - 1,
    }
    _log(
        f"{name}: {codes} in {seconds:.2f} s: {granted:.1f}/s granted against {args.rate:g}/s "
        f"({100 * result['error']:+.1f}%)"
    )
    return result


def _run(args: argparse.Namespace, state_dir: Path) -> int:
    from serving.demo import bench_model_config

    git_info = git_state()
    loadavg = os.getloadavg()
    model = bench_model_config(
        state_dir, name=MODEL, version="1", hidden=256, depth=1, max_batch_size=32
    )
    keys = ["quota-key-" + "x" * 30, "free-key-" + "y" * 30]
    weights = {TENANT: 1.0, "free-t": 1.0}
    server, target, http_base = gpugate_system(
        state_dir, model, keys, set(), _log, {}, 2, name="gpugate-2gw", weights=weights
    )
    run = SystemRun(server.name)
    results = []
    with running(server, args.startup_timeout, run):
        wait_for_metrics(server.metrics_urls, 60)
        set_quota = subprocess.run(
            [
                *gpugate_command(), "tenants", "quota", TENANT,
                "--requests-per-s", str(args.rate), "--requests-burst", str(args.burst),
                "--url", http_base, "--state-dir", str(state_dir / "gpugate-2gw-state"),
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if set_quota.returncode != 0:
            _log(f"setting the quota failed: {set_quota.stderr}")
            return 1
        _log(set_quota.stdout.strip())

        async def main() -> None:
            # Placing connections sends a request on each: the free tenant's key, so
            # the quota's buckets start full.
            probe = infer_request(np.zeros((1, BENCH_IN), np.float32), MODEL)
            channels = [
                [
                    await channel_on(target, rank, probe, keys[1], "free-t", server.metrics_urls)
                    for _ in range(args.connections)
                ]
                for rank in (0, 1)
            ]
            try:
                for name in args.scenarios:
                    await asyncio.sleep(args.idle)
                    results.append(await scenario(name, channels, keys[0], args))
            finally:
                for on_rank in channels:
                    for channel in on_rank:
                        await channel.close()

        asyncio.run(main())
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(loadavg),
        "versions": versions(),
        "git": git_info,
        "settings": {k: v for k, v in vars(args).items() if k != "json_out"} | {"state_dir": None},
        "scenarios": results,
    }
    print(
        f"one quota over two gateways -- {report['date']}: {args.rate:g} req/s (burst "
        f"{args.burst:g}) offered {args.offered:g} req/s for {args.window:g} s"
    )
    for r in results:
        print(
            f"{r['scenario']:<6} granted {r['granted_per_s']:6.1f}/s ({100 * r['error']:+.1f}%), "
            f"offered {r['offered_per_s']:.0f}/s, answers {r['codes']}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str))
        _log(f"wrote {args.json_out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--burst", type=float, default=5.0)
    parser.add_argument("--offered", type=float, default=200.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=2, help="per gateway")
    parser.add_argument("--scenarios", type=lambda s: s.split(","), default=list(SCENARIOS))
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--keep-state", action="store_true")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    return in_state_dir(
        args.state_dir, "gpugate-quota-", args.keep_state, _log, lambda d: _run(args, d)
    )


if __name__ == "__main__":
    sys.exit(main())
