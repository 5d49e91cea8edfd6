"""A model version's replica: artifact vetting and loading, the forward pass, the
Ray Serve deployment that runs batches, and the smoke test of a candidate.
"""

from typing import TYPE_CHECKING, Any

from serving.replica.artifacts import (
    FORMATS,
    MAX_PICKLE_BYTES,
    ModelInputError,
    ModelLoadError,
    ModelOutputError,
    load_module,
    open_archive,
    pick_device,
    read_record,
    vet_pt2,
)
from serving.replica.runner import ModelRunner

if TYPE_CHECKING:
    from serving.replica.deployment import (
        ModelReplica,
        check_artifact_digest,
        deployment_name,
        model_deployment,
    )

# The Serve deployment needs Ray; the loaders and the runner do not (a benchmark peer
# runs them in a venv without Ray), so its names are imported on first use.
_DEPLOYMENT = frozenset(
    {"ModelReplica", "check_artifact_digest", "deployment_name", "model_deployment"}
)


def __getattr__(name: str) -> Any:
    if name in _DEPLOYMENT:
        from serving.replica import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "MAX_PICKLE_BYTES",
    "ModelInputError",
    "ModelLoadError",
    "ModelOutputError",
    "ModelReplica",
    "ModelRunner",
    "check_artifact_digest",
    "deployment_name",
    "load_module",
    "model_deployment",
    "open_archive",
    "pick_device",
    "read_record",
    "vet_pt2",
]
