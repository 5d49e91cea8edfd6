"""The batch former's fairness, driven with simulated time (no event loop)."""

from __future__ import annotations

import math
import random

import pytest

from scheduler import FairQueue, Pending, QueueFullError

BATCH = 32


def _queue() -> FairQueue:
    return FairQueue(max_queued_rows=10**9, max_queued_rows_per_tenant=10**9)


def _served_rows(batches: list[list[Pending]], tenant: str) -> int:
    return sum(r.rows for b in batches for r in b if r.tenant == tenant)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0), (2.0, 5.0)])
def test_backlogged_tenants_get_weighted_shares_within_two_batches(
    weights: tuple[float, float],
) -> None:
    rng = random.Random(7)
    q = _queue()
    wa, wb = weights
    for _ in range(3000):  # both stay backlogged for the whole run
        q.push(Pending("a", rows=rng.randint(1, 8), weight=wa))
        q.push(Pending("b", rows=rng.randint(1, 8), weight=wb))
    batches: list[list[Pending]] = []
    worst = 0.0
    for _ in range(300):
        batches.append(q.take_batch(BATCH))
        sa = _served_rows(batches, "a") / wa
        sb = _served_rows(batches, "b") / wb
        worst = max(worst, abs(sa - sb))
    # Weight-normalized service never drifts more than about two batches apart.
    assert worst <= 2 * BATCH / min(wa, wb)
    total = _served_rows(batches, "a") + _served_rows(batches, "b")
    assert total >= 300 * (BATCH - 7)  # batches are (nearly) full: work-conserving
    share_a = _served_rows(batches, "a") / total
    assert share_a == pytest.approx(wa / (wa + wb), abs=0.02)


def test_returning_tenant_gets_no_banked_credit() -> None:
    q = _queue()
    for _ in range(1000):  # 125 batches of backlog
        q.push(Pending("a", rows=4))
    for _ in range(50):  # a alone: b is idle and must not accumulate credit
        q.take_batch(BATCH)
    for _ in range(200):
        q.push(Pending("b", rows=4))
    batches = [q.take_batch(BATCH) for _ in range(10)]
    b_rows = _served_rows(batches, "b")
    a_rows = _served_rows(batches, "a")
    # Without the floor b would take everything for 50 batches; with it, shares are even.
    assert abs(a_rows - b_rows) <= 2 * BATCH
    assert a_rows > 0


