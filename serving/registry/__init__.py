"""The model registry: immutable versions with lineage in content-addressed storage,
the guardrails that refuse a version, approvals and stage changes."""

from serving.registry.artifacts import artifact_path, file_digest, git_revision, store_artifact
from serving.registry.stages import Stages
from serving.registry.store import Registry
from serving.registry.versions import (
    CONFIG_AUTHOR,
    ApprovalError,
    Candidate,
    GuardrailRefused,
    RegistryError,
    Signature,
    StageError,
    VersionExistsError,
    VersionNotFoundError,
    VersionRow,
    parse_tensor,
    version_from_row,
)

__all__ = [
    "CONFIG_AUTHOR",
    "ApprovalError",
    "Candidate",
    "GuardrailRefused",
    "Registry",
    "RegistryError",
    "Signature",
    "StageError",
    "Stages",
    "VersionExistsError",
    "VersionNotFoundError",
    "VersionRow",
    "artifact_path",
    "file_digest",
    "git_revision",
    "parse_tensor",
    "store_artifact",
    "version_from_row",
]
