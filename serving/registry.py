"""The model registry: immutable versions with lineage, in content-addressed storage.

``register`` copies the artifact into ``state_dir/artifacts/sha256/<digest>``
(hashing while copying, so the recorded digest is of the stored bytes), runs the
guardrails (serving.guardrails) and records the version with its signature,
metrics, lineage, author and time, audited in the same transaction. Nothing
but the stage columns of a version ever changes; stages and approvals live in
serving.promotion.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from serving import audit
from serving.config import _NAME, GatewayConfig, ModelConfig, ModelPolicy, TensorConfig
from serving.state import model_versions as t_versions

CONFIG_AUTHOR = "config"
_CHUNK = 1 << 20


class RegistryError(Exception):
    """Base of the registry errors; the message is meant for the operator."""


class VersionNotFoundError(RegistryError):
    pass


class VersionExistsError(RegistryError):
    pass


class GuardrailRefused(RegistryError):
    """A guardrail refused a version; ``check`` names which one."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"refused by the {check} guardrail: {reason}")
        self.check = check
        self.reason = reason


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


def _row(r: Any) -> VersionRow:
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


# ------------------------------------------------------------- artifact storage


def artifact_path(state_dir: Path, digest: str) -> Path:
    return state_dir / "artifacts" / "sha256" / digest


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def store_artifact(src: Path, state_dir: Path, max_bytes: int) -> tuple[str, int]:
    """Copy ``src`` into the content-addressed store; returns (sha256, size)."""
    if not src.is_file():
        raise RegistryError(f"artifact {src} is not a file")
    size = src.stat().st_size
    if size > max_bytes:
        raise GuardrailRefused("size", f"artifact is {size} bytes; the limit is {max_bytes}")
    folder = state_dir / "artifacts" / "sha256"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".incoming.{os.getpid()}.{os.urandom(4).hex()}"
    h = hashlib.sha256()
    copied = 0
    try:
        with src.open("rb") as fin, tmp.open("xb") as fout:
            while chunk := fin.read(_CHUNK):
                copied += len(chunk)
                if copied > max_bytes:
                    raise GuardrailRefused("size", f"artifact grew past the {max_bytes}-byte limit")
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        digest = h.hexdigest()
        final = folder / digest
        if final.exists():
            tmp.unlink()  # the same bytes are stored already
        else:
            tmp.chmod(0o444)
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return digest, copied


