"""Rate quotas (router.quota) on a simulated clock: token buckets with a burst, refusals
that say how long to wait, and one quota shared by several gateways."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from router import PayloadTooLarge, Rate, ResourceExhausted
from router.metrics import RouterMetrics
from router.quota import REBALANCE_S, Quotas, rebalance


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _send(
    quotas: Quotas, clock: Clock, rate: Rate, per_s: float, seconds: float
) -> tuple[int, int]:
    """``per_s`` evenly spaced requests for ``seconds``: (granted, refused)."""
    granted = refused = 0
    for i in range(round(per_s * seconds)):
        clock.now = i / per_s
        try:
            quotas.take("t", "", "requests", rate, 1)
            granted += 1
        except ResourceExhausted as exc:
            assert exc.retry_after_s is not None and 0 < exc.retry_after_s <= 1 / rate.per_s
            refused += 1
    return granted, refused


def test_a_tenant_over_its_rate_gets_the_rate_plus_its_burst() -> None:
    clock = Clock()
    quotas = Quotas(RouterMetrics(None), clock)
    granted, refused = _send(quotas, clock, Rate(50, 5), 200, 10)
    assert granted == pytest.approx(50 * 10 + 5, abs=2)
    assert refused == 2000 - granted


def test_under_its_rate_nothing_is_refused() -> None:
    clock = Clock()
    quotas = Quotas(RouterMetrics(None), clock)
    assert _send(quotas, clock, Rate(50, 5), 45, 10) == (450, 0)


def test_the_wait_is_the_time_until_the_tokens_are_back() -> None:
    clock = Clock()
    quotas = Quotas(RouterMetrics(None), clock)
    rows = Rate(100, 100)
    quotas.take("t", "m", "rows", rows, 100)  # the whole burst
    clock.now = 0.25  # 25 rows back
    with pytest.raises(ResourceExhausted, match=r"100 rows/s \(model 'm'\)") as refused:
        quotas.take("t", "m", "rows", rows, 40)
    assert refused.value.retry_after_s == pytest.approx(0.15)
    quotas.take("t", "m", "rows", rows, 25)  # what is there passes; the refusal took none


def test_more_rows_than_the_burst_are_too_large_not_a_wait() -> None:
    quotas = Quotas(RouterMetrics(None), Clock())
    with pytest.raises(PayloadTooLarge, match="burst of 10 rows"):
        quotas.take("t", "", "rows", Rate(100, 10), 11)


def test_refusals_are_counted_by_tenant_and_reason() -> None:
    metrics = RouterMetrics(CollectorRegistry())
    quotas = Quotas(metrics, Clock())
    quotas.take("t", "", "requests", Rate(1, 1), 1)
    for _ in range(3):
        with pytest.raises(ResourceExhausted):
            quotas.take("t", "", "requests", Rate(1, 1), 1)
    count = metrics.registry.get_sample_value(
        "gpugate_admission_refusals_total", {"tenant": "t", "reason": "requests_per_s"}
    )
    assert count == 3


def test_shares_follow_the_demand_and_sum_to_one() -> None:
    key = ("t", "", "requests")
    shares = rebalance([{key: 150.0}, {key: 50.0}, {}])
    assert [s[key] for s in shares] == pytest.approx([150.5 / 201.5, 50.5 / 201.5, 0.5 / 201.5])
    assert sum(s[key] for s in shares) == pytest.approx(1.0)


@pytest.mark.parametrize("where", ["all on one", "even", "moves at 5 s"])
def test_two_gateways_share_one_quota_within_10_percent(where: str) -> None:
    """50 req/s offered 200 req/s for 10 s through two gateways that rebalance every
    REBALANCE_S: the total granted is 50/s within 10%, wherever the traffic goes (a
    move costs at most one interval of the moved traffic's quota)."""
    rate, per_s, seconds = Rate(50, 5), 200, 10
    clock = Clock()
    gateways = [Quotas(RouterMetrics(None), clock) for _ in range(2)]
    for g in gateways:
        g.default_share = 0.5
    granted = 0
    next_rebalance = REBALANCE_S
    for i in range(per_s * seconds):
        clock.now = i / per_s
        if clock.now >= next_rebalance:
            shares = rebalance([g.take_demand() for g in gateways])
            for g, share in zip(gateways, shares, strict=True):
                g.set_shares(share, 0.5)
            next_rebalance += REBALANCE_S
        if where == "all on one":
            target = 0
        elif where == "even":
            target = i % 2
        else:
            target = 0 if clock.now < 5 else 1
        try:
            gateways[target].take("t", "", "requests", rate, 1)
            granted += 1
        except ResourceExhausted:
            pass
    assert granted / seconds == pytest.approx(rate.per_s, rel=0.10), granted
