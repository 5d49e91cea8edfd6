"""The registry's records and errors: a version's signature and row, what ``register``
is asked to record, and the one exception hierarchy of the registry."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.config import ModelConfig, TensorConfig

CONFIG_AUTHOR = "config"


class RegistryError(Exception):
    """Base of the registry errors; the message is meant for the operator."""


class VersionNotFoundError(RegistryError):
    pass


class VersionExistsError(RegistryError):
    pass


class ApprovalError(RegistryError):
    """An approval or rejection that is not allowed (author, duplicate, wrong stage)."""


class StageError(RegistryError):
    """A stage change that is not allowed from the version's current stage."""


class GuardrailRefused(RegistryError):
    """A guardrail refused a version; ``check`` names which one."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"refused by the {check} guardrail: {reason}")
        self.check = check
        self.reason = reason


class ArtifactTooLarge(GuardrailRefused):
    """The size guardrail: the artifact is over the policy's ``max_artifact_bytes``."""

    def __init__(self, reason: str) -> None:
        super().__init__("size", reason)


class UploadMismatch(RegistryError):
    """The bytes received do not hash to the sha256 the sender declared: the artifact
    changed in transit, or the sender hashed another file."""


def _aware(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.model_dump() for t in self.inputs],
            "outputs": [t.model_dump() for t in self.outputs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signature:
        return cls(
            tuple(TensorConfig.model_validate(t) for t in data["inputs"]),
            tuple(TensorConfig.model_validate(t) for t in data["outputs"]),
        )

    @classmethod
    def of(cls, model: ModelConfig) -> Signature:
        return cls(tuple(model.inputs), tuple(model.outputs))


def parse_tensor(text: str) -> TensorConfig:
    """``name:DATATYPE:d1,d2`` (one row's shape, -1 for a variable dim)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"tensor {text!r} must be NAME:DATATYPE:DIMS, e.g. pixels:FP32:64")
    name, datatype, dims = parts
    try:
        shape = [int(d) for d in dims.split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"tensor {text!r}: dims must be integers") from None
    try:
        return TensorConfig(name=name, datatype=datatype, shape=shape)
    except ValueError as exc:
        raise ValueError(f"tensor {text!r}: {exc}") from None


@dataclass(frozen=True)
class VersionRow:
    name: str
    version: str
    format: str
    digest: str
    size_bytes: int
    model_class: str | None
    model_kwargs: dict[str, Any]
    signature: Signature
    metrics: dict[str, float]
    parent_version: str | None
    source_uri: str | None
    dataset_digest: str | None
    code_revision: str | None
    author: str
    created_at: datetime
    stage: str
    stage_changed_at: datetime
    promoted_at: datetime | None = field(default=None)

    @property
    def target(self) -> str:
        return f"model:{self.name}:{self.version}"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "sha256": self.digest,
            "size_bytes": self.size_bytes,
            "model_class": self.model_class,
            "model_kwargs": self.model_kwargs,
            "signature": self.signature.as_json(),
            "metrics": self.metrics,
            "lineage": {
                "parent_version": self.parent_version,
                "source_uri": self.source_uri,
                "dataset_digest": self.dataset_digest,
                "code_revision": self.code_revision,
            },
            "author": self.author,
            "created_at": self.created_at.isoformat(),
            "stage": self.stage,
            "stage_changed_at": self.stage_changed_at.isoformat(),
        }


@dataclass(frozen=True)
class Candidate:
    """What ``Registry.register_upload`` is asked to record, before it is checked."""

    name: str
    artifact: Path
    format: str
    signature: Signature | None = None
    model_class: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    parent_version: str | None = None
    source_uri: str | None = None
    dataset_digest: str | None = None
    code_revision: str | None = None
    version: str | None = None  # None: the next integer version


def version_from_row(r: Any) -> VersionRow:
    """A ``model_versions`` row as a :class:`VersionRow`."""
    return VersionRow(
        name=r.name,
        version=r.version,
        format=r.format,
        digest=r.digest.strip(),
        size_bytes=int(r.size_bytes),
        model_class=r.model_class,
        model_kwargs=json.loads(r.model_kwargs),
        signature=Signature.from_json(json.loads(r.signature)),
        metrics=json.loads(r.metrics),
        parent_version=r.parent_version,
        source_uri=r.source_uri,
        dataset_digest=r.dataset_digest,
        code_revision=r.code_revision,
        author=r.author,
        created_at=_aware(r.created_at) or r.created_at,
        stage=r.stage,
        stage_changed_at=_aware(r.stage_changed_at) or r.stage_changed_at,
        promoted_at=_aware(r.promoted_at),
    )
