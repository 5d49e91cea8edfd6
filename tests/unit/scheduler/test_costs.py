"""Exact attribution of a batch's charge to its requests (largest remainder)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import pytest

from scheduler import (
    BackendUnavailableError,
    BatchPolicy,
    BatchRecord,
    BatchResult,
    ModelBatcher,
    Receipt,
    Share,
    TenantShare,
    Tensors,
    charge_ns,
    split_by_rows,
)


def test_split_is_proportional_and_exact() -> None:
    assert split_by_rows(10, [1, 1, 1]) == [4, 3, 3]  # the tie goes to the earlier request
    assert split_by_rows(100, [1, 3]) == [25, 75]
    assert split_by_rows(0, [5, 2]) == [0, 0]
    assert split_by_rows(7, [2, 1, 1]) == [3, 2, 2]  # quotas 3.5, 1.75, 1.75: .75s win
    assert split_by_rows(1, [1] * 5) == [1, 0, 0, 0, 0]


def test_split_rejects_impossible_inputs() -> None:
    with pytest.raises(ValueError):
        split_by_rows(10, [])
    with pytest.raises(ValueError):
        split_by_rows(10, [1, 0])
    with pytest.raises(ValueError):
        split_by_rows(-1, [1])


def test_randomized_split_conserves_and_stays_within_one_ns_of_the_quota() -> None:
    rng = random.Random(7)
    for _ in range(5_000):
        rows = [rng.randint(1, 64) for _ in range(rng.randint(1, 40))]
        total = rng.randint(0, 10**13)
        parts = split_by_rows(total, rows)
        assert sum(parts) == total
        for part, r in zip(parts, rows, strict=True):
            quota = Fraction(total * r, sum(rows))
            assert abs(part - quota) < 1


def test_charge_is_device_time_times_share_rounded_once() -> None:
    assert charge_ns(1_000_000, 1.0) == 1_000_000
    assert charge_ns(1_000_001, 0.5) == 500_000  # 500000.5 rounds half to even
    assert charge_ns(3, 0.25) == 1
    assert charge_ns(10**12, 0.1) == round(Fraction(10**12) * Fraction(0.1))
    with pytest.raises(ValueError):
        charge_ns(-1, 1.0)


class ShareBackend:
    """Random device time and share per batch: the split must still be exact."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        await asyncio.sleep(0)
        share = self.rng.choice([1.0, 0.5, 0.25, 1 / 3, 2.0])
        return BatchResult(
            {"y": inputs["x"] * 2}, self.rng.randint(1, 10**9), "cpu", device_share=share
        )


class RecordingSink:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.committed: list[BatchRecord] = []
        self.released_before_commit = 0
        self.futures: list[asyncio.Future[Tensors]] = []

    async def commit(self, record: BatchRecord) -> Sequence[float]:
        await asyncio.sleep(0.001)  # a commit takes time; results must wait for it
        if self.fail:
            raise OSError("database is down")
        self.committed.append(record)
        return [ns / 1e9 for ns in record.charges_ns]


def test_every_batch_is_committed_before_its_results_are_released() -> None:
    sink = RecordingSink()
    records: list[BatchRecord] = []
    receipts = [Receipt() for _ in range(200)]
    rng = random.Random(3)
    rows = [rng.randint(1, 8) for _ in range(200)]

    async def main() -> None:
        b = ModelBatcher(
            "m",
            "1",
            ShareBackend(11),
            BatchPolicy(max_batch_size=32),
            observer=records.append,
            ledger=sink,
        )
        b.start()

        async def one(i: int) -> None:
            x = {"x": np.full((rows[i], 2), i, np.float32)}
            out = await b.submit(f"t{i % 7}", x, rows[i], receipt=receipts[i])
            # Released only after its batch was committed, with its own part on it.
            assert any(
                r.charges_ns and receipts[i].charge_ns in r.charges_ns for r in sink.committed
            )
            assert (out["y"] == 2 * i).all()

        await asyncio.gather(*(one(i) for i in range(200)))
        await b.close()

    asyncio.run(main())
    assert len(sink.committed) == len(records) > 1
    # Conservation, exact: the requests' parts add up to the batches' charges.
    assert sum(r.charge_ns for r in records) == sum(sum(r.charges_ns) for r in records)
    assert sum(rc.charge_ns for rc in receipts) == sum(r.charge_ns for r in records)
    for r in records:
        assert r.result is not None
        assert r.charge_ns == charge_ns(r.result.device_ns, r.result.device_share)
        assert sum(rows for _, rows in r.tenants) == r.rows
        assert r.finished_at_ns >= r.started_at_ns
    assert all(rc.batch_rows >= 1 and rc.cost == rc.charge_ns / 1e9 for rc in receipts)


def test_a_ledger_failure_withholds_the_results() -> None:
    sink = RecordingSink(fail=True)
    records: list[BatchRecord] = []

    async def main() -> list[BaseException | Tensors]:
        b = ModelBatcher(
            "m",
            "1",
            ShareBackend(1),
            BatchPolicy(max_batch_size=8),
            observer=records.append,
            ledger=sink,
        )
        b.start()
        x = {"x": np.ones((1, 2), np.float32)}
        outs = await asyncio.gather(
            *(b.submit("t", x, 1) for _ in range(5)), return_exceptions=True
        )
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert all(isinstance(o, BackendUnavailableError) for o in outs)
    assert "cost ledger unavailable" in str(outs[0])
    assert sum(r.rows for r in records) == 5  # the batches ran; observers still see them


def test_by_tenant_sums_a_batchs_requests_rows_and_charge_per_tenant() -> None:
    charges = tuple(split_by_rows(1_000_003, [2, 1, 3, 4]))
    record = BatchRecord(
        model="m",
        version="1",
        tenants=(("a", 2), ("b", 1), ("a", 3), ("c", 4)),
        rows=10,
        result=BatchResult({}, 1_000_003, "cpu", 1.0),
        queue_wait_s=(0.0,) * 4,
        duration_s=0.0,
        started_at_ns=0,
        finished_at_ns=0,
        charge_ns=1_000_003,
        charges_ns=charges,
    )
    assert record.by_tenant == {
        "a": TenantShare(2, 5, charges[0] + charges[2]),
        "b": TenantShare(1, 1, charges[1]),
        "c": TenantShare(1, 4, charges[3]),
    }
    assert list(record.by_tenant) == ["a", "b", "c"]
    assert sum(s.charge_ns for s in record.by_tenant.values()) == 1_000_003
    # A failed batch has no charges: its tenants are listed with none.
    failed = BatchRecord("m", "1", (("a", 1),), 1, None, (0.0,), 0.0, 0, 0)
    assert failed.by_tenant == {"a": TenantShare(1, 1, 0)}
