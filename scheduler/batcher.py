"""The async batch former of one model version.

Requests wait in a :class:`FairQueue`; whenever the backend has a free slot
(``max_in_flight`` batches outstanding at most), a batch is taken at once if it
would be full or the oldest request has waited ``max_queue_delay``, otherwise
the loop sleeps until that moment. A batch's inputs are concatenated row-wise
and sent in ONE backend call; outputs are sliced back per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from scheduler._exceptions import (
    BackendError,
    DeadlineExceededError,
    SchedulerClosedError,
)
from scheduler.fair_queue import FairQueue, Pending
from scheduler.types import Backend, BatchPolicy, BatchResult, Clock, Tensors

log = logging.getLogger(__name__)

# A running batch gets this long past a request's deadline before the caller is
# answered 504 anyway, so the queue's own expiry (which says "not run") goes first.
_RUNNING_GRACE_S = 0.05


@dataclass(frozen=True)
class BatchRecord:
    """Who was in a dispatched batch and what it cost, for observers (metrics, costs)."""

    model: str
    version: str
    tenants: tuple[tuple[str, int], ...]  # (tenant, rows) per request, batch order
    rows: int
    result: BatchResult | None  # None when the backend failed
    queue_wait_s: tuple[float, ...]  # per request
    duration_s: float  # dispatch to result: the backend round trip of the batch


BatchObserver = Callable[[BatchRecord], None]


@dataclass(eq=False)
class _Job:
    inputs: Tensors
    future: asyncio.Future[Tensors]


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
        observer: BatchObserver | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.policy = policy
        self._backend = backend
        self._clock = clock
        self._observer = observer
        self._queue = FairQueue(policy.max_queued_rows, policy.max_queued_rows_per_tenant)
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self._sleeps_until = -math.inf  # when the loop's own timer fires next

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
    ) -> Tensors:
        """Queue one request and wait for its own rows of the batch output."""
        if self._closing:
            raise SchedulerClosedError(f"model {self.model} version {self.version} is draining")
        if rows < 1 or rows > self.policy.max_batch_size:
            raise ValueError(f"rows must be in 1..{self.policy.max_batch_size}, got {rows}")
        now = self._clock()
        deadline = now + timeout_s if timeout_s is not None else math.inf
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        req = Pending(
            tenant=tenant,
            rows=rows,
            weight=weight,
            priority=priority,
            deadline=deadline,
            arrival=now,
            payload=_Job(inputs, future),
            group=tuple((name, a.shape[1:], a.dtype.str) for name, a in inputs.items()),
        )
        self._queue.push(req)  # raises QueueFullError before anything waits
        if len(self._in_flight) < self.policy.max_in_flight or deadline < self._sleeps_until:
            # Else the loop is waiting for a batch to finish, and nothing here is urgent.
            self._wake.set()
        # The loop answers expired *queued* requests itself; this timer also covers a
        # batch that is still running when the deadline passes. A timer, not
        # wait_for: no extra task per request on the hot path.
        timer = (
            asyncio.get_running_loop().call_later(
                timeout_s + _RUNNING_GRACE_S, _expire_running, future, self._clock, now
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

    # -- the loop ---------------------------------------------------------------

    async def _run(self) -> None:
        policy = self.policy
        while True:
            now = self._clock()
            for req in self._queue.expire(now):
                _fail(req, DeadlineExceededError(now - req.arrival, ran=False))
            next_deadline = self._queue.next_deadline()
            wake_at = math.inf if next_deadline is None else next_deadline
            if self._queue.rows and len(self._in_flight) < policy.max_in_flight:
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

    def _dispatch(self, batch: list[Pending], now: float) -> None:
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run_batch(batch, now))
        self._in_flight.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()

    async def _run_batch(self, batch: list[Pending], started: float) -> None:
        jobs: list[_Job] = [req.payload for req in batch]
        result: BatchResult | None = None
        try:
            if len(jobs) == 1:
                inputs = jobs[0].inputs
            else:
                names = jobs[0].inputs.keys()
                inputs = {n: np.concatenate([j.inputs[n] for j in jobs]) for n in names}
            result = await self._backend.run_batch(inputs)
            offset = 0
            for req, job in zip(batch, jobs, strict=True):
                end = offset + req.rows
                if not job.future.done():
                    job.future.set_result({k: v[offset:end] for k, v in result.outputs.items()})
                offset = end
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
            if self._observer is not None:
                self._observer(
                    BatchRecord(
                        model=self.model,
                        version=self.version,
                        tenants=tuple((r.tenant, r.rows) for r in batch),
                        rows=sum(r.rows for r in batch),
                        result=result,
                        queue_wait_s=tuple(started - r.arrival for r in batch),
                        duration_s=self._clock() - started,
                    )
                )


def _expire_running(future: asyncio.Future[Tensors], clock: Clock, since: float) -> None:
    if not future.done():
        future.set_exception(DeadlineExceededError(clock() - since, ran=True))


def _fail(req: Pending, exc: Exception) -> None:
    job: _Job = req.payload
    if not job.future.done():
        job.future.set_exception(exc)
    req.payload = None  # a dead entry must not pin the request's tensors
