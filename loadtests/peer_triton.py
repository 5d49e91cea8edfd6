"""NVIDIA Triton peer for the side-by-side benchmark (``loadtests/bench.py``).

What a user who picks Triton would run for a torch model from Python: PyTriton
(``nvidia-pytriton``, which bundles a real ``tritonserver``) with Triton's own
dynamic batcher in front of the same BenchMLP (same safetensors weights,
:class:`serving.replica.ModelRunner`, 1 torch thread), ``max_batch_size`` and
batch wait as the other systems. Triton serves KServe v2 over HTTP and gRPC
itself; its Prometheus metrics (``nv_inference_exec_count`` = batches,
``nv_inference_count`` = rows) give the benchmark the mean batch size.

Runs under its own virtual environment (PyTriton needs numpy<2), which
``triton_venv.py`` builds; the repository root is on ``PYTHONPATH`` for
``serving``. ``LD_LIBRARY_PATH`` must hold the directory of this Python's
libpython, or Triton's Python-backend stub loads another libpython and fails.
Prints one line starting ``triton-peer ready`` and exits 0 after SIGTERM/SIGINT.

    python loadtests/peer_triton.py --state-dir DIR --grpc-port P --http-port P --metrics-port P
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="where the weights live")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    args = parser.parse_args(argv)

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import (
        DEFAULT_PROTECTED_ENDPOINTS,
        Triton,
        TritonConfig,
        TritonSecurityConfig,
    )

    from serving.demo import bench_model_config
    from serving.replica import ModelRunner

    model = bench_model_config(args.state_dir, max_batch_size=args.max_batch_size)
    runner = ModelRunner(model, num_threads=1)
    runner.warmup()
    in_name, out_name = model.inputs[0].name, model.outputs[0].name

    @batch  # type: ignore[untyped-decorator]
    def infer(**inputs: np.ndarray) -> dict[str, Any]:
        outputs, _ = runner.run({in_name: inputs[in_name]})
        return {out_name: outputs[out_name]}

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    # PyTriton guards the statistics extension with a generated token by default; the
    # benchmark reads it (bench.py's "where a request's time goes"), on 127.0.0.1 only.
    security = TritonSecurityConfig(
        restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"]
    )
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer,
            inputs=[Tensor(name=in_name, dtype=np.float32, shape=tuple(model.inputs[0].shape))],
            outputs=[Tensor(name=out_name, dtype=np.float32, shape=tuple(model.outputs[0].shape))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(
                    max_queue_delay_microseconds=round(args.batch_wait_ms * 1000)
                ),
            ),
            strict=True,
        )
        triton.run()
        print(
            f"triton-peer ready grpc=127.0.0.1:{args.grpc_port} http=127.0.0.1:{args.http_port} "
            f"metrics=127.0.0.1:{args.metrics_port} model={MODEL_NAME} "
            f"max_batch_size={args.max_batch_size} batch_wait_ms={args.batch_wait_ms:g}",
            flush=True,
        )
        stop.wait()
        print("triton-peer stopping", flush=True)
    print("triton-peer stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
