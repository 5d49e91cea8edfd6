"""The async batch former of one model version.

Requests wait in a :class:`FairQueue`; whenever the backend has a free slot
(``max_in_flight`` batches outstanding at most), a batch is taken at once if it
would be full or the oldest request has waited ``max_queue_delay``, otherwise
the loop sleeps until that moment. A batch's inputs are concatenated row-wise
and sent in ONE backend call; outputs are sliced back per request.

Latency lane (``policy.latency_lane_rows`` > 0): fair order alone cannot help a
light tenant whose request arrives while every slot holds a full batch: it waits
for one to come back, then rides the next full batch. So a small request from a
tenant that had nothing queued and nothing running when it arrived is marked for
the lane; when every ordinary slot is taken, the lane's requests go out at once
as one urgent batch of their own (one lane batch at a time, beside the ordinary
slots, up to ``latency_lane_rows`` rows and never more than ``max_batch_size``),
which the backend runs before the ordinary batches waiting at the replica. A
marked request is still taken only while nothing more urgent is queued. A
backlogged tenant never qualifies (it always has something queued or running),
so the lane cannot be used to jump the queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from scheduler._exceptions import (
    BackendError,
    BackendUnavailableError,
    DeadlineExceededError,
    SchedulerClosedError,
)
from scheduler.costs import charge_ns, split_by_rows
from scheduler.fair_queue import FairQueue, Pending
from scheduler.stats import VersionStats
from scheduler.types import Backend, BatchPolicy, BatchResult, Clock, Share, Tensors

log = logging.getLogger(__name__)

# A running batch gets this long past a request's deadline before the caller is
# answered 504 anyway, so the queue's own expiry (which says "not run") goes first.
_RUNNING_GRACE_S = 0.05


@dataclass(frozen=True)
class BatchRecord:
    """Who was in a dispatched batch and what it cost, for observers and the ledger.

    Per-request tuples are in batch order. ``charges_ns`` splits ``charge_ns`` (device
    time times device share) by rows, exactly; both are empty/0 when the batch failed.
    """

    model: str
    version: str
    tenants: tuple[tuple[str, int], ...]  # (tenant, rows) per request
    rows: int
    result: BatchResult | None  # None when the backend failed
    queue_wait_s: tuple[float, ...]
    duration_s: float  # dispatch to result: the backend round trip of the batch
    started_at_ns: int  # wall clock (Unix ns) at dispatch
    finished_at_ns: int  # wall clock (Unix ns) when the result arrived
    charge_ns: int = 0
    charges_ns: tuple[int, ...] = ()
    traces: tuple[object | None, ...] = ()  # the callers' opaque trace contexts
    urgent: bool = False  # a latency-lane batch

    @functools.cached_property
    def by_tenant(self) -> dict[str, TenantShare]:
        """Requests, rows and charge per tenant, in first-seen order (the ledger's
        allocation rows, the per-tenant cost metrics). Empty charges when it failed."""
        shares: dict[str, TenantShare] = {}
        charges = self.charges_ns or (0,) * len(self.tenants)
        for (tenant, rows), part in zip(self.tenants, charges, strict=True):
            prev = shares.get(tenant)
            shares[tenant] = (
                TenantShare(1, rows, part)
                if prev is None
                else TenantShare(prev.requests + 1, prev.rows + rows, prev.charge_ns + part)
            )
        return shares


class TenantShare(NamedTuple):
    requests: int
    rows: int
    charge_ns: int


BatchObserver = Callable[[BatchRecord], None]


class CostSink(Protocol):
    """Where a batch's cost goes before its results are released (the ledger).

    ``commit`` returns once the record is durable, with each request's price (for
    its trace span); raising withholds the batch's results (503), so no answer
    leaves unrecorded.
    """

    async def commit(self, record: BatchRecord) -> Sequence[float]: ...


@dataclass
class Receipt:
    """What one request's batch did, filled in before its result is released."""

    queue_wait_s: float = 0.0
    batch_rows: int = 0
    charge_ns: int = 0  # this request's part of the batch's charge
    device: str = ""
    cost: float = 0.0


@dataclass(eq=False)
class _Job:
    inputs: Tensors
    future: asyncio.Future[Tensors]
    receipt: Receipt | None = None
    trace: object | None = None


