"""Canary rollouts: their settings and durable state, and every change to them.

A rollout moves one model's default traffic from its production version to an
approved candidate in steps (e.g. 5, 25, 50, 100 %). The router applies the
current weights (router.canary). Every ``interval`` the gateway's controller
(serving.rollout.controller) compares candidate and production over the same
window (error rate, p99 latency ratio, shadow agreement, a minimum request count):

* **pass** advances one step; reaching 100 % promotes the candidate to production
  (the registry's promotion, guardrails re-checked); the driver then makes it the
  table's production version and drains the old one;
* **fail** counts; ``failure_threshold`` failures in a row send all traffic back to
  production, mark the rollout failed and retire the candidate (archived);
* **wait** (too few requests) keeps the window open for another interval.

Every decision, the controller's and the operators' (start, pause, resume, promote,
abort), is written with its figures to ``rollout_events`` and to the audit chain in
one transaction. The row is the state: a restarted gateway resumes at the same
step. Writers update the revision they read, so an operator's pause and the
controller's verdict never overwrite each other.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router.canary import Split
from serving.registry import GuardrailRefused, RegistryError, Stages
from serving.state import audit, utcnow
from serving.state import rollout_events as t_events
from serving.state import rollouts as t_rollouts

log = logging.getLogger(__name__)

CONTROLLER = "rollout-controller"  # the actor of the gateway's own decisions
LIVE_STATES = ("running", "paused")
STATES = (*LIVE_STATES, "succeeded", "failed", "aborted")


class RolloutError(RegistryError):
    """A rollout command that is not allowed now; the message says why."""


class NoRollout(RolloutError):
    """The model has no rollout (in progress, for a command)."""


class RolloutSpec(BaseModel):
    """How a rollout advances and what it checks (``gpugate rollout start`` flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # strict numbers: a JSON true is not 1 (an integer is still a float).
    steps: tuple[Annotated[int, Field(strict=True)], ...] = Field(
        default=(5, 25, 50, 100), description="candidate % per step"
    )
    interval_s: float = Field(default=60.0, gt=0, le=86400, strict=True)
    max_error_rate: float = Field(default=0.01, ge=0, le=1, strict=True)
    max_p99_ratio: float = Field(default=1.25, gt=0, strict=True)
    min_requests: int = Field(default=100, ge=1, strict=True)
    failure_threshold: int = Field(default=2, ge=1, strict=True)
    sticky: str | None = None
    mirror_pct: float = Field(default=0.0, ge=0, le=100, strict=True)
    min_agreement: float = Field(default=0.99, ge=0, le=1, strict=True)
    # A request's deadline expiry is the candidate's error only if the deadline was at
    # least this long: shorter deadlines are the client's choice, not the version's fault.
    min_deadline_ms: float = Field(default=1000.0, ge=0, le=3_600_000, strict=True)
    salt: str = Field(default_factory=lambda: secrets.token_hex(8))

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(not 0 <= s <= 100 for s in v):
            raise ValueError("steps are percentages in 0..100")
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError("steps must increase")
        v = v if v[-1] == 100 else (*v, 100)  # a rollout ends in promotion
        if len(v) < 2:
            raise ValueError("steps need one below 100 to analyse (use rollout promote to skip)")
        return v

    @model_validator(mode="after")
    def _zero_needs_mirror(self) -> RolloutSpec:
        if self.steps[0] == 0 and self.mirror_pct == 0:
            raise ValueError("a 0% step sends the candidate nothing: add --mirror PCT")
        return self

    @field_validator("sticky")
    @classmethod
    def _sticky(cls, v: str | None) -> str | None:
        if v in (None, "", "none"):
            return None
        if v == "tenant" or re.fullmatch(r"header:[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            return v if v == "tenant" else v.lower()
        raise ValueError("sticky must be 'tenant' or 'header:NAME'")


@dataclass(frozen=True)
class Rollout:
    id: int
    model: str
    candidate: str
    baseline: str
    state: str
    step: int
    spec: RolloutSpec
    failures: int
    last_analysis: dict[str, Any] | None
    revision: int
    created_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def weight(self) -> float:
        """The candidate's share of default traffic now."""
        if self.state == "succeeded":
            return 1.0
        if self.state in LIVE_STATES:
            return self.spec.steps[self.step] / 100
        return 0.0

    def split(self) -> Split:
        return Split(
            self.candidate,
            self.weight,
            self.spec.sticky,
            self.spec.mirror_pct / 100 if self.live else 0.0,
            self.spec.salt,
        )

    def as_json(self) -> dict[str, Any]:
        spec = self.spec.model_dump(mode="json", exclude={"salt"})
        return {
            "id": self.id,
            "model": self.model,
            "candidate": self.candidate,
            "production": self.baseline,
            "state": self.state,
            "step": self.step + 1,
            "steps": len(self.spec.steps),
            "weights": {self.baseline: round(1 - self.weight, 4), self.candidate: self.weight},
            "failures": self.failures,
            "settings": spec,
            "last_analysis": self.last_analysis,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


def _rollout(r: Any) -> Rollout:
    return Rollout(
        id=r.id,
        model=r.model,
        candidate=r.candidate,
        baseline=r.baseline,
        state=r.state,
        step=r.step,
        spec=RolloutSpec.model_validate_json(r.spec),
        failures=r.failures,
        last_analysis=json.loads(r.last_analysis) if r.last_analysis else None,
        revision=r.revision,
        created_by=r.created_by,
        created_at=audit._aware(r.created_at),
        updated_at=audit._aware(r.updated_at),
        finished_at=audit._aware(r.finished_at) if r.finished_at else None,
    )


# -- the store -----------------------------------------------------------------


class Rollouts:
    """Rollout rows: operators' commands (CLI, admin API) and the controller's verdicts."""

    def __init__(self, stages: Stages) -> None:
        self.stages = stages
        self.engine = stages.engine

    def get(self, model: str) -> Rollout:
        """The model's live rollout, else its latest one."""
        with self.engine.connect() as conn:
            r = conn.execute(
                sa.select(t_rollouts)
                .where(t_rollouts.c.model == model)
                .order_by(t_rollouts.c.id.desc())
                .limit(1)
            ).first()
        if r is None:
            raise NoRollout(f"model {model!r} has no rollout")
        return _rollout(r)

    def latest_each(self, states: Sequence[str] = ()) -> list[Rollout]:
        """Each model's live rollout, else its latest one, by model name; in ``states``
        only, if given."""
        latest = sa.select(sa.func.max(t_rollouts.c.id)).group_by(t_rollouts.c.model)
        query = sa.select(t_rollouts).where(t_rollouts.c.id.in_(latest))
        if states:
            query = query.where(t_rollouts.c.state.in_(list(states)))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(t_rollouts.c.model)).all()
        return [_rollout(r) for r in rows]

    def finished(self, start: datetime, end: datetime, states: Sequence[str]) -> list[Rollout]:
        """Rollouts that ended in ``[start, end)`` in one of ``states``, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t_rollouts)
                .where(
                    t_rollouts.c.state.in_(list(states)),
                    t_rollouts.c.finished_at >= audit._aware(start),
                    t_rollouts.c.finished_at < audit._aware(end),
                )
                .order_by(t_rollouts.c.finished_at, t_rollouts.c.id)
            ).all()
        return [_rollout(r) for r in rows]

    def by_ids(self, ids: Sequence[int]) -> list[Rollout]:
        """Live rollouts, and those of ``ids`` whatever their state."""
        cond: sa.ColumnElement[bool] = t_rollouts.c.active_model.is_not(None)
        if ids:
            cond = sa.or_(cond, t_rollouts.c.id.in_(list(ids)))
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t_rollouts).where(cond).order_by(t_rollouts.c.id)).all()
        return [_rollout(r) for r in rows]

    def history(self, rollout_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t_events)
                .where(t_events.c.rollout_id == rollout_id)
                .order_by(t_events.c.id)
            ).all()
        return [
            {
                "at": audit._aware(r.at).isoformat(),
                "actor": r.actor,
                "action": r.action,
                "step": r.step + 1,
                "weight": r.weight,
                "figures": json.loads(r.figures),
                "reason": r.reason,
            }
            for r in rows
        ]

    def start(self, actor: str, model: str, version: str, spec: RolloutSpec) -> Rollout:
        """Start a canary of an approved (or staging, or archived) version against
        production; it goes to staging (guardrails re-checked) to be deployed, in the
        transaction that records the rollout."""
        registry = self.stages.registry
        production = registry.production(model)
        target = f"rollout:{model}"
        problem = None
        if production is None:
            problem = f"model {model!r} has no production version to compare with"
        else:
            row = registry.get(model, version)
            if version == production.version:
                problem = f"{model}:{version} is already production"
            elif row.stage not in ("approved", "staging", "archived"):
                problem = (
                    f"{model}:{version} is {row.stage}; a rollout needs an approved version "
                    "(or one in staging or archived)"
                )
            elif self._live(model) is not None:
                problem = f"model {model!r} already has a rollout in progress"
        if problem is not None or production is None:
            problem = problem or "no production version"
            audit.append(self.engine, actor, "rollout.refused", target, reason=problem)
            raise RolloutError(problem)
        checked = None
        if row.stage != "staging":  # deployed beside production, no traffic until now
            checked = self.stages.check_promotion(actor, model, version, "staging")
        now = utcnow()
        try:
            with audit.audited(self.engine) as tx:
                if checked is not None:
                    self.stages.apply_promotion(tx, actor, checked, "staging")
                rid = tx.conn.execute(
                    t_rollouts.insert()
                    .values(
                        model=model,
                        candidate=version,
                        baseline=production.version,
                        state="running",
                        step=0,
                        spec=spec.model_dump_json(),
                        failures=0,
                        last_analysis=None,
                        revision=1,
                        created_by=actor,
                        created_at=now,
                        updated_at=now,
                        active_model=model,
                    )
                    .returning(t_rollouts.c.id)
                ).scalar_one()
                self._event(tx, rid, actor, "start", 0, spec.steps[0] / 100, None, "", model)
        except sa.exc.IntegrityError:
            # Another writer started one between our check and this insert.
            problem = f"model {model!r} already has a rollout in progress"
            audit.append(self.engine, actor, "rollout.refused", target, reason=problem)
            raise RolloutError(problem) from None
        return self.get(model)

    def _live(self, model: str) -> Rollout | None:
        with self.engine.connect() as conn:
            r = conn.execute(
                sa.select(t_rollouts).where(t_rollouts.c.active_model == model)
            ).first()
        return None if r is None else _rollout(r)

    def _event(
        self,
        tx: audit.Audit,
        rollout_id: int,
        actor: str,
        action: str,
        step: int,
        weight: float,
        figures: dict[str, Any] | None,
        reason: str,
        model: str,
        before: dict[str, Any] | None = None,
    ) -> None:
        tx.conn.execute(
            t_events.insert().values(
                rollout_id=rollout_id,
                at=utcnow(),
                actor=actor,
                action=action,
                step=step,
                weight=weight,
                figures=json.dumps(figures or {}),
                reason=reason,
            )
        )
        after: dict[str, Any] = {"rollout": rollout_id, "step": step + 1, "weight": weight}
        if figures:
            after["figures"] = figures
        tx.append(
            actor,
            f"rollout.{action}",
            f"rollout:{model}",
            before=before,
            after=after,
            reason=reason,
        )

    def _update(
        self,
        ro: Rollout,
        actor: str,
        action: str,
        *,
        figures: dict[str, Any] | None = None,
        reason: str = "",
        then: Callable[[audit.Audit], object] | None = None,
        **values: Any,
    ) -> bool:
        """Write one change and its event if the row is still at ``ro.revision``; ``then``
        runs in the same transaction (a stage change), so both happen or neither."""
        state = values.get("state", ro.state)
        step = values.get("step", ro.step)
        if state not in LIVE_STATES:
            values["active_model"] = None
            values["finished_at"] = utcnow()
        if figures is not None:
            values["last_analysis"] = json.dumps(figures)
        weight = {"succeeded": 1.0, "running": None, "paused": None}.get(state, 0.0)
        if weight is None:
            weight = ro.spec.steps[step] / 100
        with audit.audited(self.engine) as tx:
            done = tx.conn.execute(
                t_rollouts.update()
                .where(t_rollouts.c.id == ro.id, t_rollouts.c.revision == ro.revision)
                .values(revision=ro.revision + 1, updated_at=utcnow(), **values)
            ).rowcount
            if done:
                before = {"state": ro.state, "step": ro.step + 1}
                self._event(
                    tx, ro.id, actor, action, step, weight, figures, reason, ro.model, before
                )
                if then is not None:
                    then(tx)
        if not done:
            log.info("rollout %s: %s by %s lost to a newer change", ro.id, action, actor)
        return bool(done)

    def command(self, actor: str, model: str, action: str, reason: str = "") -> Rollout:
        """An operator's pause, resume, promote or abort of the model's live rollout."""
        allowed = {
            "pause": ("running",),
            "resume": ("paused",),
            "promote": LIVE_STATES,
            "abort": LIVE_STATES,
        }
        if action not in allowed:
            raise ValueError(f"unknown rollout action {action!r}")
        ro = self._live(model)
        if ro is None:
            raise NoRollout(f"model {model!r} has no rollout in progress")
        if ro.state not in allowed[action]:
            raise RolloutError(f"the rollout of {model!r} is {ro.state}; cannot {action} it")
        if action == "pause":
            ok = self._update(ro, actor, "pause", state="paused", reason=reason)
        elif action == "resume":
            ok = self._update(ro, actor, "resume", state="running", reason=reason)
        elif action == "promote":
            try:
                ok = self.finish_promoted(ro, actor, None, reason or "promoted by an operator")
            except (GuardrailRefused, RegistryError) as exc:
                # The operator asked for a promotion: say it was refused; the rollout
                # goes on as it was.
                raise RolloutError(f"promotion refused: {exc}") from None
        else:
            why = reason or "aborted by an operator"
            ok = self.finish_back(ro, actor, "abort", "aborted", None, why)
        if not ok:
            raise RolloutError(f"the rollout of {model!r} changed meanwhile; try again")
        return self.get(model)

    # -- transitions shared by operators and the controller ---------------------

    def advance(self, ro: Rollout, figures: dict[str, Any]) -> bool:
        return self._update(
            ro,
            CONTROLLER,
            "advance",
            figures=figures,
            step=ro.step + 1,
            failures=0,
            reason="analysis passed",
        )

    def verdict(
        self, ro: Rollout, action: str, figures: dict[str, Any], reason: str, failures: int
    ) -> bool:
        return self._update(
            ro, CONTROLLER, action, figures=figures, failures=failures, reason=reason
        )

    def finish_promoted(
        self, ro: Rollout, actor: str, figures: dict[str, Any] | None, reason: str
    ) -> bool:
        """Candidate to production and the rollout succeeded, in one transaction. A
        refused promotion (stage or guardrail) raises; the rollout is unchanged."""
        checked = self.stages.check_promotion(actor, ro.model, ro.candidate, "production")
        return self._update(
            ro,
            actor,
            "promote",
            figures=figures,
            state="succeeded",
            step=len(ro.spec.steps) - 1,
            reason=reason,
            then=lambda tx: self.stages.apply_promotion(tx, actor, checked, "production"),
        )

    def finish_back(
        self,
        ro: Rollout,
        actor: str,
        action: str,
        state: str,
        figures: dict[str, Any] | None,
        reason: str,
        failures: int | None = None,
    ) -> bool:
        """All traffic back to production and the candidate retired (archived), in one
        transaction."""
        extra: dict[str, Any] = {} if failures is None else {"failures": failures}
        why = f"rollout {ro.id} {state}"
        return self._update(
            ro,
            actor,
            action,
            figures=figures,
            state=state,
            reason=reason,
            then=lambda tx: self.stages.retire(tx, actor, ro.model, ro.candidate, why),
            **extra,
        )
