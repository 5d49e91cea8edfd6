"""Approvals with separation of duties, and stage changes.

registered --(N distinct approvers, never the author)--> approved
approved | archived --promote--> staging (deployed, no tenant traffic)
staging --promote--> production (the previous production is archived)
rollback: production -> archived, and the version that was production before it
comes back. registered | approved --reject--> rejected (final).
staging --retire--> archived (e.g. a canary that a rollout sent back).

Every change and every refusal is audited in the transaction that makes it.
Promotions re-run the guardrails that depend on the stored bytes or on what is
in production at that moment (digest, signature, metrics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

import serving.registry.guardrails as guardrails
from serving.config import ModelConfig
from serving.registry.artifacts import artifact_path
from serving.registry.store import Registry
from serving.registry.versions import (
    CONFIG_AUTHOR,
    ApprovalError,
    GuardrailRefused,
    StageError,
    VersionNotFoundError,
    VersionRow,
    version_from_row,
)
from serving.state import approvals as t_approvals
from serving.state import audit, utcnow
from serving.state import model_versions as t_versions
from serving.state import rollouts as t_rollouts

_PROMOTE_FROM = {"staging": ("approved", "archived"), "production": ("staging",)}


class Stages:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.engine = registry.engine

    def _locked_row(self, tx: audit.Audit, name: str, version: str) -> VersionRow:
        r = tx.conn.execute(
            sa.select(t_versions).where(t_versions.c.name == name, t_versions.c.version == version)
        ).first()
        if r is None:
            raise VersionNotFoundError(f"model {name!r} has no registered version {version!r}")
        return version_from_row(r)

    def _refuse(self, actor: str, target: str, action: str, reason: str) -> None:
        audit.append(
            self.engine, actor, "model.refused", target, after={"during": action}, reason=reason
        )

    # -- approvals --------------------------------------------------------------

    def decide(self, actor: str, name: str, version: str, decision: str, reason: str) -> VersionRow:
        """Record an approval or rejection; returns the version afterwards."""
        if decision not in ("approve", "reject"):
            raise ValueError(f"decision must be approve or reject, got {decision!r}")
        if not reason.strip():
            raise ApprovalError("a reason is required (--reason)")
        target = f"model:{name}:{version}"
        required = self.registry.policy(name).required_approvals
        problem: str | None = None
        with audit.audited(self.engine) as tx:
            row = self._locked_row(tx, name, version)
            if row.author == actor:
                problem = f"{actor!r} is the author of {name}:{version} and may not {decision} it"
            elif row.stage not in ("registered", "approved") or (
                decision == "approve" and row.stage != "registered"
            ):
                allowed = "registered" if decision == "approve" else "registered or approved"
                problem = f"{name}:{version} is {row.stage}; only a {allowed} version can be "
                problem += f"{decision}d"
            elif tx.conn.execute(
                sa.select(t_approvals.c.id).where(
                    t_approvals.c.name == name,
                    t_approvals.c.version == version,
                    t_approvals.c.approver == actor,
                )
            ).first():
                problem = f"{actor!r} has already decided on {name}:{version}"
            if problem is None:
                tx.conn.execute(
                    t_approvals.insert().values(
                        name=name,
                        version=version,
                        approver=actor,
                        decision=decision,
                        reason=reason,
                    )
                )
                approvers = tx.conn.execute(
                    sa.select(sa.func.count()).where(
                        t_approvals.c.name == name,
                        t_approvals.c.version == version,
                        t_approvals.c.decision == "approve",
                    )
                ).scalar_one()
                stage = row.stage
                if decision == "reject":
                    stage = "rejected"
                elif approvers >= required:
                    stage = "approved"
                after: dict[str, Any] = {
                    "stage": stage,
                    "approvals": approvers,
                    "required": required,
                }
                tx.append(
                    actor,
                    f"model.{decision}",
                    target,
                    before={"stage": row.stage},
                    after=after,
                    reason=reason,
                )
                if stage != row.stage:
                    self._set_stage(tx.conn, name, version, stage)
        if problem is not None:
            self._refuse(actor, target, decision, problem)
            raise ApprovalError(problem)
        return self.registry.get(name, version)

    def approvals(self, name: str, version: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t_approvals)
                .where(t_approvals.c.name == name, t_approvals.c.version == version)
                .order_by(t_approvals.c.id)
            ).all()
        return [_approval(r) for r in rows]

    def cards(self, rows: Sequence[VersionRow]) -> list[dict[str, Any]]:
        """Each version's model card: the version as registered (signature, metrics,
        lineage) with its approvals and their reasons, in one query for all of them. The
        admin API's version and a tenant's own view (``GET /tenant``) both show this."""
        wanted = {(r.name, r.version) for r in rows}
        found: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in wanted}
        if wanted:
            with self.engine.connect() as conn:
                approvals = conn.execute(
                    sa.select(t_approvals)
                    .where(sa.tuple_(t_approvals.c.name, t_approvals.c.version).in_(wanted))
                    .order_by(t_approvals.c.id)
                ).all()
            for r in approvals:
                found[(r.name, r.version)].append(_approval(r))
        return [{**row.as_json(), "approvals": found[(row.name, row.version)]} for row in rows]

    # -- stages -----------------------------------------------------------------

    def promote(self, actor: str, name: str, version: str, to: str) -> VersionRow:
        if to == "production":
            self._refuse_during_rollout(actor, name, f"model:{name}:{version}", "promote")
        row = self.check_promotion(actor, name, version, to)
        with audit.audited(self.engine) as tx:
            self.apply_promotion(tx, actor, row, to)
        return self.registry.get(name, version)

    def check_promotion(self, actor: str, name: str, version: str, to: str) -> VersionRow:
        """Stage and guardrail checks of a promotion (refusals audited); the row checked."""
        if to not in _PROMOTE_FROM:
            raise ValueError(f"promote to staging or production, not {to!r}")
        target = f"model:{name}:{version}"
        row = self.registry.get(name, version)
        if row.stage not in _PROMOTE_FROM[to]:
            problem = (
                f"{name}:{version} is {row.stage}; only a version that is "
                f"{' or '.join(_PROMOTE_FROM[to])} can go to {to}"
            )
            self._refuse(actor, target, f"promote:{to}", problem)
            raise StageError(problem)
        try:
            self._recheck(row)
        except GuardrailRefused as exc:
            self.registry.refuse(actor, target, exc, f"promote:{to}")
            raise
        return row

    def apply_promotion(self, tx: audit.Audit, actor: str, row: VersionRow, to: str) -> None:
        """The stage change of a checked promotion, in the caller's transaction."""
        name, version = row.name, row.version
        current = self._locked_row(tx, name, version)
        if current.stage != row.stage:
            raise StageError(f"{name}:{version} changed stage concurrently; try again")
        before = {"stage": current.stage}
        if to == "production":
            old = self._production_in(tx.conn, name)
            if old is not None:
                self._set_stage(tx.conn, name, old, "archived")
                before["previous_production"] = old
            self._set_stage(tx.conn, name, version, "production", promoted=True)
        else:
            self._set_stage(tx.conn, name, version, "staging")
        tx.append(actor, f"model.promote.{to}", row.target, before=before, after={"stage": to})

    def _refuse_during_rollout(self, actor: str, name: str, target: str, action: str) -> None:
        """Production changes while a rollout runs would pull its baseline away."""
        with self.engine.connect() as conn:
            live = conn.execute(
                sa.select(t_rollouts.c.candidate).where(t_rollouts.c.active_model == name)
            ).scalar()
        if live is not None:
            problem = (
                f"model {name!r} has a rollout of version {live} in progress; use "
                "'gpugate rollout promote' or 'gpugate rollout abort'"
            )
            self._refuse(actor, target, action, problem)
            raise StageError(problem)

    def rollback(self, actor: str, name: str, reason: str = "") -> VersionRow:
        """Bring back the version that was production before the current one."""
        target = f"model:{name}"
        self._refuse_during_rollout(actor, name, target, "rollback")
        with audit.audited(self.engine) as tx:
            current = self._production_in(tx.conn, name)
            any_version = sa.select(t_versions.c.version).where(t_versions.c.name == name)
            if current is None and tx.conn.execute(any_version.limit(1)).first() is None:
                # Nothing of that name to refuse (nor a name the audit log could hold).
                raise VersionNotFoundError(f"no model {name!r} is registered")
            previous = tx.conn.execute(
                sa.select(t_versions.c.version)
                .where(
                    t_versions.c.name == name,
                    t_versions.c.stage == "archived",
                    t_versions.c.promoted_at.is_not(None),
                )
                .order_by(t_versions.c.promoted_at.desc())
                .limit(1)
            ).scalar()
            if current is None or previous is None:
                problem = f"model {name!r} has no earlier production version to roll back to"
            else:
                problem = None
                # The rolled-back version loses its place in the history, so a second
                # rollback goes further back instead of toggling.
                self._set_stage(tx.conn, name, current, "archived", clear_promoted=True)
                self._set_stage(tx.conn, name, previous, "production")
                tx.append(
                    actor,
                    "model.rollback",
                    target,
                    before={"production": current},
                    after={"production": previous},
                    reason=reason,
                )
        if problem is not None or previous is None:
            self._refuse(actor, target, "rollback", problem or "no previous version")
            raise StageError(problem or "no previous version")
        return self.registry.get(name, previous)

    def retire(self, tx: audit.Audit, actor: str, name: str, version: str, reason: str) -> bool:
        """Take a staging version out of service (archived; it can be promoted to staging
        again), in the caller's transaction; False if it was not in staging."""
        row = self._locked_row(tx, name, version)
        if row.stage != "staging":
            return False
        self._set_stage(tx.conn, name, version, "archived")
        tx.append(
            actor,
            "model.retire",
            row.target,
            before={"stage": "staging"},
            after={"stage": "archived"},
            reason=reason,
        )
        return True

    def adopt_config_models(
        self, models: Sequence[ModelConfig], metrics: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Record the config's versions (author ``config``) and give each model without a
        production version its newest config version as production."""
        self.registry.register_config_models(models, metrics)
        for name in dict.fromkeys(m.name for m in models):
            if self.registry.production(name) is None:
                newest = [m for m in models if m.name == name][-1]
                self.set_config_production(name, newest.version)

    def set_config_production(self, name: str, version: str) -> None:
        """First start with a config model: its newest config version serves."""
        with audit.audited(self.engine) as tx:
            if self._production_in(tx.conn, name) is not None:
                return
            self._set_stage(tx.conn, name, version, "production", promoted=True)
            tx.append(
                CONFIG_AUTHOR,
                "model.promote.production",
                f"model:{name}:{version}",
                before={"stage": "registered"},
                after={"stage": "production"},
                reason="declared in the config file",
            )

    def _recheck(self, row: VersionRow) -> None:
        guardrails.check_digest(artifact_path(self.registry.state_dir, row.digest), row.digest)
        production = self.registry.production(row.name)
        if production is not None and production.version != row.version:
            guardrails.check_signature(row.signature, production.signature)
            guardrails.check_metrics(
                row.metrics, production.metrics, self.registry.policy(row.name)
            )

    @staticmethod
    def _production_in(conn: sa.Connection, name: str) -> str | None:
        found: str | None = conn.execute(
            sa.select(t_versions.c.version).where(
                t_versions.c.name == name, t_versions.c.stage == "production"
            )
        ).scalar()
        return found

    @staticmethod
    def _set_stage(
        conn: sa.Connection,
        name: str,
        version: str,
        stage: str,
        *,
        promoted: bool = False,
        clear_promoted: bool = False,
    ) -> None:
        values: dict[str, Any] = {"stage": stage, "stage_changed_at": utcnow()}
        if promoted:
            values["promoted_at"] = utcnow()
        if clear_promoted:
            values["promoted_at"] = None
        conn.execute(
            t_versions.update()
            .where(t_versions.c.name == name, t_versions.c.version == version)
            .values(**values)
        )


def _approval(r: Any) -> dict[str, Any]:
    return {
        "approver": r.approver,
        "decision": r.decision,
        "reason": r.reason,
        "at": audit._aware(r.at).isoformat(),
    }
