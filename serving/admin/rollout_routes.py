"""Admin routes of canary rollouts: start, status, and the operators' pause, resume,
promote and abort."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

import serving.admin.schemas as schemas
from serving.admin.auth import Caller
from serving.admin.routing import AdminRoute, Services, route
from serving.admin.schemas import Name
from serving.rollout import Rollout, RolloutSpec

router = APIRouter(route_class=AdminRoute)
ModelName = Annotated[Name, Path(description="The model's name.")]
ROLLOUT = "/models/{name}/rollout"


def _rollout(ro: Rollout) -> schemas.Rollout:
    return schemas.Rollout.model_validate(ro.as_json())


@route(
    router,
    "POST",
    ROLLOUT,
    "models.promote",
    "Start a canary rollout of an approved version against production",
)
def start_rollout(
    name: ModelName, new: schemas.NewRollout, caller: Caller, services: Services
) -> schemas.Rollout:
    spec = RolloutSpec.model_validate(new.model_dump(exclude={"version"}))
    return _rollout(services.rollouts.start(caller.name, name, new.version, spec))


@route(
    router,
    "GET",
    ROLLOUT,
    "models.read",
    "The model's rollout: step, weights, last analysis, history",
)
def rollout_status(name: ModelName, services: Services) -> schemas.RolloutStatus:
    ro = services.rollouts.get(name)
    return schemas.RolloutStatus.model_validate(
        {**ro.as_json(), "history": services.rollouts.history(ro.id)}
    )


def _command(action: str, summary: str) -> None:
    def command(
        name: ModelName, caller: Caller, services: Services, note: schemas.Note | None = None
    ) -> schemas.Rollout:
        reason = note.reason if note is not None else ""
        return _rollout(services.rollouts.command(caller.name, name, action, reason))

    command.__name__ = f"{action}_rollout"  # the operation's id in the OpenAPI description
    route(router, "POST", f"{ROLLOUT}/{action}", "models.promote", summary)(command)


for _action, _summary in (
    ("pause", "Hold the rollout's weights; no analysis"),
    ("resume", "Resume a paused rollout"),
    ("promote", "Make the candidate production now"),
    ("abort", "Send all traffic back to production and retire the candidate"),
):
    _command(_action, _summary)
