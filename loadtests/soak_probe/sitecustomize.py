"""Allocation reports from a soak's Serve replicas (``loadtests/soak.py --trace``).

Python imports this module at start-up in every process whose ``PYTHONPATH`` holds
this folder: ``soak.py --trace`` puts it there for ``gpugate serve``, whose Ray
workers inherit it. Once Ray titles the process a Serve replica
(``ray::ServeReplica:...``), a daemon thread waits for the ``mark-N`` files
``soak.py`` creates in ``$GPUGATE_SOAK_TRACE_DIR``: at ``mark-0`` (the end of the
warm-up) it starts ``tracemalloc`` and counts the objects the collector tracks; at
each later mark it writes ``<deployment>-<pid>-<N>.txt``: the allocation sites (by
traceback) and the object types that grew since ``mark-0``.
Any other process only runs the thread that waits for the title.
"""

from __future__ import annotations

import os
import threading

FRAMES = int(os.environ.get("GPUGATE_SOAK_TRACE_FRAMES", "12"))
# "malloc": tracemalloc + live object types (after a collection); "gc": only the
# collector's own figures and the types of every object it tracks, garbage included,
# with no collection and no tracing, so the process runs at its usual pace.
MODE = os.environ.get("GPUGATE_SOAK_TRACE_MODE", "malloc")
TOP = 25
TITLE = "ServeReplica:"


def _title() -> str:
    with open("/proc/self/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def _types() -> dict[str, int]:
    import gc
    from collections import Counter

    if MODE != "gc":
        # Live objects only (garbage waiting for a collection is not growth).
        gc.collect()
    # Without the frozen start-up objects (gc.freeze): only what was made since.
    return dict(Counter(type(o).__qualname__ for o in gc.get_objects()))


def _gc_figures() -> list[str]:
    import gc

    return [
        f"collections per generation: {[s['collections'] for s in gc.get_stats()]}; "
        f"collected: {[s['collected'] for s in gc.get_stats()]}",
        f"counts {gc.get_count()}, thresholds {gc.get_threshold()}, frozen "
        f"{gc.get_freeze_count()}, objects per generation "
        f"{[len(gc.get_objects(generation=g)) for g in range(3)]}",
    ]


def _report_gc(directory: str, name: str, index: int, types0: dict[str, int]) -> None:
    lines = [f"{name} pid {os.getpid()} mark {index}", *_gc_figures()]
    types = _types()
    grown = sorted(((n - types0.get(t, 0), t) for t, n in types.items()), reverse=True)
    lines += ["", f"object types that grew since mark 0 (garbage included), top {TOP}:"]
    lines += [f"  {d:+8d}  {t}" for d, t in grown[:TOP] if d > 0]
    with open(os.path.join(directory, f"{name}-{os.getpid()}-{index}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _report(directory: str, name: str, index: int, baseline: object, types0: dict) -> None:
    import tracemalloc

    # Not what this probe allocated itself (its reports, linecache's copy of the sources).
    snap = tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, __file__, all_frames=True),
        ]
    )
    stats = snap.compare_to(baseline, "traceback")  # type: ignore[arg-type]
    types = _types()
    grown = sorted(((n - types0.get(t, 0), t) for t, n in types.items()), reverse=True)
    traced, peak = tracemalloc.get_traced_memory()
    lines = [
        f"{name} pid {os.getpid()} mark {index}: traced {traced / 1e6:.1f} MB "
        f"(peak {peak / 1e6:.1f} MB); growth since mark 0: "
        f"{sum(s.size_diff for s in stats) / 1e6:+.2f} MB in "
        f"{sum(s.count_diff for s in stats):+d} blocks",
        "",
        f"object types that grew (gc-tracked, not frozen), top {TOP}:",
        *(f"  {d:+8d}  {t}" for d, t in grown[:TOP] if d > 0),
        "",
        f"allocation sites that grew, top {TOP}:",
    ]
    for stat in stats[:TOP]:
        lines.append(
            f"{stat.size_diff / 1e3:+10.1f} kB {stat.count_diff:+8d} blocks "
            f"(now {stat.size / 1e3:.1f} kB in {stat.count} blocks)"
        )
        lines.extend(f"      {frame}" for frame in stat.traceback.format()[-2 * FRAMES :])
    path = os.path.join(directory, f"{name}-{os.getpid()}-{index}.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _watch(directory: str) -> None:
    import time
    import tracemalloc

    while TITLE not in _title():
        time.sleep(2)
    index = 0
    baseline = None
    types0: dict[str, int] = {}
    while True:
        time.sleep(1)
        if not os.path.exists(os.path.join(directory, f"mark-{index}")):
            continue
        # Read now: while a method runs, Ray's title names it ("gateway.__init__").
        name = _title().split(TITLE, 1)[1].split()[0].rsplit(":", 1)[-1]
        try:
            if MODE == "gc":
                if index == 0:
                    types0 = _types()
                else:
                    _report_gc(directory, name, index, types0)
            elif baseline is None:
                # From the end of the warm-up only: tracing start-up (imports, model
                # loading) would slow it past the soak's start-up timeout; what is
                # allocated later and still held at a mark is the growth.
                tracemalloc.start(FRAMES)
                baseline = tracemalloc.take_snapshot()
                types0 = _types()
            else:
                _report(directory, name, index, baseline, types0)
        except Exception as exc:  # a diagnostic must not take the replica down
            with open(os.path.join(directory, f"{name}-{os.getpid()}-error.txt"), "a") as f:
                f.write(f"mark {index}: {type(exc).__name__}: {exc}\n")
        index += 1


_DIR = os.environ.get("GPUGATE_SOAK_TRACE_DIR")
if _DIR:
    threading.Thread(target=_watch, args=(_DIR,), daemon=True, name="soak-probe").start()
