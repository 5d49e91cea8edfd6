"""The smoke test's child process: ``python -m serving.replica.smoke REQUEST``, where the
file REQUEST holds {"config", "rows", "limits"}.

Sets the resource limits on itself first (address space, CPU seconds, open files, file
size, no core dumps; soft and hard alike, so the candidate cannot raise them again),
then loads the candidate exactly as a replica would (digest check, vetted loader) on
the CPU, runs one row and then ``rows`` rows of inputs generated from the signature,
and prints one JSON line: {"ok": true, "outputs": {...}} or {"ok": false,
"reason": ...}.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from serving.config import ModelConfig


def apply_limits(limits: Mapping[str, int]) -> None:
    """Limit this process: ``memory_bytes`` of address space, ``cpu_s`` more seconds of
    CPU, ``open_files`` descriptors, files of at most ``file_bytes``, and no core file.
    A limit is never raised above the hard limit this process already has."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(usage.ru_utime + usage.ru_stime) + 1
    wanted = {
        resource.RLIMIT_AS: limits["memory_bytes"],
        resource.RLIMIT_CPU: spent + limits["cpu_s"],
        resource.RLIMIT_NOFILE: limits["open_files"],
        resource.RLIMIT_FSIZE: limits["file_bytes"],
        resource.RLIMIT_CORE: 0,
    }
    for kind, value in wanted.items():
        _, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))


def sample_inputs(config: ModelConfig, rows: int, seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    """Deterministic inputs that fit the signature: variable dims get 4."""
    rng = np.random.default_rng(seed)
    batch: dict[str, npt.NDArray[Any]] = {}
    for spec in config.signature().inputs:
        shape = (rows, *(4 if d == -1 else d for d in spec.shape))
        dtype = spec.dtype
        if dtype.kind == "f":
            batch[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            batch[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            batch[spec.name] = rng.integers(0, 8, shape).astype(dtype)
    return batch


def run(config: ModelConfig, rows: int) -> dict[str, Any]:
    from serving.replica.deployment import check_artifact_digest
    from serving.replica.runner import ModelRunner

    check_artifact_digest(config)
    runner = ModelRunner(config, num_threads=1, device=torch.device("cpu"))
    shapes: dict[str, list[int]] = {}
    for n in sorted({1, min(rows, config.max_batch_size)}):
        outputs, _ = runner.run(sample_inputs(config, n, seed=n))
        for name, array in outputs.items():
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                bad = int((~np.isfinite(array)).sum())
                return {"ok": False, "reason": f"output {name!r} has {bad} NaN/Inf values"}
            shapes[name] = list(array.shape)
    return {"ok": True, "outputs": shapes}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m serving.replica.smoke REQUEST_FILE", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    apply_limits(request["limits"])
    try:
        result = run(ModelConfig.model_validate(request["config"]), int(request["rows"]))
    except Exception as exc:
        result = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"[:2000]}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
