"""Bodies of rollouts: starting one, its settings, state and history, and the query of
every model's rollouts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from serving.admin.schemas.common import Name, Strict
from serving.rollout import RolloutSpec

RolloutState = Literal["running", "paused", "succeeded", "failed", "aborted", "live"]


class NewRollout(RolloutSpec):
    """A rollout's candidate version and its settings (see ``gpugate rollout start``)."""

    model_config = ConfigDict(allow_inf_nan=False)

    version: Name
    sticky: Annotated[str, StringConstraints(max_length=200)] | None = None


class RolloutSettings(BaseModel):
    steps: list[int]
    interval_s: float
    max_error_rate: float
    max_p99_ratio: float
    min_requests: int
    failure_threshold: int
    sticky: str | None
    mirror_pct: float
    min_agreement: float
    min_deadline_ms: float = Field(
        description="A deadline expiry counts as an error only for deadlines at least this long."
    )


class Rollout(BaseModel):
    id: int
    model: str
    candidate: str
    production: str
    state: str
    step: int = Field(description="1-based.")
    steps: int
    weights: dict[str, float] = Field(description="Version -> share of default traffic.")
    failures: int
    settings: RolloutSettings
    last_analysis: dict[str, Any] | None = Field(
        description="The figures of the last analysis: each version's requests, errors, "
        "p99, the shadow comparison, each check with its value and limit."
    )
    created_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class RolloutEvent(BaseModel):
    at: datetime
    actor: str
    action: str
    step: int
    weight: float = Field(description="The candidate's share after the event.")
    figures: dict[str, Any] | None
    reason: str


class RolloutStatus(Rollout):
    history: list[RolloutEvent]


class RolloutsQuery(Strict):
    state: RolloutState | None = Field(
        default=None,
        description="Only rollouts in this state (live: running or paused).",
    )
