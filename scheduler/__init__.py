"""Tenant-fair dynamic batching. Depends on nothing else in gpugate."""

from scheduler._exceptions import (
    BackendError,
    BackendUnavailableError,
    DeadlineExceededError,
    QueueFullError,
    SchedulerClosedError,
    SchedulerError,
)
from scheduler.batcher import (
    BatchObserver,
    BatchRecord,
    CostSink,
    ModelBatcher,
    Receipt,
    TenantShare,
)
from scheduler.costs import charge_ns, split_by_rows
from scheduler.fair_queue import FairQueue, Pending
from scheduler.replica_queue import ReplicaQueue
from scheduler.stats import BatchSizeStats, Duration, VersionStats
from scheduler.types import Backend, BatchPolicy, BatchResult, Share, Tensors

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "BatchObserver",
    "BatchPolicy",
    "BatchRecord",
    "BatchResult",
    "BatchSizeStats",
    "CostSink",
    "DeadlineExceededError",
    "Duration",
    "FairQueue",
    "ModelBatcher",
    "Pending",
    "QueueFullError",
    "Receipt",
    "ReplicaQueue",
    "SchedulerClosedError",
    "SchedulerError",
    "Share",
    "TenantShare",
    "Tensors",
    "VersionStats",
    "charge_ns",
    "split_by_rows",
]
