"""Refusals for load wait before they are answered, within a bound per tenant and within
the call's deadline."""

from __future__ import annotations

import asyncio
import time

from router.pacing import RefusalHold


def test_a_refusal_waits_the_hold_and_leaves_no_entry() -> None:
    pacing = RefusalHold(0.05, 4)

    async def run() -> float:
        started = time.monotonic()
        await pacing.hold("t")
        return time.monotonic() - started

    assert asyncio.run(run()) >= 0.05
    assert pacing.held("t") == 0 and not pacing._held


def test_past_the_bound_a_tenants_refusals_are_answered_at_once() -> None:
    pacing = RefusalHold(10.0, 2)

    async def run() -> None:
        waiting = [asyncio.create_task(pacing.hold("t")) for _ in range(2)]
        await asyncio.sleep(0)
        assert pacing.held("t") == 2
        await asyncio.wait_for(pacing.hold("t"), 1.0)  # the third: at once
        other = asyncio.create_task(pacing.hold("other"))  # another tenant's bound is its own
        await asyncio.sleep(0)
        assert pacing.held("other") == 1
        for task in [*waiting, other]:
            task.cancel()
        await asyncio.gather(*waiting, other, return_exceptions=True)
        assert not pacing._held  # a cancelled hold gives its place back

    asyncio.run(run())


def test_the_hold_takes_at_most_half_the_deadline_left_and_none_without_a_tenant() -> None:
    pacing = RefusalHold(10.0, 2)

    async def run() -> None:
        started = time.monotonic()
        await pacing.hold("t", time_remaining_s=0.1)
        assert 0.05 <= time.monotonic() - started < 1.0
        await asyncio.wait_for(pacing.hold(None), 1.0)
        await asyncio.wait_for(RefusalHold(0.0, 2).hold("t"), 1.0)

    asyncio.run(run())
