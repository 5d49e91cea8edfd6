"""Types the scheduler shares with its callers and its backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]
Tensors = dict[str, Array]
Clock = Callable[[], float]  # monotonic seconds


@dataclass(frozen=True)
class BatchResult:
    """What a replica returns for one batch: outputs with the batch's rows first."""

    outputs: Tensors
    device_ns: int  # measured device time of the forward
    device: str  # "cpu" or the accelerator's name
    # How much of its device the replica holds: its num_gpus on a GPU (0.5 = half a
    # GPU), its num_cpus on a CPU. A batch's charge is device_ns times this.
    device_share: float
    # Time the batch waited at the replica for the forward before it (0 where the
    # transport does not say): statistics count it as queueing, not transfer.
    wait_ns: int = 0


class Share(NamedTuple):
    """One tenant's part of a batch: its rows, its fair-share weight and its priority
    level (the most urgent of its requests in the batch)."""

    tenant: str
    rows: int
    weight: float
    priority: int


class Backend(Protocol):
    """Runs one batch of one model version. ``serving`` supplies the Ray-backed one.

    ``urgent`` marks a latency-lane batch: a backend that queues batches per replica
    runs it before the ordinary ones waiting there (it cannot stop one running).
    ``shares`` says whose rows the batch holds, so that a replica serving several
    gateways can order their batches fairly (:mod:`scheduler.replica_queue`).
    """

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult: ...


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_queue_delay_s: float = 0.0
    max_in_flight: int = 2  # batches outstanding at the backend at once
    max_queued_rows: int = 4096
    max_queued_rows_per_tenant: int = 1024
    # Latency lane: a request of at most this many rows from a tenant with nothing
    # queued and nothing running when it arrived goes out at once in a small urgent
    # batch of its own when every ordinary slot is taken (one such batch at a time).
    # 0 turns the lane off.
    latency_lane_rows: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_in_flight < 1:
            raise ValueError("max_batch_size and max_in_flight must be >= 1")
        if self.latency_lane_rows < 0:
            raise ValueError("latency_lane_rows must be >= 0")
        if self.max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must be >= 0")

    @property
    def lane_batch_rows(self) -> int:
        """Rows of one lane batch at most: the lane's size, never past a full batch."""
        return min(self.latency_lane_rows, self.max_batch_size)
