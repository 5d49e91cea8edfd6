"""Registering as the admin API does: the artifact file arrives as an upload, in chunks,
and the registry checks and records it (serving.admin.model_routes)."""

from __future__ import annotations

import dataclasses

import pytest

import serving.registry.guardrails as guardrails
from serving.config import ModelConfig, ModelPolicy
from serving.registry import (
    ArtifactTooLarge,
    ArtifactUpload,
    Candidate,
    Registry,
    VersionRow,
    file_digest,
)

_CHUNK = 1 << 16


def register_file(reg: Registry, actor: str, cand: Candidate) -> VersionRow:
    """Upload ``cand.artifact`` and register it with :meth:`Registry.register_upload`; a
    size refusal is audited as the admin API audits it."""
    policy = reg.policy(cand.name)
    with ArtifactUpload(reg.state_dir, policy.max_artifact_bytes) as upload:
        try:
            with cand.artifact.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    upload.write(chunk)
        except ArtifactTooLarge as exc:
            reg.refuse(actor, Registry.target(cand.name, cand.version), exc, "register")
            raise
        upload.finish(file_digest(cand.artifact))
        return reg.register_upload(actor, dataclasses.replace(cand, artifact=upload.path), upload)


def skip_smoke_tests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the smoke test (a child process that loads the model) by a record of the
    versions it was asked to check, for tests about everything else."""
    checked: list[str] = []

    def record(config: ModelConfig, policy: ModelPolicy, limits: object) -> None:
        checked.append(f"{config.name}:{config.version}")

    monkeypatch.setattr(guardrails, "smoke_test", record)
    return checked
