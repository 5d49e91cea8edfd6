"""Triton's model configuration and statistics extensions, as one JSON-shaped dict each.

HTTP answers the dicts as they are (``GET /v2/models/{m}[/versions/{v}]/config``
and ``.../stats``); gRPC parses them into the protobuf messages
(``ModelConfig``, ``ModelStatistics``), so both protocols say the same thing.
Field names and values follow Triton's, so tools that read a model's
configuration (max_batch_size, inputs, outputs, batching) or its statistics
(perf_analyzer, tritonclient's ``get_model_config`` and
``get_inference_statistics``) work unchanged.
"""

from __future__ import annotations

from typing import Any

from router._exceptions import InvalidArgument, NotFound
from router.service import PLATFORM, InferenceService, ServedModel
from router.tensors import DEFAULT_PRIORITY_LEVEL, MAX_PRIORITY_LEVEL
from router.types import TensorSpec
from scheduler import Duration

BACKEND = "pytorch"


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "data_type": f"TYPE_{spec.datatype}", "dims": list(spec.shape)}


def model_config(served: ServedModel, default_timeout_s: float) -> dict[str, Any]:
    """The version's configuration in Triton's form (``max_batch_size`` > 0: dims are
    one row's shape, the batch dimension first is implied)."""
    policy = served.batcher.policy
    return {
        "name": served.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "max_batch_size": policy.max_batch_size,
        "input": [_tensor(t) for t in served.signature.inputs],
        "output": [_tensor(t) for t in served.signature.outputs],
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(policy.max_queue_delay_s * 1e6),
            "priority_levels": MAX_PRIORITY_LEVEL,
            "default_priority_level": DEFAULT_PRIORITY_LEVEL,
            "default_queue_policy": {
                "timeout_action": "REJECT",  # 504, never run late
                "default_timeout_microseconds": round(default_timeout_s * 1e6),
                "allow_timeout_override": True,  # the request's ``timeout`` parameter
                # Rows, not requests, bound gpugate's queue (429 past it); a uint32.
                "max_queue_size": min(policy.max_queued_rows, 2**32 - 1),
            },
        },
        "instance_group": [
            {
                "name": served.name,
                "kind": "KIND_GPU" if served.gpus_per_replica > 0 else "KIND_CPU",
                "count": served.replicas,
            }
        ],
    }


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def model_statistics(served: ServedModel) -> dict[str, Any]:
    """Cumulative statistics of one version (see scheduler.stats for what each means)."""
    s = served.batcher.stats
    return {
        "name": served.name,
        "version": served.version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success),
            "fail": _duration(s.fail),
            "queue": _duration(s.queue),
            "compute_input": _duration(s.compute_input),
            "compute_infer": _duration(s.compute_infer),
            "compute_output": _duration(s.compute_output),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(b.compute_input),
                "compute_infer": _duration(b.compute_infer),
                "compute_output": _duration(b.compute_output),
            }
            for size, b in sorted(s.by_batch_size.items())
        ],
    }


def config_of(service: InferenceService, name: str, version: str | None) -> dict[str, Any]:
    """The configuration of the named version, or of the version serving ``name``."""
    served = service.models.resolve(name, version or None)
    return model_config(served, service.settings.default_timeout_s)


def statistics_of(
    service: InferenceService, name: str | None, version: str | None
) -> dict[str, Any]:
    """``{"model_stats": [...]}`` of one version, of every version serving ``name``, or
    (no name) of every version serving."""
    if version and not name:
        raise InvalidArgument("a version needs the model's name")
    if name and version:
        found = [service.models.resolve(name, version)]
    elif name:
        found = service.models.serving(name)
        if not found:
            raise NotFound(f"unknown model {name!r}")
    else:
        found = service.models.serving()
    return {"model_stats": [model_statistics(m) for m in found]}
