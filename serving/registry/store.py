"""The model registry: immutable versions with lineage, in content-addressed storage.

``register_upload`` runs the guardrails (serving.registry.guardrails) on an uploaded
artifact, files it under ``state_dir/artifacts/sha256/<digest>`` once they all passed,
and records the version with its signature, metrics, lineage, author and time, audited
in the same transaction. Nothing but the stage columns of a version ever changes;
stages and approvals live in serving.registry.stages. Opening a registry removes the
temporary files of uploads abandoned over an hour ago.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import serving.registry.guardrails as guardrails
from serving.config import NAME_PATTERN, GatewayConfig, ModelConfig, ModelPolicy
from serving.registry.artifacts import (
    ArtifactUpload,
    artifact_path,
    file_digest,
    store_artifact,
    sweep_incoming,
)
from serving.registry.guardrails import SmokeLimits
from serving.registry.versions import (
    CONFIG_AUTHOR,
    Candidate,
    GuardrailRefused,
    RegistryError,
    Signature,
    VersionExistsError,
    VersionNotFoundError,
    VersionRow,
    version_from_row,
)
from serving.state import audit
from serving.state import model_versions as t_versions


class Registry:
    """Reads and writes model versions. Blocking; call from a thread in async code."""

    def __init__(
        self,
        engine: sa.Engine,
        state_dir: Path,
        config: GatewayConfig,
        smoke_limits: SmokeLimits | None = None,
    ) -> None:
        self.engine = engine
        self.state_dir = state_dir
        self.config = config
        self.smoke_limits = smoke_limits or SmokeLimits()
        sweep_incoming(state_dir)

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
        return version_from_row(r)

    def list(self, name: str | None = None, stage: str | None = None) -> builtins.list[VersionRow]:
        """Versions by model name, then oldest first; of ``name`` and in ``stage`` only if
        given (``registered``: the versions awaiting approval)."""
        query = sa.select(t_versions).order_by(t_versions.c.name, t_versions.c.id)
        if name is not None:
            query = query.where(t_versions.c.name == name)
        if stage is not None:
            query = query.where(t_versions.c.stage == stage)
        with self.engine.connect() as conn:
            return [version_from_row(r) for r in conn.execute(query).all()]

    def production(self, name: str) -> VersionRow | None:
        found = [v for v in self.list(name) if v.stage == "production"]
        return found[0] if found else None

    def in_service(self, names: Collection[str] | None = None) -> builtins.list[VersionRow]:
        """The versions in production or staging of the models ``names`` (None: of every
        model), by model name, then oldest first. As many as the gateways deploy."""
        query = (
            sa.select(t_versions)
            .where(t_versions.c.stage.in_(("production", "staging")))
            .order_by(t_versions.c.name, t_versions.c.id)
        )
        if names is not None:
            query = query.where(t_versions.c.name.in_(sorted(names)))
        with self.engine.connect() as conn:
            return [version_from_row(r) for r in conn.execute(query).all()]

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

    def register_upload(self, actor: str, cand: Candidate, upload: ArtifactUpload) -> VersionRow:
        """Check and record a new version whose artifact arrived as ``upload``, finished
        (size-capped, its sender's digest checked); a refusal is audited and raised.

        Every guardrail runs on the upload's own file (``cand.artifact`` is not read), and
        the bytes are filed under their digest only once all of them passed, so a refused
        artifact leaves nothing in the store.
        """
        target = self.target(cand.name, cand.version)
        try:
            if not NAME_PATTERN.fullmatch(cand.name):
                raise ValueError(f"model name {cand.name!r} must match {NAME_PATTERN.pattern}")
            if cand.version is not None and not NAME_PATTERN.fullmatch(cand.version):
                raise ValueError(f"version {cand.version!r} must match {NAME_PATTERN.pattern}")
            policy = self.policy(cand.name)
            digest = upload.digest
            guardrails.check_format(upload.path, cand.format)
            parent = self.get(cand.name, cand.parent_version) if cand.parent_version else None
            production = self.production(cand.name)
            signature = cand.signature or _inherited_signature(parent, production)
            guardrails.check_payload(upload.path, cand.format)
            if production is not None:
                guardrails.check_signature(signature, production.signature)
                guardrails.check_metrics(dict(cand.metrics), production.metrics, policy)
            config = self._candidate_config(cand, signature, upload.path, digest)
            guardrails.smoke_test(config, policy, self.smoke_limits)
            # The smoke test ran the candidate's code, which could write to the file.
            guardrails.check_digest(upload.path, digest)
        except GuardrailRefused as exc:
            self.refuse(actor, target, exc, "register")
            raise
        digest, size = upload.store()
        return self._insert(actor, cand, signature, digest, size)

    @staticmethod
    def target(name: str, version: str | None) -> str:
        """The audit target of a registration (``new`` while the version is not chosen)."""
        return f"model:{name}:{version or 'new'}"

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
                    row = version_from_row(
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
        """Record the config's versions (author ``config``); see
        :meth:`Stages.adopt_config_models`, which also gives them production.

        A registered row of a config version must be the config's own: written by
        ``config``, with the same artifact bytes and every declared field equal. Anything
        else is an error naming the field, so nobody can pre-empt a config version (and
        with it production) by registering its name and version first; versions are
        immutable, so a changed declaration needs a new version label.
        """
        for m in models:
            digest = file_digest(m.artifact)
            try:
                existing = self.get(m.name, m.version)
            except VersionNotFoundError:
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
                try:
                    self._insert(CONFIG_AUTHOR, cand, Signature.of(m), *self._store(m))
                    continue
                except VersionExistsError:  # another writer was first: check theirs
                    existing = self.get(m.name, m.version)
            _check_config_row(m, digest, existing)

    def _store(self, m: ModelConfig) -> tuple[str, int]:
        return store_artifact(m.artifact, self.state_dir, self.policy(m.name).max_artifact_bytes)


def _check_config_row(m: ModelConfig, digest: str, row: VersionRow) -> None:
    """RegistryError naming the first field in which ``row`` is not config version ``m``."""
    where = f"config model {m.name}:{m.version}"
    if row.digest != digest:
        raise RegistryError(
            f"{where}: the artifact {m.artifact} changed since it was registered (sha256 "
            f"{row.digest[:12]}... now {digest[:12]}...); give it a new version"
        )
    declared: dict[str, tuple[object, object]] = {
        "author": (row.author, CONFIG_AUTHOR),
        "format": (row.format, m.format),
        "model_class": (row.model_class, m.model_class),
        "model_kwargs": (row.model_kwargs, dict(m.model_kwargs)),
        "signature": (row.signature.as_json(), Signature.of(m).as_json()),
        "parent_version": (row.parent_version, None),
        "dataset_digest": (row.dataset_digest, None),
        "code_revision": (row.code_revision, None),
    }
    for name, (registered, wanted) in declared.items():
        if registered != wanted:
            raise RegistryError(
                f"{where}: the registry's row has {name}={registered!r} where the config "
                f"declares {wanted!r}; it was not written from this config. Give the config "
                "version a new label, or remove the row's version from the registry"
            )


def _inherited_signature(parent: VersionRow | None, production: VersionRow | None) -> Signature:
    for source in (parent, production):
        if source is not None:
            return source.signature
    raise RegistryError(
        "no signature: give --input/--output (NAME:DATATYPE:DIMS), or a --parent or a "
        "production version to inherit it from"
    )
