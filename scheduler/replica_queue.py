"""The replica's order over the batches that wait for its device, from every gateway.

Each gateway is fair among the tenants it sees (:class:`~scheduler.fair_queue.FairQueue`),
but a replica serves several gateways, and a gateway sees only the tenants that
happen to reach it. Spread in the worst way (each tenant on a gateway of its own),
two backlogged tenants at weights 1:3 would share a replica 1:1: each gateway keeps
its batches in flight, and arrival order alternates between them.

So a batch carries, per tenant, the rows it holds, the tenant's weight and its
priority (:class:`~scheduler.types.Share`), and the replica keeps the same virtual
counters as the gateways' queues, over everything it runs: a tenant's counter grows
by rows / weight with every batch of its that runs. The next batch is:

1. a latency-lane (urgent) batch, oldest first: the lane goes past ordinary batches;
2. else the ordinary batch of the most urgent priority level held;
3. of those, the one whose tenants are furthest behind: the lowest counter, averaged
   over the batch's rows by tenant (a batch of one tenant: that tenant's counter);
4. of equals, the oldest.

A tenant that comes back from idle (no batch waiting here, nor the one running or
just run) re-enters at the smallest counter among those active, or at the last batch's
when none is, so idleness banks no credit. For the 1:3 bound to hold across gateways, each gateway
must keep batches waiting at the replica while one runs (two in flight per replica,
``batches_in_flight_per_replica``): the replica can only choose among what is there.

Synchronous and clock-free, like the fair queue: the data server drives it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from scheduler.types import Share

T = TypeVar("T")

# A batch with no shares (a sender that does not say whom it holds) is one tenant.
ANONYMOUS = ""
# Counters of tenants no longer active are dropped past this many (they would re-enter
# at the floor anyway, or close to it).
_KEEP_IDLE = 1024


@dataclass(eq=False)
class _Waiting(Generic[T]):
    item: T
    urgent: bool
    level: int
    rows: dict[str, int]  # by tenant
    weights: dict[str, float]
    seq: int = field(default=0)


class ReplicaQueue(Generic[T]):
    """Batches waiting for one replica's device, taken in fair order (see the module)."""

    def __init__(self) -> None:
        self._waiting: list[_Waiting[T]] = []
        self._vt: dict[str, float] = {}
        self._active: dict[str, int] = {}  # tenant -> batches waiting or running here
        self._running: _Waiting[T] | None = None
        self._last_vt = 0.0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def push(self, item: T, shares: Sequence[Share] = (), *, urgent: bool = False) -> None:
        rows: dict[str, int] = {}
        weights: dict[str, float] = {}
        shares = shares or (Share(ANONYMOUS, 1, 1.0, 0),)
        for share in shares:
            rows[share.tenant] = rows.get(share.tenant, 0) + share.rows
            weights[share.tenant] = share.weight if share.weight > 0 else 1.0
        level = min(share.priority for share in shares)
        for tenant in rows:
            count = self._active.get(tenant, 0)
            if not count:  # back from idle: no credit for the time away
                floor = min((self._vt[t] for t in self._active), default=self._last_vt)
                self._vt[tenant] = max(self._vt.get(tenant, floor), floor)
            self._active[tenant] = count + 1
        self._waiting.append(_Waiting(item, urgent, level, rows, weights, next(self._seq)))

    def pop(self) -> T:
        """The next batch to run. Its tenants stay active until the pop after: the
        next batch of a tenant arrives while the replica's loop runs this one, and is
        read only once it has finished."""
        self._retire_running()
        best = min(self._waiting, key=self._key)
        self._waiting.remove(best)
        total = sum(best.rows.values())
        self._last_vt = sum(self._vt[t] * r for t, r in best.rows.items()) / max(total, 1)
        for tenant, rows in best.rows.items():
            self._vt[tenant] += rows / best.weights[tenant]
        self._running = best
        return best.item

    def _retire_running(self) -> None:
        running, self._running = self._running, None
        if running is None:
            return
        for tenant in running.rows:
            left = self._active[tenant] - 1
            if left:
                self._active[tenant] = left
            else:
                del self._active[tenant]
        if len(self._vt) > len(self._active) + _KEEP_IDLE:
            self._vt = {t: v for t, v in self._vt.items() if t in self._active}

    def _key(self, w: _Waiting[T]) -> tuple[int, int, float, int]:
        if w.urgent:
            return (0, 0, 0.0, w.seq)
        total = sum(w.rows.values())
        behind = sum(self._vt[t] * r for t, r in w.rows.items()) / max(total, 1)
        return (1, w.level, behind, w.seq)
