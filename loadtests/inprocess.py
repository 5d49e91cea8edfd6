"""The bench model in this process: the row every request sends, its reference
output, and the in-process limit (:class:`serving.replica.ModelRunner`, 1 torch
thread) that no server can beat.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

ROW_SEED = 1234


@dataclass
class InProcessResult:
    batch_rows: int
    batches: int
    batch_ms_median: float
    rows_per_s: float
    forward_1row_ms: float
    run_1row_ms: float
    rows_per_s_batch1: float


def bench_row() -> np.ndarray:
    from serving.demo import BENCH_IN

    return np.random.default_rng(ROW_SEED).standard_normal((1, BENCH_IN), dtype=np.float32)


def in_process_limit(config: Any, seconds: float, log: Callable[[str], None]) -> InProcessResult:
    """ModelRunner with 1 thread: full batches of max_batch_size rows, and single rows."""
    from serving.replica import ModelRunner

    runner = ModelRunner(config, num_threads=1)
    runner.warmup()
    rows = config.max_batch_size
    rng = np.random.default_rng(ROW_SEED)
    batch = {"x": rng.standard_normal((rows, config.inputs[0].shape[0]), dtype=np.float32)}
    one = {"x": batch["x"][:1].copy()}
    for _ in range(5):
        runner.run(batch)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 10:
        t0 = time.perf_counter()
        runner.run(batch)
        times.append(time.perf_counter() - t0)
    batch_elapsed = time.perf_counter() - start
    for _ in range(20):
        runner.run(one)
    forward_ns: list[int] = []
    run_s: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds / 2 or len(run_s) < 20:
        t0 = time.perf_counter()
        _, ns = runner.run(one)
        run_s.append(time.perf_counter() - t0)
        forward_ns.append(ns)
    one_elapsed = time.perf_counter() - start
    result = InProcessResult(
        batch_rows=rows,
        batches=len(times),
        batch_ms_median=statistics.median(times) * 1e3,
        rows_per_s=rows * len(times) / batch_elapsed,
        forward_1row_ms=statistics.median(forward_ns) / 1e6,
        run_1row_ms=statistics.median(run_s) * 1e3,
        rows_per_s_batch1=len(run_s) / one_elapsed,
    )
    log(
        f"in-process limit: {result.rows_per_s:.0f} rows/s at batch {rows} "
        f"({result.batch_ms_median:.2f} ms/batch); 1-row forward {result.forward_1row_ms:.3f} ms "
        f"({result.rows_per_s_batch1:.0f} rows/s at batch 1)"
    )
    return result


def reference_output(config: Any, row: np.ndarray) -> np.ndarray:
    from serving.replica import ModelRunner

    runner = ModelRunner(config, num_threads=1)
    outputs, _ = runner.run({"x": row})
    return outputs["y"]