def git_revision(where: Path) -> str | None:
    """The git commit of the folder the model came from, if it is in a repository."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0:
            return out.stdout.strip() or None
    return None


# ---------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Candidate:
    """What ``register`` is asked to record, before it is checked and stored."""

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


class Registry:
    """Reads and writes model versions. Blocking; call from a thread in async code."""

    def __init__(self, engine: sa.Engine, state_dir: Path, config: GatewayConfig) -> None:
        self.engine = engine
        self.state_dir = state_dir
        self.config = config

    def policy(self, name: str) -> ModelPolicy:
        return self.config.policy(name)

    # -- reading ----------------------------------------------------------------

    def get(self, name: str, version: str) -> VersionRow:
        with self.engine.connect() as conn:
            r = conn.execute(
                sa.select(t_versions).where(
                    t_versions.c.name == name, t_versions.c.version == version
                )
            ).first()
        if r is None:
            raise VersionNotFoundError(f"model {name!r} has no registered version {version!r}")
        return _row(r)

    def list(self, name: str | None = None) -> builtins.list[VersionRow]:
        query = sa.select(t_versions).order_by(t_versions.c.name, t_versions.c.id)
        if name is not None:
            query = query.where(t_versions.c.name == name)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query).all()]

    def production(self, name: str) -> VersionRow | None:
        found = [v for v in self.list(name) if v.stage == "production"]
        return found[0] if found else None

    def lineage(self, name: str, version: str) -> builtins.list[VersionRow]:
        """The version and its ancestors, newest first (a cycle cannot be registered)."""
        chain = [self.get(name, version)]
        seen = {version}
        while chain[-1].parent_version is not None and chain[-1].parent_version not in seen:
            seen.add(chain[-1].parent_version)
            chain.append(self.get(name, chain[-1].parent_version))
        return chain

    def children(self, name: str) -> dict[str, builtins.list[str]]:
        kids: dict[str, builtins.list[str]] = {}
        for v in self.list(name):
            if v.parent_version is not None:
                kids.setdefault(v.parent_version, []).append(v.version)
        return kids

    def model_config(self, row: VersionRow) -> ModelConfig:
        """The serving config of a version: the configured serving knobs of its model
        (batching, replicas, resources) with the registered artifact and signature."""
        base = next((m for m in reversed(self.config.models) if m.name == row.name), None)
        fields: dict[str, Any] = base.model_dump() if base is not None else {}
        fields.update(
            name=row.name,
            version=row.version,
            artifact=artifact_path(self.state_dir, row.digest),
            format=row.format,
            model_class=row.model_class,
            model_kwargs=row.model_kwargs,
            inputs=[t.model_dump() for t in row.signature.inputs],
            outputs=[t.model_dump() for t in row.signature.outputs],
            sha256=row.digest,
        )
        return ModelConfig.model_validate(fields)

    # -- registering ------------------------------------------------------------

    def register(self, actor: str, cand: Candidate, *, smoke: bool = True) -> VersionRow:
        """Check, store and record a new version; a refusal is audited and raised."""
        from serving import guardrails

        target = f"model:{cand.name}:{cand.version or 'new'}"
        try:
            if not _NAME.match(cand.name):
                raise ValueError(f"model name {cand.name!r} must match {_NAME.pattern}")
            if cand.version is not None and not _NAME.match(cand.version):
                raise ValueError(f"version {cand.version!r} must match {_NAME.pattern}")
            policy = self.policy(cand.name)
            guardrails.check_format(cand.artifact, cand.format)
            parent = self.get(cand.name, cand.parent_version) if cand.parent_version else None
            production = self.production(cand.name)
            signature = cand.signature or _inherited_signature(parent, production)
            digest, size = store_artifact(cand.artifact, self.state_dir, policy.max_artifact_bytes)
            stored = artifact_path(self.state_dir, digest)
            guardrails.check_payload(stored, cand.format)
            if production is not None:
                guardrails.check_signature(signature, production.signature)
                guardrails.check_metrics(dict(cand.metrics), production.metrics, policy)
            config = self._candidate_config(cand, signature, stored, digest)
            if smoke:
                guardrails.smoke_test(config, policy)
        except GuardrailRefused as exc:
            self.refuse(actor, target, exc, "register")
            raise
        return self._insert(actor, cand, signature, digest, size)

    def refuse(self, actor: str, target: str, exc: GuardrailRefused, during: str) -> None:
        audit.append(
            self.engine,
            actor,
            "model.refused",
            target,
            after={"check": exc.check, "during": during},
            reason=exc.reason,
        )

    def _candidate_config(
        self, cand: Candidate, signature: Signature, stored: Path, digest: str
    ) -> ModelConfig:
        base = next((m for m in reversed(self.config.models) if m.name == cand.name), None)
        fields: dict[str, Any] = base.model_dump() if base is not None else {}
        fields.update(
            name=cand.name,
            version=cand.version or "candidate",
            artifact=stored,
            format=cand.format,
            model_class=cand.model_class,
            model_kwargs=dict(cand.model_kwargs),
            inputs=[t.model_dump() for t in signature.inputs],
            outputs=[t.model_dump() for t in signature.outputs],
            sha256=digest,
        )
        try:
            return ModelConfig.model_validate(fields)
        except ValueError as exc:
            raise RegistryError(f"cannot serve this version: {exc}") from None

    def _insert(
        self, actor: str, cand: Candidate, signature: Signature, digest: str, size: int
    ) -> VersionRow:
        for _ in range(3):
            try:
                with audit.audited(self.engine) as tx:
                    version = cand.version or self._next_version(tx.conn, cand.name)
                    values = {
                        "name": cand.name,
                        "version": version,
                        "format": cand.format,
                        "digest": digest,
                        "size_bytes": size,
                        "model_class": cand.model_class,
                        "model_kwargs": json.dumps(dict(cand.model_kwargs), sort_keys=True),
                        "signature": json.dumps(signature.as_json(), sort_keys=True),
                        "metrics": json.dumps(dict(cand.metrics), sort_keys=True),
                        "parent_version": cand.parent_version,
                        "source_uri": cand.source_uri,
                        "dataset_digest": cand.dataset_digest,
                        "code_revision": cand.code_revision,
                        "author": actor,
                        "stage": "registered",
                    }
                    tx.conn.execute(t_versions.insert().values(**values))
                    row = _row(
                        tx.conn.execute(
                            sa.select(t_versions).where(
                                t_versions.c.name == cand.name, t_versions.c.version == version
                            )
                        ).one()
                    )
                    tx.append(actor, "model.register", row.target, after=row.as_json())
                    return row
            except sa.exc.IntegrityError:
                if cand.version is not None:
                    raise VersionExistsError(
                        f"model {cand.name!r} already has a version {cand.version!r}; versions "
                        "are immutable, register a new one"
                    ) from None
        raise RegistryError("could not allocate a version number; try again")

    @staticmethod
    def _next_version(conn: sa.Connection, name: str) -> str:
        versions = conn.execute(
            sa.select(t_versions.c.version).where(t_versions.c.name == name)
        ).scalars()
        numbers = [int(v) for v in versions if v.isdigit()]
        return str(max(numbers, default=0) + 1)

    # -- config versions --------------------------------------------------------

    def register_config_models(
        self, models: Sequence[ModelConfig], metrics: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Record the config's versions (author ``config``) and give each model without a
        production version its newest config version as production.

        A config version whose artifact no longer matches the registered digest is an
        error: versions are immutable, so a changed artifact needs a new version label.
        """
        from serving import promotion

        for m in models:
            digest = file_digest(m.artifact)
            try:
                existing = self.get(m.name, m.version)
            except VersionNotFoundError:
                existing = None
            if existing is not None:
                if existing.digest != digest:
                    raise RegistryError(
                        f"config model {m.name}:{m.version}: the artifact {m.artifact} changed "
                        f"since it was registered (sha256 {existing.digest[:12]}... now "
                        f"{digest[:12]}...); give it a new version"
                    )
                continue
            cand = Candidate(
                name=m.name,
                artifact=m.artifact,
                format=m.format,
                signature=Signature.of(m),
                model_class=m.model_class,
                model_kwargs=m.model_kwargs,
                metrics=dict(metrics.get(f"{m.name}:{m.version}", {})),
                source_uri=str(m.artifact),
                version=m.version,
            )
            with contextlib.suppress(VersionExistsError):  # another process was first
                self._insert(CONFIG_AUTHOR, cand, Signature.of(m), *self._store(m))
        for name in dict.fromkeys(m.name for m in models):
            if self.production(name) is None:
                newest = [m for m in models if m.name == name][-1]
                promotion.Stages(self).set_config_production(name, newest.version)

    def _store(self, m: ModelConfig) -> tuple[str, int]:
        return store_artifact(m.artifact, self.state_dir, self.policy(m.name).max_artifact_bytes)


def _inherited_signature(parent: VersionRow | None, production: VersionRow | None) -> Signature:
    for source in (parent, production):
        if source is not None:
            return source.signature
    raise RegistryError(
        "no signature: give --input/--output (NAME:DATATYPE:DIMS), or a --parent or a "
        "production version to inherit it from"
    )
