"""Cumulative counts and times of one model version, since its batcher started.

What Triton's statistics extension reports per model version (served by the
router at ``/v2/models/{m}/stats`` and gRPC ``ModelStatistics``), kept as plain
integers on the event loop: a few additions per batch and one per request.

Per batch that ran: its rows, its device time (the forward, measured at the
replica), the time it waited at the replica for the forward before it (the
direct data plane reports it), the rest of its round trip to the replica
(concatenation, transfer both ways, tensor conversion: "compute input" here)
and the time from the replica's answer to the callers' release (the ledger
commit and the split of the outputs: "compute output"). As in Triton, each
request in the batch is attributed the whole batch's compute times; its queue
time is its own wait for a batch plus the batch's wait at the replica.

Counters are per gateway process (one per node on a cluster) and start at zero
with it. A request answered 504 or 499 while its batch ran counts as failed and
its rows as run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchSizeStats:
    """Batches of one size: ``count`` of each Duration is the number of such batches."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    inference_count: int = 0  # rows of the batches that ran
    execution_count: int = 0  # batches that ran
    last_inference_ms: int = 0  # wall clock (Unix ms) when the last of them answered
    success: Duration = field(default_factory=Duration)  # requests answered, their time
    fail: Duration = field(default_factory=Duration)  # requests refused or failed
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    by_batch_size: dict[int, BatchSizeStats] = field(default_factory=dict)

    def record_batch(
        self,
        queued_ns: int,
        requests: int,
        rows: int,
        replica_wait_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        finished_at_ns: int,
    ) -> None:
        """One batch that ran: ``queued_ns`` is its requests' waits for it, summed."""
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = finished_at_ns // 1_000_000
        self.queue.add(queued_ns + replica_wait_ns * requests, requests)
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        size = self.by_batch_size.get(rows)
        if size is None:
            size = self.by_batch_size[rows] = BatchSizeStats()
        size.compute_input.add(input_ns)
        size.compute_infer.add(infer_ns)
        size.compute_output.add(output_ns)

    def record_request(self, ok: bool, ns: int) -> None:
        (self.success if ok else self.fail).add(ns)
