"""The replica's order over batches from several gateways (scheduler.replica_queue)."""

from __future__ import annotations

from collections import Counter

import pytest

from scheduler import ReplicaQueue, Share

ROWS = 32


def _gateways_each_with_one_tenant(
    weights: dict[str, float], batches: int, with_shares: bool = True, in_flight: int = 2
) -> Counter[str]:
    """Each tenant's requests reach a gateway of their own, which keeps ``in_flight``
    full batches at the replica. The replica runs one at a time; a gateway's next batch
    arrives while the one after the batch it answered runs (the answer's round trip),
    so it can only be picked from the pick after next. Rows served per tenant."""
    queue: ReplicaQueue[str] = ReplicaQueue()

    def send(tenant: str) -> None:
        shares = (Share(tenant, ROWS, weights[tenant], 2),) if with_shares else ()
        queue.push(tenant, shares)

    for _ in range(in_flight):
        for tenant in weights:
            send(tenant)
    served: Counter[str] = Counter()
    answered: str | None = None
    for _ in range(batches):
        tenant = queue.pop()
        if answered is not None:
            send(answered)  # arrived during this forward
        served[tenant] += ROWS
        answered = tenant
    return served


def test_two_tenants_on_two_gateways_share_the_replica_by_weight() -> None:
    served = _gateways_each_with_one_tenant({"light": 1.0, "heavy": 3.0}, 4000)
    assert served["heavy"] / served["light"] == pytest.approx(3.0, rel=0.01)


def test_without_shares_the_gateways_alternate_whatever_the_weights() -> None:
    """What the shares are for: in arrival order alone the replica gives 1:1."""
    served = _gateways_each_with_one_tenant({"light": 1.0, "heavy": 3.0}, 4000, False)
    assert served["heavy"] / served["light"] == pytest.approx(1.0, rel=0.01)


def test_three_gateways_share_by_weight() -> None:
    served = _gateways_each_with_one_tenant({"a": 1.0, "b": 2.0, "c": 5.0}, 8000)
    total = sum(served.values())
    for tenant, share in (("a", 1 / 8), ("b", 2 / 8), ("c", 5 / 8)):
        assert served[tenant] / total == pytest.approx(share, rel=0.02), served


def test_a_batch_of_many_tenants_counts_for_each_by_its_rows() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()
    # "mixed" holds 30 rows of a and 2 of b; then b alone, then a alone.
    queue.push("mixed", (Share("a", 30, 1.0, 2), Share("b", 2, 1.0, 2)))
    assert queue.pop() == "mixed"
    queue.push("b", (Share("b", 4, 1.0, 2),))
    queue.push("a", (Share("a", 4, 1.0, 2),))
    assert queue.pop() == "b"  # a was served 30 rows, b 2: b is behind


def test_urgent_first_then_priority_then_fairness_then_arrival() -> None:
    queue: ReplicaQueue[str] = ReplicaQueue()
    queue.push("warm", (Share("a", 100, 1.0, 2),))
    assert queue.pop() == "warm"  # a is now 100 rows ahead of anyone new
    queue.push("b-bg", (Share("b", 1, 1.0, 3),))
    queue.push("a-1", (Share("a", 1, 1.0, 2),))
    queue.push("c-1", (Share("c", 1, 1.0, 2),))
    queue.push("a-lane", (Share("a", 1, 1.0, 2),), urgent=True)
    queue.push("a-top", (Share("a", 1, 1.0, 1),))
    queue.push("c-2", (Share("c", 1, 1.0, 2),))
    order = []
    while queue:
        order.append(queue.pop())
    # the lane; level 1 though a is ahead; at level 2, c (behind a) first, in arrival
    # order; a; the background level last.
    assert order == ["a-lane", "a-top", "c-1", "c-2", "a-1", "b-bg"]


def test_idleness_banks_no_credit() -> None:
    """A tenant away while another was served comes back level with it, not behind by
    everything served meanwhile (it would then have the replica to itself)."""
    queue: ReplicaQueue[str] = ReplicaQueue()
    queue.push("b0", (Share("b", ROWS, 1.0, 2),))
    assert queue.pop() == "b0"
    for i in range(100):  # a alone for a while; b idle
        queue.push(f"a{i}", (Share("a", ROWS, 1.0, 2),))
        queue.pop()
    # Both come back: a keeps one batch in flight, b one; equal weights -> alternate.
    queue.push("a", (Share("a", ROWS, 1.0, 2),))
    queue.push("b", (Share("b", ROWS, 1.0, 2),))
    served = Counter()
    for _ in range(40):
        tenant = queue.pop()
        served[tenant] += 1
        queue.push(tenant, (Share(tenant, ROWS, 1.0, 2),))
    assert abs(served["a"] - served["b"]) <= 2, served


def test_the_batch_run_last_keeps_its_tenant_active() -> None:
    """A tenant whose only batch has just run is not idle: its next batch, read before
    the next pick, keeps the lag it has earned (the lower counter)."""
    queue: ReplicaQueue[str] = ReplicaQueue()
    queue.push("a0", (Share("a", ROWS, 1.0, 2),))
    queue.push("b0", (Share("b", ROWS, 3.0, 2),))
    queue.push("a1", (Share("a", ROWS, 1.0, 2),))
    assert queue.pop() == "a0"
    assert queue.pop() == "b0"  # b's counter: ROWS / 3, a's: ROWS
    queue.push("b1", (Share("b", ROWS, 3.0, 2),))  # b0 has run; b has nothing waiting
    assert queue.pop() == "b1"  # still behind a, though it was the last to wait