class ModelBatcher:
    """Tenant-fair dynamic batching for one (model, version)."""

    def __init__(
        self,
        model: str,
        version: str,
        backend: Backend,
        policy: BatchPolicy,
        *,
        clock: Clock = time.monotonic,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        observer: BatchObserver | None = None,
        ledger: CostSink | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.policy = policy
        self._backend = backend
        self._clock = clock
        self._wall_clock_ns = wall_clock_ns
        self._observer = observer
        self._ledger = ledger
        self._queue = FairQueue(policy.max_queued_rows, policy.max_queued_rows_per_tenant)
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._lane: asyncio.Task[None] | None = None  # the lane batch in flight, if any
        self._running: dict[str, int] = {}  # tenant -> its requests in batches in flight
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self._sleeps_until = -math.inf  # when the loop's own timer fires next
        self.stats = VersionStats()  # Triton-style statistics (the router records requests)

    # -- public -----------------------------------------------------------------

    @property
    def queued_rows(self) -> int:
        return self._queue.rows

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher:{self.model}:{self.version}"
            )

    async def submit(
        self,
        tenant: str,
        inputs: Tensors,
        rows: int,
        *,
        weight: float = 1.0,
        priority: int = 0,
        timeout_s: float | None = None,
        receipt: Receipt | None = None,
        trace: object | None = None,
        lane: bool = True,
    ) -> Tensors:
        """Queue one request and wait for its own rows of the batch output.

        ``receipt``, if given, is filled in with the request's queue wait and cost;
        ``trace`` is handed back in the :class:`BatchRecord` (span links). ``lane``:
        whether it may use the latency lane when it qualifies (a request qualifies only
        if nothing of a more urgent priority level is queued).
        """
        if self._closing:
            raise SchedulerClosedError(f"model {self.model} version {self.version} is draining")
        if rows < 1 or rows > self.policy.max_batch_size:
            raise ValueError(f"rows must be in 1..{self.policy.max_batch_size}, got {rows}")
        now = self._clock()
        deadline = now + timeout_s if timeout_s is not None else math.inf
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        lane = (
            lane
            and rows <= self.policy.latency_lane_rows
            and not self._queue.tenant_rows(tenant)
            and tenant not in self._running
            and priority <= self._queue.most_urgent_level()
        )
        req = Pending(
            tenant=tenant,
            rows=rows,
            weight=weight,
            priority=priority,
            deadline=deadline,
            arrival=now,
            payload=_Job(inputs, future, receipt, trace),
            group=tuple((name, a.shape[1:], a.dtype.str) for name, a in inputs.items()),
            lane=lane,
        )
        self._queue.push(req)  # raises QueueFullError before anything waits
        if (
            self._ordinary_in_flight < self.policy.max_in_flight
            or deadline < self._sleeps_until
            or (lane and self._lane is None)
        ):
            # Else the loop is waiting for a batch to finish, and nothing here is urgent.
            self._wake.set()
        # The loop answers expired *queued* requests itself; this timer also covers a
        # batch that is still running when the deadline passes. A timer, not
        # wait_for: no extra task per request on the hot path.
        timer = (
            asyncio.get_running_loop().call_later(
                timeout_s + _RUNNING_GRACE_S, _expire_running, future, self._clock, now, req
            )
            if timeout_s is not None
            else None
        )
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            if not future.done():
                future.cancel()
            if self._queue.remove(req):
                self._wake.set()

    async def close(self, drain: bool = True) -> None:
        """Stop accepting; with ``drain`` run what is queued, else fail it; then stop."""
        self._closing = True
        if not drain:
            while self._queue.rows:
                for req in self._queue.take_batch(self.policy.max_batch_size):
                    _fail(req, SchedulerClosedError("model version removed"))
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        # A backend holding connections (serving.dataplane) closes them; the Backend
        # protocol does not require it.
        close = getattr(self._backend, "close", None)
        if close is not None:
            await close()

    # -- the loop ---------------------------------------------------------------

    async def _run(self) -> None:
        policy = self.policy
        while True:
            now = self._clock()
            for req in self._queue.expire(now):
                _fail(req, DeadlineExceededError(now - req.arrival, ran=False))
            next_deadline = self._queue.next_deadline()
            wake_at = math.inf if next_deadline is None else next_deadline
            if (
                self._queue.lane_requests
                and self._lane is None
                and self._ordinary_in_flight >= policy.max_in_flight
            ):
                lane = self._queue.take_batch(policy.lane_batch_rows, lane_only=True)
                if lane:
                    self._dispatch(lane, now, urgent=True)
                    continue
            if self._queue.rows and self._ordinary_in_flight < policy.max_in_flight:
                oldest = self._queue.oldest_arrival()
                ready_at = (oldest if oldest is not None else now) + policy.max_queue_delay_s
                if self._queue.rows >= policy.max_batch_size or now >= ready_at or self._closing:
                    self._dispatch(self._queue.take_batch(policy.max_batch_size), now)
                    continue
                wake_at = min(wake_at, ready_at)
            elif self._closing and not self._queue.rows:
                return
            self._wake.clear()
            self._sleeps_until = wake_at
            timer = None
            if wake_at != math.inf:
                delay = max(wake_at - self._clock(), 0.0)
                timer = asyncio.get_running_loop().call_later(delay, self._wake.set)
            await self._wake.wait()
            if timer is not None:
                timer.cancel()

    def _dispatch(self, batch: list[Pending], now: float, urgent: bool = False) -> None:
        if not batch:
            return
        running = self._running
        for req in batch:
            running[req.tenant] = running.get(req.tenant, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run_batch(batch, now, urgent))
        self._in_flight.add(task)
        if urgent:
            self._lane = task
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if task is self._lane:
            self._lane = None
        self._wake.set()

    def _not_running(self, batch: list[Pending]) -> None:
        running = self._running
        for req in batch:
            left = running[req.tenant] - 1
            if left:
                running[req.tenant] = left
            else:
                del running[req.tenant]

    async def _run_batch(self, batch: list[Pending], started: float, urgent: bool) -> None:
        jobs: list[_Job] = [req.payload for req in batch]
        started_at_ns = self._wall_clock_ns()
        result: BatchResult | None = None
        record: BatchRecord | None = None
        try:
            if len(jobs) == 1:
                inputs = jobs[0].inputs
            else:
                names = jobs[0].inputs.keys()
                inputs = {n: np.concatenate([j.inputs[n] for j in jobs]) for n in names}
            result = await self._backend.run_batch(inputs, urgent=urgent, shares=_shares(batch))
            answered = self._clock()
            record = self._record(batch, jobs, started, started_at_ns, result, urgent)
            costs: Sequence[float] = ()
            if self._ledger is not None:
                try:
                    costs = await self._ledger.commit(record)
                except Exception as exc:
                    log.error("cost ledger refused a batch of %s:%s: %s", *self._key, exc)
                    raise BackendUnavailableError(
                        "cost ledger unavailable: results withheld, nothing billed"
                    ) from exc
            self._release(batch, jobs, record, result, costs)
            trip_ns = round((answered - started) * 1e9)
            self.stats.record_batch(
                round(sum(record.queue_wait_s) * 1e9),
                len(batch),
                record.rows,
                result.wait_ns,
                max(trip_ns - result.wait_ns - result.device_ns, 0),
                result.device_ns,
                round((self._clock() - answered) * 1e9),
                record.finished_at_ns,
            )
        except asyncio.CancelledError:
            for req in batch:
                _fail(req, SchedulerClosedError("batch cancelled during shutdown"))
            raise
        except Exception as exc:  # a replica failure must reach every caller, not kill the loop
            log.warning("batch of %s:%s failed: %s", self.model, self.version, exc)
            err = exc if isinstance(exc, BackendError) else BackendError(str(exc))
            for req in batch:
                _fail(req, err)
        finally:
            # Before the callers run again: a tenant's next request sees this one done.
            self._not_running(batch)
            if self._observer is not None:
                if record is None:  # the backend failed: no result, no charge
                    record = self._record(batch, jobs, started, started_at_ns, None, urgent)
                self._observer(record)

    @property
    def _ordinary_in_flight(self) -> int:
        """Batches holding a slot: the lane batch rides beside them, not in one."""
        return len(self._in_flight) - (self._lane is not None)

    @property
    def _key(self) -> tuple[str, str]:
        return (self.model, self.version)

    def _record(
        self,
        batch: list[Pending],
        jobs: list[_Job],
        started: float,
        started_at_ns: int,
        result: BatchResult | None,
        urgent: bool,
    ) -> BatchRecord:
        rows = [r.rows for r in batch]
        charge = charge_ns(result.device_ns, result.device_share) if result is not None else 0
        return BatchRecord(
            model=self.model,
            version=self.version,
            tenants=tuple((r.tenant, r.rows) for r in batch),
            rows=sum(rows),
            result=result,
            queue_wait_s=tuple(started - r.arrival for r in batch),
            duration_s=self._clock() - started,
            started_at_ns=started_at_ns,
            finished_at_ns=self._wall_clock_ns(),
            charge_ns=charge,
            charges_ns=tuple(split_by_rows(charge, rows)) if result is not None else (),
            traces=tuple(j.trace for j in jobs),
            urgent=urgent,
        )

    @staticmethod
    def _release(
        batch: list[Pending],
        jobs: list[_Job],
        record: BatchRecord,
        result: BatchResult,
        costs: Sequence[float],
    ) -> None:
        offset = 0
        for i, (req, job) in enumerate(zip(batch, jobs, strict=True)):
            end = offset + req.rows
            if job.receipt is not None:
                receipt = job.receipt
                receipt.queue_wait_s = record.queue_wait_s[i]
                receipt.batch_rows = record.rows
                receipt.charge_ns = record.charges_ns[i]
                receipt.device = result.device
                receipt.cost = costs[i] if costs else 0.0
            if not job.future.done():
                job.future.set_result({k: v[offset:end] for k, v in result.outputs.items()})
            offset = end


def _expire_running(
    future: asyncio.Future[Tensors], clock: Clock, since: float, req: Pending
) -> None:
    if not future.done():
        # Still queued when a busy loop has not expired it yet: it did not run.
        future.set_exception(DeadlineExceededError(clock() - since, ran=req.dead))


def _shares(batch: list[Pending]) -> tuple[Share, ...]:
    """Rows, weight and most urgent priority of each tenant in the batch."""
    by_tenant: dict[str, Share] = {}
    for req in batch:
        prev = by_tenant.get(req.tenant)
        by_tenant[req.tenant] = (
            Share(req.tenant, req.rows, req.weight, req.priority)
            if prev is None
            else prev._replace(rows=prev.rows + req.rows, priority=min(prev.priority, req.priority))
        )
    return tuple(by_tenant.values())


def _fail(req: Pending, exc: Exception) -> None:
    job: _Job = req.payload
    if not job.future.done():
        job.future.set_exception(exc)
    req.payload = None  # a dead entry must not pin the request's tensors
