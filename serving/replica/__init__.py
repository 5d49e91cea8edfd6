"""A model version's replica: artifact vetting and loading, the forward pass, the
Ray Serve deployment that runs batches, and the smoke test of a candidate.
"""

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
from serving.replica.deployment import (
    ModelReplica,
    check_artifact_digest,
    deployment_name,
    model_deployment,
)
from serving.replica.runner import ModelRunner

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
