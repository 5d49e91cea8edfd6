"""Rate quotas: a tenant's requests and rows per second, as token buckets with a burst.

A bucket holds at most ``burst`` tokens and gains ``per_s`` a second; a request takes
one token from its tenant's request bucket, and its rows from the rows bucket, or is
refused (429 / RESOURCE_EXHAUSTED) with the time until enough tokens are back as its
retry delay. A refused request takes nothing. A quota may hold for the tenant over
every model, and per model on top (both apply). Rows above a bucket's burst could
never pass: that request is refused as too large (413), not asked to wait.

Several gateways share one quota: each enforces ``share`` of it (rate and burst). The
shares are rebalanced every ``REBALANCE_S`` (half a second) in proportion to where the
tenant's demand arrived (:func:`rebalance`), so the sum over the gateways is the
configured rate, whichever gateway the traffic hits; one gateway alone has share 1.
Traffic that moves from one gateway to another is under-served until the next
rebalance.

Only buckets in use are kept: a bucket that has refilled to its burst is the same as a
new one, and is dropped when the table grows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

from router._exceptions import PayloadTooLarge, ResourceExhausted
from router.metrics import RouterMetrics
from router.types import Rate

# (tenant, model or "" for every model, "requests" or "rows"): one bucket.
Key = tuple[str, str, str]

# How often several gateways rebalance their shares of each quota: traffic that moves
# from one gateway to another gets at most this long of the quota's rate less.
REBALANCE_S = 0.5
# Past this many buckets, full ones are dropped.
_PRUNE_AT = 4096


class _Bucket:
    __slots__ = ("burst", "per_s", "tokens", "updated")

    def __init__(self, per_s: float, burst: float, now: float) -> None:
        self.per_s = per_s
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.per_s)
        self.updated = now

    def rescale(self, per_s: float, burst: float) -> None:
        """A new rate or share: the tokens held keep their fraction of the burst."""
        if burst != self.burst:
            self.tokens = self.tokens * burst / self.burst if self.burst else burst
        self.per_s, self.burst = per_s, burst


class Quotas:
    """Every tenant's buckets on this gateway; see the module."""

    def __init__(self, metrics: RouterMetrics, clock: Callable[[], float] = time.monotonic):
        self._metrics = metrics
        self._clock = clock
        self._buckets: dict[Key, _Bucket] = {}
        self._shares: dict[Key, float] = {}
        self.default_share = 1.0  # of a key no rebalance has named yet
        self._demand: dict[Key, float] = {}

    def take(self, tenant: str, model: str, kind: str, rate: Rate | None, amount: float) -> None:
        """Take ``amount`` tokens of the bucket (``model`` "" for the tenant's quota over
        every model), or refuse: ResourceExhausted with the wait, or PayloadTooLarge
        when ``amount`` is over the whole burst."""
        if rate is None:
            return
        key = (tenant, model, kind)
        self._demand[key] = self._demand.get(key, 0.0) + amount
        share = self._shares.get(key, self.default_share)
        per_s, burst = rate.per_s * share, max(rate.burst * share, 1.0)
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(per_s, burst, now)
        else:
            bucket.refill(now)
            if per_s != bucket.per_s or burst != bucket.burst:
                bucket.rescale(per_s, burst)
        if amount <= bucket.tokens:
            bucket.tokens -= amount
            return
        scope = f"model {model!r}" if model else "all models"
        reason = f"{kind}_per_s"
        self._metrics.refused(tenant, reason)
        if amount > rate.burst:
            raise PayloadTooLarge(
                f"{amount:g} {kind} in one request exceed tenant {tenant!r}'s burst of "
                f"{rate.burst:g} {kind} ({scope})"
            )
        wait = (amount - bucket.tokens) / per_s if per_s > 0 else math.inf
        raise ResourceExhausted(
            f"tenant {tenant!r} is over its quota of {rate.per_s:g} {kind}/s ({scope})",
            retry_after_s=wait if math.isfinite(wait) else 60.0,
        )

    def take_demand(self) -> dict[Key, float]:
        """What was asked of each bucket since the last call (granted or refused)."""
        demand, self._demand = self._demand, {}
        return demand

    def set_shares(self, shares: Mapping[Key, float], default_share: float) -> None:
        """This gateway's share of each quota from now on (the rest: ``default_share``)."""
        self._shares = dict(shares)
        self.default_share = default_share

    def _prune(self, now: float) -> None:
        for bucket in self._buckets.values():
            bucket.refill(now)
        self._buckets = {k: b for k, b in self._buckets.items() if b.tokens < b.burst}


def rebalance(demands: Iterable[Mapping[Key, float]]) -> list[dict[Key, float]]:
    """Each gateway's share of each quota, in proportion to the demand it saw (one
    mapping per gateway, in the same order as ``demands``). A gateway that saw none of a
    key keeps a small share, so that traffic moving to it is not refused outright until
    the next rebalance; the shares of a key sum to 1."""
    demands = list(demands)
    n = len(demands)
    keys = {key for demand in demands for key in demand}
    shares: list[dict[Key, float]] = [{} for _ in range(n)]
    for key in keys:
        # Half a token a second of demand everywhere: a floor, and a tie-break at zero.
        seen = [demand.get(key, 0.0) + 0.5 for demand in demands]
        total = sum(seen)
        for i in range(n):
            shares[i][key] = seen[i] / total
    return shares
