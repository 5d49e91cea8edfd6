"""The model registry: immutable versions with lineage in content-addressed storage,
the guardrails that refuse a version, approvals and stage changes."""

from serving.registry.artifacts import ArtifactUpload, artifact_path, file_digest, store_artifact
from serving.registry.review import REFUSED, against_production, guardrail_refusals
from serving.registry.stages import Stages
from serving.registry.store import Registry
from serving.registry.versions import (
    CONFIG_AUTHOR,
    ApprovalError,
    ArtifactTooLarge,
    Candidate,
    GuardrailRefused,
    RegistryError,
    Signature,
    StageError,
    UploadMismatch,
    VersionExistsError,
    VersionNotFoundError,
    VersionRow,
    parse_tensor,
    version_from_row,
)

__all__ = [
    "CONFIG_AUTHOR",
    "REFUSED",
    "ApprovalError",
    "ArtifactTooLarge",
    "ArtifactUpload",
    "Candidate",
    "GuardrailRefused",
    "Registry",
    "RegistryError",
    "Signature",
    "StageError",
    "Stages",
    "UploadMismatch",
    "VersionExistsError",
    "VersionNotFoundError",
    "VersionRow",
    "against_production",
    "artifact_path",
    "file_digest",
    "guardrail_refusals",
    "parse_tensor",
    "store_artifact",
    "version_from_row",
]
