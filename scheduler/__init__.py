"""Tenant-fair dynamic batching. Depends on nothing else in gpugate."""

from scheduler._exceptions import (
    BackendError,
    BackendUnavailableError,
    DeadlineExceededError,
    QueueFullError,
    SchedulerClosedError,
    SchedulerError,
)
from scheduler.batcher import BatchObserver, BatchRecord, ModelBatcher
from scheduler.fair_queue import FairQueue, Pending
from scheduler.types import Backend, BatchPolicy, BatchResult, Tensors

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "BatchObserver",
    "BatchPolicy",
    "BatchRecord",
    "BatchResult",
    "DeadlineExceededError",
    "FairQueue",
    "ModelBatcher",
    "Pending",
    "QueueFullError",
    "SchedulerClosedError",
    "SchedulerError",
    "Tensors",
]
