"""The scheduler's exceptions. The router maps each to its protocol's status."""

from __future__ import annotations


class SchedulerError(Exception):
    """Base of everything the scheduler raises to a caller."""


class QueueFullError(SchedulerError):
    """Admission refused: queued rows would pass a cap (429 / RESOURCE_EXHAUSTED)."""

    def __init__(self, scope: str, queued_rows: int, max_queued_rows: int) -> None:
        self.scope = scope
        self.queued_rows = queued_rows
        self.max_queued_rows = max_queued_rows
        # The message goes to the caller: it names the limit, never how many rows are
        # queued (a model's queue holds other tenants' requests).
        super().__init__(f"{scope} queue is full (limit {max_queued_rows} rows)")


class DeadlineExceededError(SchedulerError):
    """The request's deadline passed before it could be answered (504)."""

    def __init__(self, waited_s: float, ran: bool) -> None:
        self.waited_s = waited_s
        self.ran = ran
        where = "while running" if ran else "in the queue; it was not run"
        super().__init__(f"deadline exceeded after {waited_s * 1000:.1f} ms {where}")


class SchedulerClosedError(SchedulerError):
    """The model version is draining or removed (503 / UNAVAILABLE)."""


class BackendError(SchedulerError):
    """The replica failed to run a batch; every request in it gets this."""


class BackendUnavailableError(BackendError):
    """No replica could take the batch (dead, restarting, or being removed): retryable."""
