"""The cost ledger and finance reports against real databases (SQLite file, PostgreSQL)."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from scheduler import BatchPolicy, BatchRecord, BatchResult, ModelBatcher, Share, Tensors
from serving.config.schema import CostsConfig, PriceConfig
from serving.costs import render_report as render
from serving.costs.ledger import Ledger, LedgerWriter, Pricing, as_utc
from serving.costs.report import (
    IDLE,
    ReportError,
    build_report,
    parse_when,
    report_for_query,
)
from serving.state.db import (
    SQLITE_FILENAME,
    ledger_allocations,
    ledger_batches,
    ledger_reservations,
    open_engine,
    sqlite_synchronous,
)

DAY = datetime(2026, 11, 20, tzinfo=UTC)
PRICES = CostsConfig(
    currency="USD",
    prices=[
        PriceConfig(device="cpu", per_hour=Decimal("0.36")),
        PriceConfig(device="cpu", per_hour=Decimal("0.72"), since=date(2026, 11, 21)),
        PriceConfig(device="cuda", per_hour=Decimal("3.60")),
    ],
)


def ns(when: datetime) -> int:
    return int(when.timestamp()) * 10**9 + when.microsecond * 1000


def record(
    model: str,
    tenants: Sequence[tuple[str, int]],
    device_ns: int,
    finished: datetime,
    *,
    share: float = 1.0,
    device: str = "cpu",
) -> BatchRecord:
    from scheduler import charge_ns, split_by_rows

    charge = charge_ns(device_ns, share)
    return BatchRecord(
        model=model,
        version="1",
        tenants=tuple(tenants),
        rows=sum(r for _, r in tenants),
        result=BatchResult({}, device_ns, device, share),
        queue_wait_s=tuple(0.0 for _ in tenants),
        duration_s=0.0,
        started_at_ns=ns(finished) - device_ns,
        finished_at_ns=ns(finished),
        charge_ns=charge,
        charges_ns=tuple(split_by_rows(charge, [r for _, r in tenants])),
    )


def reserve(
    engine: sa.Engine, replica: str, model: str, start: datetime, end: datetime, share: float = 1.0
) -> None:
    with engine.begin() as conn:
        conn.execute(
            ledger_reservations.insert().values(
                replica=replica,
                model=model,
                version="1",
                device="cpu",
                device_share=share,
                started_at=start,
                last_seen_at=end,
                ended_at=end,
            )
        )


class RandomBackend:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        await asyncio.sleep(self.rng.random() / 1000)
        share = self.rng.choice([1.0, 0.5, 0.25, 1 / 3])
        return BatchResult({"y": inputs["x"]}, self.rng.randint(1, 5 * 10**7), "cpu", share)


@pytest.mark.parametrize("path", ["default", "thread"])
def test_randomized_run_conserves_every_nanosecond_in_the_database(
    engine: sa.Engine, path: str
) -> None:
    """The default path: the writer thread with group commit (PostgreSQL, and SQLite
    with synchronous FULL), inline on the loop for SQLite with NORMAL; "thread" forces
    the writer thread on both databases."""
    writer = LedgerWriter(
        Ledger(engine, Pricing(PRICES)), inline=None if path == "default" else False
    )
    records: list[BatchRecord] = []
    rng = random.Random(5)
    tenants = [f"tenant-{i}" for i in range(23)]
    plan = [(rng.choice(tenants), rng.randint(1, 16)) for _ in range(600)]

    async def main() -> None:
        batchers = [
            ModelBatcher(
                f"m{k}",
                "1",
                RandomBackend(k),
                BatchPolicy(max_batch_size=size, max_in_flight=3),
                observer=records.append,
                ledger=writer,
            )
            for k, size in enumerate((16, 32, 64))
        ]
        for b in batchers:
            b.start()
        await asyncio.gather(
            *(
                batchers[i % 3].submit(t, {"x": np.zeros((rows, 3), np.float32)}, rows)
                for i, (t, rows) in enumerate(plan)
            )
        )
        for b in batchers:
            await b.close()

    asyncio.run(main())
    writer.close()
    with engine.connect() as conn:
        batch_total = conn.execute(sa.select(sa.func.sum(ledger_batches.c.charge_ns))).scalar()
        per_tenant = dict(
            conn.execute(
                sa.select(
                    ledger_allocations.c.tenant, sa.func.sum(ledger_allocations.c.requests)
                ).group_by(ledger_allocations.c.tenant)
            ).all()
        )
        alloc_total = conn.execute(sa.select(sa.func.sum(ledger_allocations.c.charge_ns))).scalar()
        # Per batch, the allocations add up to the batch's charge exactly.
        mismatched = conn.execute(
            sa.select(ledger_batches.c.id)
            .join(ledger_allocations)
            .group_by(ledger_batches.c.id, ledger_batches.c.charge_ns)
            .having(sa.func.sum(ledger_allocations.c.charge_ns) != ledger_batches.c.charge_ns)
        ).all()
    assert batch_total == alloc_total == sum(r.charge_ns for r in records) > 0
    assert mismatched == []
    assert per_tenant == dict(Counter(t for t, _ in plan))
    if path == "default" and sqlite_synchronous() == "NORMAL" and engine.dialect.name == "sqlite":
        # Nothing else wrote the file: every batch committed inline, none on the thread.
        assert (writer.inline_commits, writer.inline_busy, writer.commits) == (len(records), 0, 0)
    else:
        # Group commit: batches finishing together share a transaction.
        assert writer.inline_commits == 0 and 0 < writer.commits <= len(records)


def _sqlite_writer(tmp_path: Path, **kwargs: Any) -> tuple[sa.Engine, LedgerWriter]:
    """A writer on the inline path (what SQLite with synchronous NORMAL uses)."""
    kwargs.setdefault("inline", True)
    engine = open_engine(None, tmp_path / "state")
    return engine, LedgerWriter(Ledger(engine, Pricing(PRICES)), **kwargs)


def _batches(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(ledger_batches)).scalar()
    return int(count or 0)


def test_sqlite_commit_is_inline_and_never_leaves_the_callers_step(tmp_path: Path) -> None:
    """The coroutine finishes on its first step (no await on the thread), and the row is
    there for any other connection at once."""
    engine, writer = _sqlite_writer(tmp_path)

    async def main() -> None:
        coro = writer.commit(record("m", [("a", 2), ("b", 1)], 3_600 * 10**9, DAY))
        with pytest.raises(StopIteration) as done:
            coro.send(None)
        assert done.value.value == pytest.approx([0.24, 0.12])  # 1 h at 0.36/h, by rows
        assert _batches(engine) == 1

    asyncio.run(main())
    writer.close()
    assert (writer.inline_commits, writer.commits) == (1, 0)
    engine.dispose()


def test_sqlite_locked_by_another_writer_goes_to_the_thread_and_waits(tmp_path: Path) -> None:
    """A lock held elsewhere (the CLI, another worker) never blocks the loop: the batch
    goes to the writer thread, which waits for the lock and commits it."""
    engine, writer = _sqlite_writer(tmp_path)
    other = sqlite3.connect(tmp_path / "state" / SQLITE_FILENAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock

    async def main() -> list[float]:
        task = asyncio.create_task(writer.commit(record("m", [("a", 1)], 10**9, DAY)))
        await asyncio.sleep(0.3)
        assert not task.done() and writer.inline_busy == 1  # waiting on the thread
        other.execute("COMMIT")
        return list(await asyncio.wait_for(task, 10))

    costs = asyncio.run(main())
    other.close()
    writer.close()
    assert costs == pytest.approx([0.0001])
    assert (writer.inline_commits, writer.commits, _batches(engine)) == (0, 1, 1)
    engine.dispose()


def test_inline_commits_are_checkpointed_by_the_thread(tmp_path: Path) -> None:
    """The inline connection never checkpoints (an fsync on the loop); the thread copies
    the WAL into the database file every interval."""
    engine, writer = _sqlite_writer(tmp_path, checkpoint_every_s=0.05)
    db = tmp_path / "state" / SQLITE_FILENAME
    before = db.stat().st_size
    many = [("t" + str(i), 1) for i in range(200)]

    async def main() -> None:
        for _ in range(50):  # ~10k allocation rows: far more pages than the file had
            await writer.commit(record("m", many, 10**9, DAY))

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while writer.checkpoints == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writer.checkpoints >= 1
    assert db.stat().st_size > before  # the pages reached the main file
    writer.close()
    assert _batches(engine) == 50 and writer.inline_commits == 50
    engine.dispose()


def test_rows_read_back_exactly_as_written(engine: sa.Engine) -> None:
    """The writer's DBAPI statements store what the schema's types would: every column,
    tz-aware UTC instants to the microsecond, ids in record order."""
    ledger = Ledger(engine, Pricing(PRICES), gateway="host:1")
    finished = DAY + timedelta(hours=3, microseconds=123_456)
    records = [
        record("m", [("a", 2), ("b", 1), ("a", 3)], 7_000_001, finished),
        record("m", [("b", 4)], 10**9, finished + timedelta(days=1), share=0.5),
        record("g", [("c", 1)], 5, finished, device="NVIDIA L4", share=0.25),
    ]
    costs = ledger.write(records)
    with engine.connect() as conn:
        batches = conn.execute(sa.select(ledger_batches).order_by(ledger_batches.c.id)).all()
        allocations = conn.execute(
            sa.select(ledger_allocations).order_by(
                ledger_allocations.c.batch_id, ledger_allocations.c.tenant
            )
        ).all()
    assert [b.model for b in batches] == ["m", "m", "g"]
    first = batches[0]
    assert (first.gateway, first.version, first.device, first.device_share) == (
        "host:1",
        "1",
        "cpu",
        1.0,
    )
    assert (first.device_ns, first.charge_ns, first.rows, first.requests) == (
        7_000_001,
        7_000_001,
        6,
        3,
    )
    assert as_utc(first.finished_at) == finished
    assert as_utc(first.started_at) == datetime.fromtimestamp(records[0].started_at_ns / 1e9, UTC)
    # The price in force on each batch's day is stored with it.
    assert [(b.currency, b.price_nanos_per_hour) for b in batches] == [
        ("USD", 360_000_000),
        ("USD", 720_000_000),
        ("USD", 3_600_000_000),
    ]
    assert batches[1].charge_ns == 5 * 10**8 and batches[2].device == "NVIDIA L4"
    by_batch = [(a.batch_id, a.tenant, a.requests, a.rows, a.charge_ns) for a in allocations]
    ids = [b.id for b in batches]
    a_part = records[0].charges_ns[0] + records[0].charges_ns[2]
    assert by_batch == [
        (ids[0], "a", 2, 5, a_part),
        (ids[0], "b", 1, 1, records[0].charges_ns[1]),
        (ids[1], "b", 1, 4, 5 * 10**8),
        (ids[2], "c", 1, 1, 1),
    ]
    assert costs[1] == [pytest.approx(5 * 10**8 * 0.72 / 3.6e12)]


def test_a_refused_write_leaves_no_rows(engine: sa.Engine) -> None:
    """One transaction per write: when a later batch is refused, earlier ones roll back."""
    ledger = Ledger(engine, Pricing(PRICES))
    good = record("m", [("a", 1)], 1_000, DAY)
    bad = dataclasses.replace(good, model=None)  # type: ignore[arg-type]
    refused = (sa.exc.IntegrityError, engine.dialect.loaded_dbapi.IntegrityError)
    with pytest.raises(refused):
        ledger.write([good, bad])
    assert _batches(engine) == 0
    with engine.connect() as conn:
        count = sa.select(sa.func.count()).select_from(ledger_allocations)
        assert conn.execute(count).scalar() == 0
    ledger.write([good])  # the connection went back to the pool usable
    assert _batches(engine) == 1


def test_idle_is_never_negative(engine: sa.Engine) -> None:
    """A batch counts on the day it ends: one that ran across midnight on a replica that
    stopped just after it uses more of that day than the replica reserved. That day's idle
    is zero, not negative (a negative idle row would take money off the total)."""
    midnight = DAY + timedelta(days=1)
    Ledger(engine, Pricing(PRICES)).write(
        [record("digits", [("acme", 1)], 5 * 10**9, midnight + timedelta(seconds=1))]
    )
    reserve(engine, "r1", "digits", DAY + timedelta(hours=23), midnight + timedelta(seconds=1))
    start, end = parse_when("2026-11-20"), parse_when("2026-11-21", end_of_day=True)
    report = build_report(engine, Pricing(PRICES), start, end, ["tenant", "day"])
    rows = {(r.group["tenant"], r.group["day"]): r for r in report.rows}
    used, idle_before, idle_after = (
        rows[("acme", "2026-11-21")],
        rows[(IDLE, "2026-11-20")],
        rows[(IDLE, "2026-11-21")],
    )
    assert used.used_ns == 5 * 10**9
    assert idle_before.idle_ns == 3_600 * 10**9  # nothing ended on the 20th
    assert idle_after.idle_ns == 0  # 1 s reserved, 5 s used
    assert idle_after.cost() == 0
    assert report.total.cost() == used.cost() + idle_before.cost()


def test_report_reconciles_with_the_ledger_and_idle_capacity(engine: sa.Engine) -> None:
    ledger = Ledger(engine, Pricing(PRICES))
    t0 = DAY + timedelta(hours=1)
    ledger.write(
        [
            record("digits", [("acme", 3), ("globex", 1)], 4 * 10**9, t0),
            record("digits", [("acme", 1)], 10**9, t0 + timedelta(minutes=1)),
            record("digits", [("globex", 2)], 2 * 10**9, t0 + timedelta(days=1)),  # new price
            record("bert", [("acme", 1)], 6 * 10**9, t0, share=0.5, device="NVIDIA L4"),
        ]
    )
    # digits held one CPU for 1 hour on each day; bert's GPU replica has no reservation.
    reserve(engine, "r1", "digits", DAY, DAY + timedelta(hours=1, minutes=30))
    reserve(engine, "r2", "digits", DAY + timedelta(days=1), DAY + timedelta(days=1, hours=1))
    pricing = Pricing(PRICES)
    start, end = parse_when("2026-11-20"), parse_when("2026-11-21", end_of_day=True)

    report = build_report(engine, pricing, start, end, ["tenant", "model", "day"])
    rows = {(r.group["tenant"], r.group["model"], r.group["day"]): r for r in report.rows}
    assert rows[("acme", "digits", "2026-11-20")].used_ns == 3 * 10**9 + 10**9
    assert rows[("globex", "digits", "2026-11-20")].used_ns == 10**9
    assert rows[("globex", "digits", "2026-11-21")].used_ns == 2 * 10**9
    assert rows[("acme", "bert", "2026-11-20")].used_ns == 3 * 10**9  # share 0.5
    # Priced as of the batch's day: 0.36/h on the 20th, 0.72/h on the 21st, cuda 3.60/h.
    assert rows[("acme", "digits", "2026-11-20")].cost() == Decimal("0.000400000")
    assert rows[("globex", "digits", "2026-11-21")].cost() == Decimal("0.000400000")
    assert rows[("acme", "bert", "2026-11-20")].cost() == Decimal("0.003000000")
    # Idle = reserved - used, per model version and day; used + idle = reserved.
    idle_20 = rows[(IDLE, "digits", "2026-11-20")]
    assert idle_20.idle_ns == 5_400 * 10**9 - 5 * 10**9
    assert rows[(IDLE, "digits", "2026-11-21")].idle_ns == 3_600 * 10**9 - 2 * 10**9
    used = sum(r.used_ns for r in report.rows)
    digits_used = sum(r.used_ns for r in report.rows if r.group["model"] == "digits")
    digits_idle = sum(r.idle_ns for r in report.rows if r.group["model"] == "digits")
    assert digits_used + digits_idle == report.reserved_ns == 9_000 * 10**9
    with engine.connect() as conn:
        ledger_ns = conn.execute(sa.select(sa.func.sum(ledger_allocations.c.charge_ns))).scalar()
    assert used == report.total.used_ns == ledger_ns

    # --share-idle spreads idle over the tenants by use; nothing is left unowned there.
    shared = build_report(engine, pricing, start, end, ["tenant"], share_idle=True)
    by_tenant = {r.group["tenant"]: r for r in shared.rows}
    assert IDLE not in by_tenant
    assert shared.total.idle_ns == report.total.idle_ns
    assert shared.total.total_ns == report.total.total_ns
    # acme used 4 s of digits' 5 s on the 20th: it carries 4/5 of that day's idle.
    acme_idle = by_tenant["acme"].idle_ns
    assert acme_idle == round(Fraction(4, 5) * (5_400 - 5) * 10**9)

    # A tenant's own view: its usage only, no idle.
    own = build_report(engine, pricing, start, end, ["model"], tenant="globex")
    assert own.total.used_ns == 3 * 10**9 and own.total.idle_ns == 0

    # CSV parses, and its rows add up to its TOTAL line.
    text = render(report.as_dict(), "csv")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert parsed[-1]["tenant"] == "TOTAL"
    body = parsed[:-1]
    assert sum(int(r["used_ns"]) for r in body) == int(parsed[-1]["used_ns"]) == used
    assert sum(Decimal(r["cost"]) for r in body) == pytest.approx(Decimal(parsed[-1]["cost"]))
    data = json.loads(render(report.as_dict(), "json"))
    assert data["totals"]["reserved_ns"] == report.reserved_ns
    assert "TOTAL" in render(report.as_dict(), "table")


def test_report_refuses_bad_requests(engine: sa.Engine) -> None:
    pricing = Pricing(PRICES)
    with pytest.raises(ReportError, match="cannot group by"):
        build_report(engine, pricing, DAY, DAY + timedelta(days=1), ["colour"])
    with pytest.raises(ReportError, match="after"):
        build_report(engine, pricing, DAY, DAY, ["tenant"])
    with pytest.raises(ReportError, match="not a date"):
        parse_when("yesterday")


def test_the_http_form_of_a_report(engine: sa.Engine) -> None:
    ledger = Ledger(engine, Pricing(PRICES))
    ledger.write([record("digits", [("acme", 2), ("globex", 2)], 2 * 10**9, DAY)])
    now = DAY + timedelta(hours=2)
    pricing = Pricing(PRICES)
    # Defaults: this month so far, by tenant.
    data = report_for_query(engine, pricing, {}, now=now)
    assert {r["tenant"] for r in data["rows"]} == {"acme", "globex"}
    assert data["from"].startswith("2026-11-01") and data["to"] == now.isoformat()
    own = report_for_query(engine, pricing, {"group_by": "model,day"}, tenant="acme", now=now)
    assert own["rows"] == [
        {**own["rows"][0], "model": "digits", "day": "2026-11-20", "used_ns": 10**9}
    ]
    assert own["totals"]["reserved_ns"] == 0  # a tenant sees its use, not the fleet's
    with pytest.raises(ReportError, match="unknown parameter"):
        report_for_query(engine, pricing, {"tenant": "globex"}, tenant="acme", now=now)
    with pytest.raises(ReportError, match="share_idle"):
        report_for_query(engine, pricing, {"share_idle": "maybe"}, now=now)