def _light_tenant_waits(heavy_backlog_rows: int) -> list[float]:
    """Simulated time: a batch takes 1 unit; light sends 1 row every 3 units."""
    q = _queue()
    for _ in range(heavy_backlog_rows // 8):
        q.push(Pending("heavy", rows=8, arrival=0.0))
    waits: list[float] = []
    now = 0.0
    next_light = 0.5
    while now < 200:
        while next_light <= now:
            q.push(Pending("light", rows=1, arrival=next_light))
            next_light += 3
        for r in q.take_batch(BATCH):
            if r.tenant == "light":
                waits.append(now - r.arrival)
        now += 1.0
        # heavy keeps its backlog topped up, whatever its size
        while q.tenant_rows("heavy") < heavy_backlog_rows:
            q.push(Pending("heavy", rows=8, arrival=now))
    return waits


def test_light_tenant_wait_does_not_grow_with_heavy_backlog() -> None:
    small = _light_tenant_waits(64)
    huge = _light_tenant_waits(20_000)
    assert len(small) == len(huge) > 50
    assert max(huge) <= 1.0  # served in the first batch formed after it arrived
    assert max(huge) == max(small)


def test_priority_beats_fairness_and_order_within_tenant_is_fifo() -> None:
    q = _queue()
    low = [Pending("a", rows=1, priority=2) for _ in range(3)]
    high = Pending("b", rows=1, priority=1)
    for r in low:
        q.push(r)
    q.push(high)
    batch = q.take_batch(BATCH)
    assert batch[0] is high
    assert batch[1:] == low


def test_batch_respects_max_rows_and_skips_heads_that_do_not_fit() -> None:
    q = _queue()
    big = Pending("a", rows=30)
    small = Pending("b", rows=5)
    q.push(Pending("a", rows=10))
    q.push(big)
    q.push(small)
    first = q.take_batch(BATCH)
    assert sum(r.rows for r in first) <= BATCH
    assert small in first and big not in first
    assert q.take_batch(BATCH) == [big]
    assert q.rows == 0


def test_expire_returns_only_past_deadlines_and_they_are_not_taken() -> None:
    q = _queue()
    soon = Pending("a", rows=1, deadline=1.0)
    later = Pending("a", rows=1, deadline=5.0)
    never = Pending("b", rows=1)
    for r in (soon, later, never):
        q.push(r)
    assert q.next_deadline() == 1.0
    assert q.expire(2.0) == [soon]
    assert q.next_deadline() == 5.0
    assert set(q.take_batch(BATCH)) == {later, never}
    assert q.expire(math.inf) == []


def test_caps_refuse_before_queueing() -> None:
    q = FairQueue(max_queued_rows=10, max_queued_rows_per_tenant=6)
    q.push(Pending("a", rows=6))
    with pytest.raises(QueueFullError, match="tenant 'a'"):
        q.push(Pending("a", rows=1))
    q.push(Pending("b", rows=4))
    with pytest.raises(QueueFullError, match="model queue is full") as full:
        q.push(Pending("c", rows=1))
    assert q.rows == 10
    # Told to the caller: the limit, never how many rows other tenants have queued.
    assert str(full.value) == "model queue is full (limit 10 rows)"
    assert full.value.queued_rows == 10  # kept for the gateway's own use


def test_removed_request_frees_its_rows_and_is_never_taken() -> None:
    q = _queue()
    gone = Pending("a", rows=3)
    kept = Pending("a", rows=2)
    q.push(gone)
    q.push(kept)
    assert q.remove(gone)
    assert not q.remove(gone)
    assert q.rows == 2
    assert q.take_batch(BATCH) == [kept]
    assert q.oldest_arrival() is None


def test_batch_holds_one_group_only() -> None:
    q = _queue()
    short = [Pending("a", rows=1) for _ in range(2)]
    long = Pending("b", rows=1)
    for r in short:
        r.group = (("x", (3,)),)
    long.group = (("x", (7,)),)
    q.push(short[0])
    q.push(long)
    q.push(short[1])
    first = q.take_batch(BATCH)
    assert first == short or first == [long]
    second = q.take_batch(BATCH)
    assert sorted(map(id, first + second)) == sorted(map(id, [*short, long]))
    assert all(r.group == first[0].group for r in first)


def test_urgent_level_beats_the_default_level() -> None:
    from router.tensors import DEFAULT_PRIORITY_LEVEL, parse_params

    q = _queue()
    default = Pending("a", rows=1, priority=parse_params({}).priority)
    urgent = Pending("b", rows=1, priority=parse_params({"priority": 1}).priority)
    background = Pending("c", rows=1, priority=parse_params({"priority": 3}).priority)
    assert default.priority == DEFAULT_PRIORITY_LEVEL
    for r in (background, default, urgent):
        q.push(r)
    assert q.take_batch(BATCH) == [urgent, default, background]


def test_expired_and_cancelled_requests_do_not_linger_in_tenant_heaps() -> None:
    q = _queue()
    for i in range(1000):
        r = Pending("a", rows=1, priority=3, deadline=float(i))
        q.push(r)
        q.expire(float(i))
        c = Pending("a", rows=1)
        q.push(c)
        q.remove(c)
    assert q.rows == 0
    assert q._tenants["a"].heap == []


def test_a_lane_only_batch_takes_marked_requests_and_the_count_follows_every_exit() -> None:
    q = _queue()
    heavy = [Pending("heavy", rows=4) for _ in range(3)]
    light = Pending("light", rows=1, lane=True)
    late = Pending("late", rows=2, lane=True, deadline=5.0)
    gone = Pending("gone", rows=1, lane=True)
    for r in (*heavy, light, late, gone):
        q.push(r)
    assert q.lane_requests == 3
    assert q.remove(gone)
    assert q.expire(now=6.0) == [late]
    assert q.lane_requests == 1
    # Room for everything, yet only the marked request is taken.
    assert q.take_batch(BATCH, lane_only=True) == [light]
    assert q.lane_requests == 0
    assert q.take_batch(BATCH, lane_only=True) == []
    assert q.take_batch(BATCH) == heavy


def test_lane_service_counts_toward_the_tenants_fair_share() -> None:
    q = _queue()
    q.push(Pending("light", rows=1, lane=True))
    q.push(Pending("light", rows=1))  # older than heavy's: it would win a tie
    q.push(Pending("heavy", rows=1))
    assert q.take_batch(BATCH, lane_only=True)[0].tenant == "light"
    # The lane's row was service (light's counter 1, heavy's 0): heavy goes next.
    assert [r.tenant for r in q.take_batch(1)] == ["heavy"]


def test_a_lane_only_batch_never_takes_a_request_below_the_most_urgent_level() -> None:
    q = _queue()
    q.push(Pending("light", rows=1, lane=True, priority=2))
    q.push(Pending("urgent", rows=4, priority=1))
    assert q.take_batch(BATCH, lane_only=True) == []
    assert [r.tenant for r in q.take_batch(BATCH)] == ["urgent", "light"]
