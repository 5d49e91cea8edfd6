"""The rows a replica holds: what Ray Serve's autoscaler scales model replicas on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RowsInFlight:
    """Rows of the batches a replica has received and not yet answered (queued and
    running), and their time-average between two reads.

    Written from the data plane's loop (and Serve's handle path), read from Serve's
    autoscaling hook on another thread, hence the lock. An average rather than the value
    at the moment of the read: batches come and go many times between two reads, and a
    sample would see the queue only by chance.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._rows = 0
        self._since = self._read_at = clock()
        self._row_seconds = 0.0  # since the last read

    @property
    def rows(self) -> int:
        return self._rows

    def add(self, rows: int) -> None:
        """``rows`` arrived (negative: answered, or dropped)."""
        with self._lock:
            now = self._clock()
            self._row_seconds += self._rows * (now - self._since)
            self._since = now
            self._rows += rows

    def mean(self) -> float:
        """The time-average of the rows held since the previous call (or creation)."""
        with self._lock:
            now = self._clock()
            row_seconds = self._row_seconds + self._rows * (now - self._since)
            elapsed = now - self._read_at
            self._row_seconds = 0.0
            self._since = self._read_at = now
        return row_seconds / elapsed if elapsed > 0 else float(self._rows)
