"""The forward pass of a replica: one loaded model on one device, whole batches."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from router import ModelSignature, TensorSpec
from serving.config import ModelConfig
from serving.replica.artifacts import (
    ModelInputError,
    ModelOutputError,
    load_module,
    pick_device,
)


class ModelRunner:
    """One loaded model on one device: runs whole batches and times the forward."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        num_threads: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.config = config
        self.signature: ModelSignature = config.signature()
        self.device = device if device is not None else pick_device(config.num_gpus)
        threads = num_threads if num_threads is not None else _default_threads(config.num_cpus)
        if threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {threads}")
        # Process-wide, which is right for a Ray replica (one model per process).
        torch.set_num_threads(threads)
        self.module = load_module(
            config.artifact, config.format, config.model_class, config.model_kwargs, self.device
        )
        self._out_dtypes = [_torch_dtype(spec) for spec in self.signature.outputs]

    @property
    def device_type(self) -> str:
        """The device label for metrics and cost: "cpu" or the CUDA name, e.g. "NVIDIA L4"."""
        if self.device.type == "cuda":
            return str(torch.cuda.get_device_name(self.device))
        return self.device.type

    def warmup(self) -> None:
        """Run one row of zeros so lazy init and allocator growth don't hit a request."""
        batch = {
            spec.name: np.zeros((1, *(1 if d == -1 else d for d in spec.shape)), dtype=spec.dtype)
            for spec in self.signature.inputs
        }
        self.run(batch)

    def run(
        self, inputs: Mapping[str, npt.NDArray[Any]]
    ) -> tuple[dict[str, npt.NDArray[Any]], int]:
        """Run one batch; returns outputs by name and the forward's device time in ns."""
        rows = self._check_inputs(inputs)
        tensors = [self._to_tensor(inputs[spec.name], spec) for spec in self.signature.inputs]
        with torch.inference_mode():
            raw, device_ns = self._forward(tensors)
            outputs = self._collect(raw, rows)
        return outputs, device_ns

    def _forward(self, tensors: list[torch.Tensor]) -> tuple[Any, int]:
        if self.device.type == "cuda":
            # Wall time would count the launch queue and the host; events measure
            # the kernels only, excluding the input copies queued before `start`.
            with torch.cuda.device(self.device):
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record()
                raw = self.module(*tensors)
                end.record()
                end.synchronize()
                return raw, max(1, round(start.elapsed_time(end) * 1_000_000))
        t0 = time.perf_counter_ns()
        raw = self.module(*tensors)
        return raw, time.perf_counter_ns() - t0

    def _check_inputs(self, inputs: Mapping[str, npt.NDArray[Any]]) -> int:
        expected = [spec.name for spec in self.signature.inputs]
        missing = [name for name in expected if name not in inputs]
        unknown = sorted(set(inputs) - set(expected))
        if missing or unknown:
            raise ModelInputError(
                f"model {self.config.name!r} takes inputs {expected}; "
                f"missing {missing}, unknown {unknown}"
            )
        for spec in self.signature.inputs:
            array = inputs[spec.name]
            if not _fits(array.shape, spec):
                raise ModelInputError(
                    f"input {spec.name!r} has shape {list(array.shape)}; "
                    f"expected [rows, {', '.join(map(str, spec.shape))}]"
                )
        first = self.signature.inputs[0].name
        rows = int(inputs[first].shape[0])
        for spec in self.signature.inputs[1:]:
            if inputs[spec.name].shape[0] != rows:
                raise ModelInputError(
                    f"input {spec.name!r} has {inputs[spec.name].shape[0]} rows, "
                    f"{first!r} has {rows}"
                )
        if rows == 0:
            raise ModelInputError("empty batch")
        return rows

    def _to_tensor(self, array: npt.NDArray[Any], spec: TensorSpec) -> torch.Tensor:
        array = np.ascontiguousarray(array, dtype=spec.dtype)
        if not array.flags.writeable:
            # Codecs hand out np.frombuffer views of request bodies; torch.from_numpy
            # warns on those, and a model writing in place would fault.
            array = array.copy()
        return torch.from_numpy(array).to(self.device)

    def _collect(self, raw: Any, rows: int) -> dict[str, npt.NDArray[Any]]:
        specs = self.signature.outputs
        if isinstance(raw, torch.Tensor):
            values: list[Any] = [raw]
        elif isinstance(raw, tuple | list):
            values = list(raw)
        elif isinstance(raw, Mapping):
            missing = [spec.name for spec in specs if spec.name not in raw]
            if missing:
                raise ModelOutputError(f"model output dict lacks {missing}; has {sorted(raw)}")
            values = [raw[spec.name] for spec in specs]
        else:
            raise ModelOutputError(
                f"model returned {type(raw).__name__}; expected a tensor, "
                "a tuple/list of tensors or a dict of tensors by output name"
            )
        if len(values) != len(specs):
            raise ModelOutputError(
                f"model returned {len(values)} outputs; signature has {len(specs)}"
            )
        outputs: dict[str, npt.NDArray[Any]] = {}
        for spec, dtype, value in zip(specs, self._out_dtypes, values, strict=True):
            if not isinstance(value, torch.Tensor):
                raise ModelOutputError(f"output {spec.name!r} is {type(value).__name__}")
            shape = tuple(value.shape)
            if not shape or shape[0] != rows:
                raise ModelOutputError(
                    f"output {spec.name!r} has shape {list(shape)} for {rows} input rows; "
                    "every output needs one row per input row"
                )
            if not _fits(shape, spec):
                raise ModelOutputError(
                    f"output {spec.name!r} has shape {list(shape)}; "
                    f"signature says [rows, {', '.join(map(str, spec.shape))}]"
                )
            array = value.detach().to(device="cpu", dtype=dtype).numpy()
            outputs[spec.name] = np.ascontiguousarray(array)
        return outputs


def _fits(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    if len(shape) != len(spec.shape) + 1:
        return False
    return all(want in (-1, got) for want, got in zip(spec.shape, shape[1:], strict=True))


def _torch_dtype(spec: TensorSpec) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=spec.dtype)).dtype


def _default_threads(num_cpus: float) -> int:
    # Ray reserves CPUs without pinning; torch's default of one thread per host
    # core in every replica would oversubscribe the host.
    return max(1, min(int(num_cpus), os.cpu_count() or 1))
