"""What durability on power loss costs the SQLite cost ledger: ``synchronous = NORMAL``
(a commit reaches the WAL but is fsynced only at checkpoints: a power cut can lose the
last commits) against ``FULL`` (every commit fsyncs the WAL), side by side in one run.

Three ways of writing, each on a fresh SQLite file in the same folder:
  normal-inline  NORMAL, batches committed inline on the event loop (the old default)
  full-inline    FULL, inline: the fsync of every commit runs on the event loop
  full-group     FULL, through the writer thread: batches that finish while a commit
                 runs share the next one (group commit), the loop never waits on fsync

For each: the latency of a lone commit (p50, p99) and the throughput of a flood of
concurrent batches, with the loop's longest stall during the flood.

    .venv/bin/python loadtests/ledger_durability.py [--dir PATH] [--batches 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from ledger_bench import batch_record  # this folder is on sys.path when run as a script
from sqlalchemy import event

from serving.config import CostsConfig
from serving.costs import Ledger, LedgerWriter, Pricing
from serving.state import open_engine


def _engine(folder: Path, synchronous: str) -> sa.Engine:
    engine = open_engine(None, folder)
    engine.dispose()  # reconnect with the setting under test

    def setting(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.close()

    event.listen(engine, "connect", setting)
    return engine


async def _measure(writer: LedgerWriter, batches: int, requests: int) -> dict[str, float]:
    lone = []
    for _ in range(200):
        t = time.perf_counter()
        await writer.commit(batch_record(requests, 4))
        lone.append(time.perf_counter() - t)
    stall = 0.0
    running = True

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall = max(stall, now - last - 0.001)
            last = now

    tick = asyncio.create_task(ticker())
    t = time.perf_counter()
    await asyncio.gather(*(writer.commit(batch_record(requests, 4)) for _ in range(batches)))
    elapsed = time.perf_counter() - t
    running = False
    await tick
    lone.sort()
    return {
        "lone_p50_ms": statistics.median(lone) * 1e3,
        "lone_p99_ms": lone[int(len(lone) * 0.99)] * 1e3,
        "flood_batches_per_s": batches / elapsed,
        "flood_max_loop_stall_ms": stall * 1e3,
    }


def run(folder: Path, name: str, synchronous: str, inline: bool, batches: int) -> dict[str, Any]:
    engine = _engine(folder / name, synchronous)
    writer = LedgerWriter(Ledger(engine, Pricing(CostsConfig())), inline=inline)
    try:
        figures = asyncio.run(_measure(writer, batches, requests=8))
    finally:
        writer.close()
        engine.dispose()
    return {"mode": name, "synchronous": synchronous, "inline": inline, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="folder for the files (default: a temp dir)")
    parser.add_argument("--batches", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        rows = [
            run(folder, "normal-inline", "NORMAL", True, args.batches),
            run(folder, "full-inline", "FULL", True, args.batches),
            run(folder, "full-group", "FULL", False, args.batches),
        ]
    base = rows[0]
    for r in rows:
        r["throughput_vs_normal_inline"] = r["flood_batches_per_s"] / base["flood_batches_per_s"]
        print(
            f"{r['mode']:<14} lone p50 {r['lone_p50_ms']:7.3f} ms  p99 {r['lone_p99_ms']:7.3f} ms"
            f"  flood {r['flood_batches_per_s']:8.0f} batches/s"
            f" ({r['throughput_vs_normal_inline']:.2f}x)"
            f"  max loop stall {r['flood_max_loop_stall_ms']:6.1f} ms"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
