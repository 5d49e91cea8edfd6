"""The async batch former with an in-process backend (no Ray, no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import pytest

from scheduler import (
    BackendError,
    BatchPolicy,
    BatchRecord,
    BatchResult,
    DeadlineExceededError,
    ModelBatcher,
    QueueFullError,
    SchedulerClosedError,
    Share,
    Tensors,
)
from scheduler.batcher import _RUNNING_GRACE_S

# A batcher that busy-waits hangs on virtual time (its clock never moves): fail instead.
pytestmark = pytest.mark.timeout(60)


class RecordingBackend:
    """Computes y = 2x + row-sum, so a wrong split shows; records every batch."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[int] = []

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        x = inputs["x"]
        self.batches.append(x.shape[0])
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("replica died")
        y = 2 * x + x.sum(axis=1, keepdims=True)
        return BatchResult({"y": y}, device_ns=1000 * x.shape[0], device="cpu", device_share=1.0)


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


class VirtualTime:
    """An event loop on virtual time: when it would sleep, its clock jumps instead.

    For code whose only waits are timers (the batcher with an in-process backend, no
    sockets): delays, deadlines and queue waits become exact and independent of how
    busy the machine is. ``now`` is the batcher's clock and the loop's ``time()``.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def batcher(self, backend: Any, policy: BatchPolicy, **kw: Any) -> ModelBatcher:
        """A started batcher of model m:1 on this clock."""
        b = ModelBatcher("m", "1", backend, policy, clock=self.clock, **kw)
        b.start()
        return b

    def run(self, coro_fn: Callable[[], Awaitable[Any]]) -> Any:
        loop = asyncio.new_event_loop()
        loop.time = lambda: self.now  # type: ignore[method-assign]
        selector = loop._selector  # type: ignore[attr-defined]
        poll = selector.select

        def select(timeout: float | None = None) -> Any:
            events = poll(0)
            if not events and timeout is not None and timeout > 0:
                self.now += timeout  # nothing to do until the next timer: go there
            return events

        selector.select = select
        try:
            return loop.run_until_complete(coro_fn())
        finally:
            loop.close()


def _x(rows: int, seed: int) -> Tensors:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)}


def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    backend = RecordingBackend(delay_s=0.005)
    records: list[BatchRecord] = []

    async def main() -> None:
        b = ModelBatcher("m", "1", backend, BatchPolicy(max_batch_size=16), observer=records.append)
        b.start()
        inputs = [_x(1 + i % 5, i) for i in range(60)]
        outs = await asyncio.gather(
            *(b.submit(f"t{i % 3}", x, x["x"].shape[0]) for i, x in enumerate(inputs))
        )
        for x, out in zip(inputs, outs, strict=True):
            want = 2 * x["x"] + x["x"].sum(axis=1, keepdims=True)
            np.testing.assert_allclose(out["y"], want, rtol=1e-6)
        await b.close()

    run(main)
    assert sum(backend.batches) == sum(1 + i % 5 for i in range(60))
    assert len(backend.batches) < 60 / 2  # one backend call per batch, not per request
    assert max(backend.batches) <= 16
    assert sum(r.rows for r in records) == sum(backend.batches)


def test_max_queue_delay_holds_a_partial_batch_then_sends_it() -> None:
    backend = RecordingBackend()
    vt = VirtualTime()
    sent_at: list[float] = []

    async def main() -> None:
        b = vt.batcher(
            backend,
            BatchPolicy(max_batch_size=8, max_queue_delay_s=0.05),
            observer=lambda record: sent_at.append(vt.now - record.duration_s),
        )
        first = asyncio.ensure_future(b.submit("a", _x(1, 0), 1))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(b.submit("b", _x(2, 1), 2))
        await asyncio.gather(first, second)
        await b.close()

    vt.run(main)
    assert backend.batches == [3]  # both waited for one batch
    # Sent when the oldest had waited max_queue_delay, not earlier and not later.
    assert sent_at == [pytest.approx(0.05)]


def test_full_batch_goes_without_waiting_for_the_delay() -> None:
    backend = RecordingBackend()
    vt = VirtualTime()

    async def main() -> None:
        b = vt.batcher(backend, BatchPolicy(max_batch_size=4, max_queue_delay_s=5))
        await asyncio.gather(*(b.submit("a", _x(2, i), 2) for i in range(2)))
        await b.close()

    vt.run(main)
    assert backend.batches == [4]
    assert vt.now == 0.0  # not a moment of the 5 s delay was waited


def test_expired_request_is_answered_504_and_not_run() -> None:
    backend = RecordingBackend(delay_s=0.2)
    vt = VirtualTime()

    async def main() -> None:
        b = vt.batcher(backend, BatchPolicy(max_batch_size=1, max_in_flight=1))
        busy = asyncio.ensure_future(b.submit("a", _x(1, 0), 1))
        await asyncio.sleep(0.01)  # the single slot is now taken for 200 ms
        with pytest.raises(DeadlineExceededError, match="not run"):
            await b.submit("b", _x(1, 1), 1, timeout_s=0.05)
        # Answered at its deadline, not when the slot came free at 0.2 s.
        assert vt.now == pytest.approx(0.06)
        await busy
        await b.close()

    vt.run(main)
    assert backend.batches == [1]  # the expired request never reached the backend


def test_deadline_while_running_is_still_answered() -> None:
    backend = RecordingBackend(delay_s=0.5)
    vt = VirtualTime()

    async def main() -> None:
        b = vt.batcher(backend, BatchPolicy(max_batch_size=1))
        with pytest.raises(DeadlineExceededError, match="while running"):
            await b.submit("a", _x(1, 0), 1, timeout_s=0.05)
        # The deadline, plus the short grace a running batch gets: not the 0.5 s forward.
        assert vt.now == pytest.approx(0.05 + _RUNNING_GRACE_S)
        await b.close()

    vt.run(main)


def test_queue_caps_answer_queue_full() -> None:
    backend = RecordingBackend(delay_s=0.1)

    async def main() -> None:
        policy = BatchPolicy(
            max_batch_size=2, max_in_flight=1, max_queued_rows=100, max_queued_rows_per_tenant=4
        )
        b = ModelBatcher("m", "1", backend, policy)
        b.start()
        running = asyncio.ensure_future(b.submit("a", _x(2, 0), 2))
        await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(b.submit("a", _x(2, i), 2)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await b.submit("a", _x(1, 9), 1)
        other = await b.submit("b", _x(1, 3), 1)  # another tenant still gets in
        assert other["y"].shape == (1, 4)
        await asyncio.gather(running, *queued)
        await b.close()

    run(main)


def test_backend_failure_reaches_every_caller_and_loop_survives() -> None:
    backend = RecordingBackend(fail=True)

    async def main() -> None:
        b = ModelBatcher("m", "1", backend, BatchPolicy(max_batch_size=8))
        b.start()
        results = await asyncio.gather(
            *(b.submit("a", _x(1, i), 1) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, BackendError) for r in results)
        backend.fail = False
        out = await b.submit("a", _x(1, 5), 1)
        assert out["y"].shape == (1, 4)
        await b.close()

    run(main)


def test_cancelled_caller_leaves_the_queue() -> None:
    backend = RecordingBackend(delay_s=0.1)

    async def main() -> None:
        b = ModelBatcher("m", "1", backend, BatchPolicy(max_batch_size=1, max_in_flight=1))
        b.start()
        busy = asyncio.ensure_future(b.submit("a", _x(1, 0), 1))
        await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(b.submit("a", _x(1, 1), 1))
        await asyncio.sleep(0.01)
        assert b.queued_rows == 1
        waiting.cancel()
        await asyncio.sleep(0)
        assert b.queued_rows == 0
        await busy
        await b.close()

    run(main)
    assert backend.batches == [1]


def test_close_drains_queued_work_then_refuses_new() -> None:
    backend = RecordingBackend(delay_s=0.02)

    async def main() -> None:
        b = ModelBatcher("m", "1", backend, BatchPolicy(max_batch_size=2, max_in_flight=1))
        b.start()
        pending = [asyncio.ensure_future(b.submit("a", _x(1, i), 1)) for i in range(6)]
        await asyncio.sleep(0)
        await b.close()
        assert all(p.done() and p.exception() is None for p in pending)
        with pytest.raises(SchedulerClosedError):
            await b.submit("a", _x(1, 0), 1)

    run(main)
    assert sum(backend.batches) == 6


def test_oversized_request_is_refused() -> None:
    async def main() -> None:
        b = ModelBatcher("m", "1", RecordingBackend(), BatchPolicy(max_batch_size=4))
        with pytest.raises(ValueError, match="rows must be"):
            await b.submit("a", _x(5, 0), 5)

    run(main)


def test_variable_length_inputs_of_different_lengths_are_not_mixed() -> None:
    backend = RecordingBackend(delay_s=0.01)

    async def main() -> None:
        b = ModelBatcher("m", "1", backend, BatchPolicy(max_batch_size=8, max_in_flight=1))
        b.start()
        blocker = asyncio.ensure_future(b.submit("a", _x(1, 0), 1))
        await asyncio.sleep(0.001)
        xs = [{"x": np.ones((1, 4 if i % 2 else 6), np.float32) * i} for i in range(6)]
        outs = await asyncio.gather(*(b.submit(f"t{i}", x, 1) for i, x in enumerate(xs)))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_allclose(out["y"], 2 * x["x"] + x["x"].sum(axis=1, keepdims=True))
        await blocker
        await b.close()

    run(main)
    assert sum(backend.batches) == 7


class GatedBackend:
    """Each ordinary batch waits for its own gate (by dispatch order) until ``release()``
    opens them all; lane batches wait for ``lane_gate``, open unless ``hold_lane``.
    Records (rows, urgent) in dispatch order and the urgent flag in answer order."""

    def __init__(self, hold_lane: bool = False) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.answered: list[bool] = []
        self.gates = [asyncio.Event() for _ in range(64)]
        self.lane_gate = asyncio.Event()
        if not hold_lane:
            self.lane_gate.set()
        self._ordinary = 0

    def release(self) -> None:
        for gate in self.gates:
            gate.set()

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        x = inputs["x"]
        self.calls.append((x.shape[0], urgent))
        if urgent:
            await self.lane_gate.wait()
        else:
            gate = self.gates[self._ordinary]
            self._ordinary += 1
            await gate.wait()
        self.answered.append(urgent)
        return BatchResult({"y": 2 * x}, device_ns=1000, device="cpu", device_share=1.0)


def _lane_policy(lane_rows: int) -> BatchPolicy:
    return BatchPolicy(max_batch_size=8, max_in_flight=2, latency_lane_rows=lane_rows)


async def _fill_both_slots(b: ModelBatcher) -> list[asyncio.Task[Tensors]]:
    """The heavy tenant fills both slots and keeps more queued."""
    heavy = [asyncio.ensure_future(b.submit("heavy", _x(4, i), 4)) for i in range(8)]
    await asyncio.sleep(0.01)
    assert b.in_flight == 2 and b.queued_rows == 4 * 4  # two batches of 2 x 4 rows out
    return heavy


def test_a_light_tenant_rides_the_lane_past_full_slots_and_gets_its_own_rows() -> None:
    backend = GatedBackend()
    records: list[BatchRecord] = []

    async def main() -> None:
        b = ModelBatcher("m", "1", backend, _lane_policy(4), observer=records.append)
        b.start()
        heavy = await _fill_both_slots(b)
        x = _x(2, 99)
        out = await asyncio.wait_for(b.submit("light", x, 2), 1.0)  # no slot was free
        np.testing.assert_array_equal(out["y"], 2 * x["x"])
        assert not any(f.done() for f in heavy)
        # The heavy tenant has work queued and running: its next request waits its turn.
        more = asyncio.ensure_future(b.submit("heavy", _x(1, 50), 1))
        await asyncio.sleep(0.01)
        assert not more.done() and backend.calls[-1] == (2, True)
        backend.release()
        await asyncio.gather(*heavy, more)
        await b.close()

    run(main)
    assert backend.calls[:3] == [(8, False), (8, False), (2, True)]
    assert backend.answered[0] is True
    assert [c for c in backend.calls if c[1]] == [(2, True)]  # one lane batch only
    lane = [r for r in records if r.urgent]
    assert len(lane) == 1 and lane[0].tenants == (("light", 2),)


async def _light_answered_while_slots_full(
    lane_rows: int, rows: int = 1, priority: int = 0, lane: bool = True
) -> bool:
    """Whether a light request is answered while the heavy tenant holds both slots."""
    backend = GatedBackend()
    b = ModelBatcher("m", "1", backend, _lane_policy(lane_rows))
    b.start()
    heavy = await _fill_both_slots(b)  # at priority 0, with more of it queued
    light = asyncio.ensure_future(
        b.submit("light", _x(rows, 7), rows, priority=priority, lane=lane)
    )
    await asyncio.sleep(0.05)
    answered = light.done()
    backend.release()
    await asyncio.gather(*heavy, light)
    await b.close()
    assert all(not urgent for _, urgent in backend.calls) or answered
    return answered


def test_the_lane_is_off_at_zero_and_closed_to_requests_bigger_than_it() -> None:
    assert run(lambda: _light_answered_while_slots_full(0, 1)) is False
    assert run(lambda: _light_answered_while_slots_full(4, 5)) is False
    assert run(lambda: _light_answered_while_slots_full(4, 4)) is True


def test_one_lane_batch_at_a_time_and_the_next_takes_every_waiting_light_tenant() -> None:
    backend = GatedBackend(hold_lane=True)

    async def main() -> None:
        b = ModelBatcher("m", "1", backend, _lane_policy(4))
        b.start()
        heavy = await _fill_both_slots(b)
        first = asyncio.ensure_future(b.submit("l1", _x(1, 1), 1))
        await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(b.submit(f"l{i}", _x(1, i), 1)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        assert [c for c in backend.calls if c[1]] == [(1, True)]  # l2, l3 wait
        backend.lane_gate.set()
        outs = await asyncio.wait_for(asyncio.gather(first, *later), 1.0)
        for seed, out in zip((1, 2, 3), outs, strict=True):
            np.testing.assert_array_equal(out["y"], 2 * _x(1, seed)["x"])
        assert [c for c in backend.calls if c[1]] == [(1, True), (2, True)]
        backend.release()
        await asyncio.gather(*heavy)
        await b.close()

    run(main)


def test_the_lane_never_passes_more_urgent_work_and_mirrored_requests_stay_out() -> None:
    assert run(lambda: _light_answered_while_slots_full(4, priority=0)) is True
    assert run(lambda: _light_answered_while_slots_full(4, priority=1)) is False
    assert run(lambda: _light_answered_while_slots_full(4, lane=False)) is False


def test_the_lane_batch_rides_beside_the_slots_and_a_tenant_can_use_it_again() -> None:
    backend = GatedBackend(hold_lane=True)

    async def main() -> None:
        b = ModelBatcher("m", "1", backend, _lane_policy(4))
        b.start()
        heavy = await _fill_both_slots(b)
        first = asyncio.ensure_future(b.submit("light", _x(1, 1), 1))
        await asyncio.sleep(0.01)
        assert backend.calls[-1] == (1, True)  # held at the replica
        # An ordinary batch returns while the lane batch is out: the freed slot is
        # used at once (the lane batch does not hold one).
        backend.gates[0].set()
        await asyncio.sleep(0.01)
        assert backend.calls == [(8, False), (8, False), (1, True), (8, False)]
        backend.lane_gate.set()
        np.testing.assert_array_equal((await first)["y"], 2 * _x(1, 1)["x"])
        # Done and nothing queued: the same tenant qualifies again.
        again = await asyncio.wait_for(b.submit("light", _x(1, 2), 1), 1.0)
        np.testing.assert_array_equal(again["y"], 2 * _x(1, 2)["x"])
        assert backend.calls[-1] == (1, True)
        backend.release()
        await asyncio.gather(*heavy)
        await b.close()

    run(main)


def test_a_tenant_with_a_request_running_does_not_qualify_even_with_nothing_queued() -> None:
    backend = GatedBackend()

    async def main() -> None:
        b = ModelBatcher("m", "1", backend, _lane_policy(4))
        b.start()
        # Exactly two full batches of "mid": both slots busy, nothing of it queued.
        mid = [asyncio.ensure_future(b.submit("mid", _x(4, i), 4)) for i in range(4)]
        await asyncio.sleep(0.01)
        assert b.in_flight == 2 and b.queued_rows == 0
        more = asyncio.ensure_future(b.submit("mid", _x(1, 9), 1))
        await asyncio.sleep(0.01)
        assert not more.done() and len(backend.calls) == 2  # it waits for a slot
        fresh = await asyncio.wait_for(b.submit("fresh", _x(1, 8), 1), 1.0)
        np.testing.assert_array_equal(fresh["y"], 2 * _x(1, 8)["x"])
        assert backend.calls[2] == (1, True)
        backend.release()
        await asyncio.gather(*mid, more)
        await b.close()

    run(main)


class _TickClock:
    """A clock the test moves by hand: the batcher's timings become exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _TimedBackend:
    """Takes 3 ms of the test clock per batch, 1 ms of it 'device' time; a ledger-like
    sink then takes 2 ms more before the callers are released."""

    def __init__(self, clock: _TickClock) -> None:
        self.clock = clock
        self.gate = asyncio.Event()

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        await self.gate.wait()
        self.clock.now += 0.003
        # Of the 3 ms, 0.5 ms waiting at the replica behind another batch, 1 ms forward.
        return BatchResult({"y": inputs["x"]}, 1_000_000, "cpu", 1.0, wait_ns=500_000)


