"""How much the cost ledger costs: commit latency and the writer's throughput.

Every batch's answers wait for its ledger commit, so the commit's latency adds to
every request at low load, and the commit rate bounds batches per second at high
load. Runs against a fresh SQLite file (default) or a PostgreSQL URL (a fresh
schema, dropped afterwards).

    .venv/bin/python loadtests/ledger_bench.py [--database-url URL] [--batches 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from scheduler import BatchRecord, BatchResult, charge_ns, split_by_rows
from serving.config import CostsConfig
from serving.costs import Ledger, LedgerWriter, Pricing
from serving.state import open_engine


def batch_record(requests: int, tenants: int) -> BatchRecord:
    """A batch of ``requests`` one-row requests over ``tenants`` tenants, 5 ms of device time."""
    now = time.time_ns()
    charge = charge_ns(5_000_000, 1.0)
    return BatchRecord(
        model="bench",
        version="1",
        tenants=tuple((f"t{i % tenants}", 1) for i in range(requests)),
        rows=requests,
        result=BatchResult({}, 5_000_000, "cpu", 1.0),
        queue_wait_s=(0.0,) * requests,
        duration_s=0.0,
        started_at_ns=now,
        finished_at_ns=now,
        charge_ns=charge,
        charges_ns=tuple(split_by_rows(charge, [1] * requests)),
    )


def run(engine: sa.Engine, batches: int, requests: int, tenants: int) -> dict[str, float]:
    ledger = Ledger(engine, Pricing(CostsConfig()))
    lat = []
    for _ in range(300):
        t = time.perf_counter()
        ledger.write([batch_record(requests, tenants)])
        lat.append(time.perf_counter() - t)
    writer = LedgerWriter(ledger)

    async def flood() -> float:
        t = time.perf_counter()
        await asyncio.gather(
            *(writer.commit(batch_record(requests, tenants)) for _ in range(batches))
        )
        return time.perf_counter() - t

    elapsed = asyncio.run(flood())
    writer.close()
    return {
        "commit_p50_ms": statistics.median(lat) * 1e3,
        "commit_p99_ms": sorted(lat)[int(len(lat) * 0.99)] * 1e3,
        "group_batches_per_s": batches / elapsed,
        "group_commits": writer.commits,
        "inline_commits": writer.inline_commits,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", help="PostgreSQL URL (default: a temporary SQLite file)")
    p.add_argument("--batches", type=int, default=2000, help="batches in the flood")
    p.add_argument("--requests", type=int, default=32, help="requests per batch")
    p.add_argument("--tenants", type=int, default=8, help="tenants per batch")
    args = p.parse_args()
    schema = None
    if args.database_url:
        schema = f"gg_bench_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(args.database_url)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        url = sa.make_url(args.database_url).update_query_dict(
            {"options": f"-csearch_path={schema}"}
        )
        engine = open_engine(url.render_as_string(hide_password=False), Path("."))
    else:
        engine = open_engine(None, Path(tempfile.mkdtemp()))
    try:
        r = run(engine, args.batches, args.requests, args.tenants)
    finally:
        engine.dispose()
        if schema is not None:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    print(
        f"{engine.dialect.name}: one batch ({args.requests} requests, {args.tenants} tenants) "
        f"per commit p50 {r['commit_p50_ms']:.2f} ms p99 {r['commit_p99_ms']:.2f} ms; "
        f"{args.batches} concurrent batches: {r['group_batches_per_s']:.0f} batches/s "
        f"in {r['group_commits']:.0f} group commits on the writer thread and "
        f"{r['inline_commits']:.0f} inline commits (SQLite's path when the file is free)"
    )


if __name__ == "__main__":
    main()
