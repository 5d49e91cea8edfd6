"""Tenant-fair queue of one model version: the batch former's state machine.

Anchor: VTC (Sheng et al., OSDI 2024) / start-time fair queuing. Every tenant
has a virtual service counter advanced by rows served divided by its weight; a
batch is filled from the backlogged tenant with the smallest counter. A tenant
that comes back from idle re-enters at the smallest counter among backlogged
tenants (or the last served one when nobody waits), so idleness banks no credit.

Priority is stricter than fairness: a request with a lower priority number is
taken before any request with a higher one, and fairness orders tenants within
a level. Deadlines are tracked so expired requests are answered, never run.

Synchronous and clock-free on purpose: the async driver passes ``now`` in, and
tests drive it with simulated time.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from scheduler._exceptions import QueueFullError


@dataclass(eq=False)
class Pending:
    """One queued request. ``payload`` is the driver's business, opaque here."""

    tenant: str
    rows: int
    weight: float = 1.0
    priority: int = 0
    deadline: float = math.inf
    arrival: float = 0.0
    payload: Any = None
    # Requests batch together only within one group (e.g. equal non-batch dims of
    # variable-length inputs, which could not be concatenated otherwise).
    group: Hashable = None
    # May ride the latency lane (the driver decides who qualifies: see ModelBatcher).
    lane: bool = False
    seq: int = field(default=0, init=False)
    dead: bool = field(default=False, init=False)  # removed: taken, expired or cancelled


class _TenantQueue:
    __slots__ = ("heap", "rows", "vt")

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, Pending]] = []  # (priority, seq, request)
        self.rows = 0
        self.vt = 0.0

    def head(self) -> Pending | None:
        while self.heap and self.heap[0][2].dead:
            heapq.heappop(self.heap)
        return self.heap[0][2] if self.heap else None


class FairQueue:
    def __init__(self, max_queued_rows: int, max_queued_rows_per_tenant: int) -> None:
        self.max_queued_rows = max_queued_rows
        self.max_queued_rows_per_tenant = max_queued_rows_per_tenant
        self.rows = 0
        self.lane_requests = 0  # queued requests with ``lane`` set
        self._tenants: dict[str, _TenantQueue] = {}
        self._backlogged: set[str] = set()
        self._arrivals: list[tuple[float, int, Pending]] = []  # for the oldest waiter
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._seq = itertools.count()
        self._last_vt = 0.0  # counter of the tenant served last: the floor when all idle

    def push(self, req: Pending) -> None:
        if self.rows + req.rows > self.max_queued_rows:
            raise QueueFullError("model", self.rows, self.max_queued_rows)
        tq = self._tenants.get(req.tenant)
        if tq is None:
            tq = self._tenants[req.tenant] = _TenantQueue()
        if tq.rows + req.rows > self.max_queued_rows_per_tenant:
            raise QueueFullError(f"tenant {req.tenant!r}", tq.rows, self.max_queued_rows_per_tenant)
        if req.tenant not in self._backlogged:
            floor = min((self._tenants[t].vt for t in self._backlogged), default=self._last_vt)
            tq.vt = max(tq.vt, floor)
            self._backlogged.add(req.tenant)
        req.seq = next(self._seq)
        heapq.heappush(tq.heap, (req.priority, req.seq, req))
        heapq.heappush(self._arrivals, (req.arrival, req.seq, req))
        if req.deadline != math.inf:
            heapq.heappush(self._deadlines, (req.deadline, req.seq, req))
        tq.rows += req.rows
        self.rows += req.rows
        self.lane_requests += req.lane

    def remove(self, req: Pending) -> bool:
        """Drop a queued request (its caller went away). False if already gone."""
        if req.dead:
            return False
        self._retire(req)
        return True

    def take_batch(self, max_rows: int, lane_only: bool = False) -> list[Pending]:
        """Up to ``max_rows`` rows of one group, in priority then weighted-fair order.

        A tenant whose next request is of another group waits for a later batch.
        ``lane_only``: take only requests marked ``lane`` (a tenant whose next request
        is not marked is passed over), and none of a level less urgent than the most
        urgent queued: the lane goes past full batches, never past priority.
        """
        batch: list[Pending] = []
        room = max_rows
        level = self.most_urgent_level() if lane_only else math.inf
        while room > 0 and self._backlogged:
            best: tuple[int, float, int] | None = None
            chosen: _TenantQueue | None = None
            for name in self._backlogged:
                tq = self._tenants[name]
                head = tq.head()
                if head is None or head.rows > room or (batch and head.group != batch[0].group):
                    continue
                if lane_only and (not head.lane or head.priority > level):
                    continue
                key = (head.priority, tq.vt, head.seq)
                if best is None or key < best:
                    best, chosen = key, tq
            if chosen is None:
                break  # nothing left fits the room
            _, _, req = heapq.heappop(chosen.heap)
            self._last_vt = chosen.vt
            chosen.vt += req.rows / req.weight
            self._retire(req)
            batch.append(req)
            room -= req.rows
        self._compact()
        return batch

    def expire(self, now: float) -> list[Pending]:
        """Remove and return the requests whose deadline has passed."""
        expired: list[Pending] = []
        while self._deadlines and (self._deadlines[0][2].dead or self._deadlines[0][0] <= now):
            _, _, req = heapq.heappop(self._deadlines)
            if not req.dead:
                self._retire(req)
                expired.append(req)
        return expired

    def oldest_arrival(self) -> float | None:
        while self._arrivals and self._arrivals[0][2].dead:
            heapq.heappop(self._arrivals)
        return self._arrivals[0][0] if self._arrivals else None

    def next_deadline(self) -> float | None:
        while self._deadlines and self._deadlines[0][2].dead:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def most_urgent_level(self) -> float:
        """The smallest priority number queued (inf when nothing is); O(tenants)."""
        heads = (self._tenants[t].head() for t in self._backlogged)
        return min((h.priority for h in heads if h is not None), default=math.inf)

    def tenant_rows(self, tenant: str) -> int:
        tq = self._tenants.get(tenant)
        return tq.rows if tq else 0

    def _retire(self, req: Pending) -> None:
        req.dead = True
        tq = self._tenants[req.tenant]
        tq.rows -= req.rows
        self.rows -= req.rows
        self.lane_requests -= req.lane
        if tq.rows == 0:
            self._backlogged.discard(req.tenant)
            tq.heap.clear()  # only dead entries are left; drop them and their inputs

    def _compact(self) -> None:
        # Dead entries are skipped lazily; rebuild when they dominate so heaps stay small.
        if len(self._arrivals) > 64 and len(self._arrivals) > 4 * (self.rows + 1):
            self._arrivals = [e for e in self._arrivals if not e[2].dead]
            heapq.heapify(self._arrivals)
            self._deadlines = [e for e in self._deadlines if not e[2].dead]
            heapq.heapify(self._deadlines)