class _SlowSink:
    def __init__(self, clock: _TickClock) -> None:
        self.clock = clock

    async def commit(self, record: BatchRecord) -> list[float]:
        self.clock.now += 0.002
        return [0.0] * len(record.tenants)


def test_statistics_split_each_batch_into_queue_transfer_device_and_release() -> None:
    clock = _TickClock()
    backend = _TimedBackend(clock)

    async def main() -> ModelBatcher:
        b = ModelBatcher(
            "m",
            "1",
            backend,
            BatchPolicy(max_batch_size=8, max_in_flight=1),
            clock=clock,
            wall_clock_ns=lambda: 1_800_000_000_123_456_789,
            ledger=_SlowSink(clock),
        )
        b.start()
        first = asyncio.ensure_future(b.submit("a", _x(2, 1), 2))  # dispatched at once
        await asyncio.sleep(0.01)
        clock.now += 0.004  # these two come 4 ms later, and wait for the slot
        rest = [asyncio.ensure_future(b.submit(t, _x(3, 2), 3)) for t in ("a", "b")]
        await asyncio.sleep(0.01)
        backend.gate.set()
        await asyncio.gather(first, *rest)
        await b.close()
        return b

    s = run(main).stats
    assert (s.execution_count, s.inference_count) == (2, 8)
    # Queue: the first went out at once; the others waited for its 3 ms trip and 2 ms
    # commit; each batch then waited 0.5 ms at the replica.
    assert (s.queue.count, s.queue.ns) == (3, 0 + 2 * 5_000_000 + 3 * 500_000)
    # Per request: its batch's figures. Device 1 ms, release 2 ms; the round trip is
    # 7 ms for the first batch (it waited 4 ms at the backend's gate) and 3 ms for the
    # second; the trip less the replica wait and the device time is "compute input".
    assert (s.compute_infer.count, s.compute_infer.ns) == (3, 3 * 1_000_000)
    assert (s.compute_input.count, s.compute_input.ns) == (3, 5_500_000 + 2 * 1_500_000)
    assert (s.compute_output.count, s.compute_output.ns) == (3, 3 * 2_000_000)
    # Per batch size: counted per batch.
    assert sorted(s.by_batch_size) == [2, 6]
    six = s.by_batch_size[6]
    assert (six.compute_infer.count, six.compute_input.ns, six.compute_output.ns) == (
        1,
        1_500_000,
        2_000_000,
    )
    assert s.last_inference_ms == 1_800_000_000_123  # the wall clock at the answer, in ms
