"""Memory of a server's processes, from /proc (Linux): which of them are Ray Serve
replicas, their resident set, what it is made of, and a thread that reads it
periodically. Used by ``soak.py``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

TITLE = "ServeReplica:"  # Ray's process title of a Serve replica: ray::ServeReplica:app:deployment


# ------------------------------------------------------------------ processes


def proc_stats() -> dict[int, list[str]]:
    """pid -> the fields of /proc/PID/stat after "pid (comm) ", for every process: state,
    ppid, pgrp, session, ... utime (11), stime (12)."""
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        stats[int(entry.name)] = raw[raw.rfind(")") + 2 :].split()
    return stats


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session) of every process."""
    return {pid: (int(rest[1]), int(rest[3])) for pid, rest in proc_stats().items()}


def replicas(root: int) -> dict[int, str]:
    """pid -> deployment name of every Serve replica under ``root``: its descendants and
    the members of its session (Ray's raylet and workers are both)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ours = {root} | {pid for pid, (_, sid) in table.items() if sid == root}
    stack = list(ours)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in ours:
                ours.add(child)
                stack.append(child)
    found = {}
    for pid in ours:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if TITLE in title:
            # "ray::ServeReplica:gpugate:gateway" -> "gateway"
            found[pid] = title.split(TITLE, 1)[1].split()[0].rsplit(":", 1)[-1]
    return found


def rss_mb(pid: int) -> float | None:
    """The process's resident set (VmRSS) in MB (10^6 bytes), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def mappings_mb(pid: int) -> dict[str, float]:
    """Resident MB per mapped object (file path, ``[heap]``, ``[anon]`` for anonymous
    memory: glibc's thread arenas and large blocks, Python's arenas), from smaps."""
    found: dict[str, float] = {}
    name = "[anon]"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    name = head[5].strip() if len(head) == 6 else "[anon]"
                elif head[0] == "Rss:":
                    found[name] = found.get(name, 0.0) + int(head[1]) * 1024 / 1e6
    except OSError:
        return {}
    return found


class RssTrace:
    """VmRSS of each process every ``every_s`` seconds, from a thread of its own, with
    the minute of each reading counted from ``zero`` (the end of the warm-up).

    RSS moves in steps of several MB both ways under steady load (the collector, the
    allocators returning memory), so one reading per interval would mistake a step for
    growth: each interval is summarized by the median of its readings, and growth
    compares medians of the first and last minute after the warm-up.
    """

    def __init__(self, pids: list[int], zero: float, every_s: float) -> None:
        self.pids = pids
        self.zero = zero
        self.every_s = every_s
        self.readings: list[tuple[float, dict[int, float | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> RssTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            minute = (time.monotonic() - self.zero) / 60
            self.readings.append((minute, {pid: rss_mb(pid) for pid in self.pids}))
            if self._stop.wait(self.every_s):
                return

    def median(self, pid: int, start: float, end: float) -> float | None:
        """Median MB of the readings in [start, end] minutes; None if any says gone."""
        values = [r.get(pid) for m, r in list(self.readings) if start <= m <= end]
        if not values or any(v is None for v in values):
            return None
        return float(statistics.median(v for v in values if v is not None))

    def span(self, pid: int, start: float, end: float) -> tuple[float, float] | None:
        values = [r.get(pid) for m, r in list(self.readings) if start <= m <= end]
        known = [v for v in values if v is not None]
        return (min(known), max(known)) if known else None
