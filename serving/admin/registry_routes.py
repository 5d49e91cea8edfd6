"""Admin API routes of the model registry: read, approve, reject, promote, roll back;
and of canary rollouts: start, status, pause, resume, promote, abort.

Registering stays a CLI command: it needs the artifact file on the machine that
runs the guardrails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from router._exceptions import InvalidArgument, NotFound
from router.admin import AdminRequest, AdminRoute, Conflict
from serving.admin.api import blocking
from serving.config import GatewayConfig
from serving.registry import ApprovalError, GuardrailRefused, Registry, StageError, Stages
from serving.rollout import NoRollout, RolloutError, Rollouts, RolloutSpec


def _reason(body: dict[str, Any], required: bool) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str) or (required and not reason.strip()):
        raise InvalidArgument("'reason' must be a non-empty string")
    return reason


def model_routes(engine: sa.Engine, state_dir: Path, config: GatewayConfig) -> list[AdminRoute]:
    registry = Registry(engine, state_dir, config)
    stages = Stages(registry)
    rollouts = Rollouts(stages)

    def conflict(fn: Any) -> Any:
        def wrapped(req: AdminRequest) -> Any:
            try:
                return fn(req)
            except NoRollout as exc:
                raise NotFound(str(exc)) from None
            except (ApprovalError, StageError, GuardrailRefused, RolloutError) as exc:
                raise Conflict(str(exc)) from None

        return wrapped

    def list_versions(req: AdminRequest) -> Any:
        return [r.as_json() for r in registry.list(req.query.get("name"))]

    def show(req: AdminRequest) -> Any:
        name, version = req.path_params["name"], req.path_params["version"]
        return {
            **registry.get(name, version).as_json(),
            "approvals": stages.approvals(name, version),
        }

    def lineage(req: AdminRequest) -> Any:
        chain = registry.lineage(req.path_params["name"], req.path_params["version"])
        return [r.as_json() for r in chain]

    def decide(decision: str) -> Any:
        @conflict
        def handler(req: AdminRequest) -> Any:
            row = stages.decide(
                req.principal.name,
                req.path_params["name"],
                req.path_params["version"],
                decision,
                _reason(req.body, required=True),
            )
            return row.as_json()

        return handler

    @conflict
    def promote(req: AdminRequest) -> Any:
        to = req.body.get("to")
        if to not in ("staging", "production"):
            raise InvalidArgument("'to' must be 'staging' or 'production'")
        row = stages.promote(
            req.principal.name, req.path_params["name"], req.path_params["version"], to
        )
        return row.as_json()

    @conflict
    def rollback(req: AdminRequest) -> Any:
        row = stages.rollback(
            req.principal.name, req.path_params["name"], _reason(req.body, required=False)
        )
        return row.as_json()

    @conflict
    def rollout_start(req: AdminRequest) -> Any:
        body = dict(req.body)
        version = body.pop("version", None)
        if not isinstance(version, str) or not version:
            raise InvalidArgument("'version' must name the candidate version")
        try:
            spec = RolloutSpec.model_validate(body)
        except ValueError as exc:
            raise InvalidArgument(f"invalid rollout settings: {exc}") from None
        ro = rollouts.start(req.principal.name, req.path_params["name"], version, spec)
        return ro.as_json()

    @conflict
    def rollout_status(req: AdminRequest) -> Any:
        ro = rollouts.get(req.path_params["name"])
        return {**ro.as_json(), "history": rollouts.history(ro.id)}

    def rollout_command(action: str) -> Any:
        @conflict
        def handler(req: AdminRequest) -> Any:
            reason = _reason(req.body, required=False)
            return rollouts.command(
                req.principal.name, req.path_params["name"], action, reason
            ).as_json()

        return handler

    rollout_routes = [
        AdminRoute(
            "POST",
            "/models/{name}/rollout",
            "models.promote",
            "Start a canary rollout of an approved version against production",
            blocking(rollout_start),
            body={
                "type": "object",
                "properties": {
                    "version": {"type": "string"},
                    "steps": {"type": "array", "items": {"type": "integer"}},
                    "interval_s": {"type": "number"},
                    "max_error_rate": {"type": "number"},
                    "max_p99_ratio": {"type": "number"},
                    "min_requests": {"type": "integer"},
                    "failure_threshold": {"type": "integer"},
                    "sticky": {"type": "string"},
                    "mirror_pct": {"type": "number"},
                    "min_agreement": {"type": "number"},
                },
                "required": ["version"],
            },
        ),
        AdminRoute(
            "GET",
            "/models/{name}/rollout",
            "models.read",
            "The model's rollout: step, weights, last analysis, history",
            blocking(rollout_status),
        ),
    ] + [
        AdminRoute(
            "POST",
            f"/models/{{name}}/rollout/{action}",
            "models.promote",
            text,
            blocking(rollout_command(action)),
            body={"type": "object", "properties": {"reason": {"type": "string"}}},
        )
        for action, text in (
            ("pause", "Hold the rollout's weights; no analysis"),
            ("resume", "Resume a paused rollout"),
            ("promote", "Make the candidate production now"),
            ("abort", "Send all traffic back to production and retire the candidate"),
        )
    ]

    version = "/models/{name}/versions/{version}"
    reason_body = {
        "type": "object",
        "properties": {"reason": {"type": "string"}},
        "required": ["reason"],
    }
    promote_body = {
        "type": "object",
        "properties": {"to": {"enum": ["staging", "production"]}},
        "required": ["to"],
    }
    return [
        AdminRoute(
            "GET",
            "/models",
            "models.read",
            "Registered versions and their stages",
            blocking(list_versions),
            query={"name": "only this model"},
        ),
        AdminRoute("GET", version, "models.read", "One version with its approvals", blocking(show)),
        AdminRoute(
            "GET",
            version + "/lineage",
            "models.read",
            "A version and its ancestors",
            blocking(lineage),
        ),
        AdminRoute(
            "POST",
            version + "/approve",
            "models.approve",
            "Approve a version (never its author)",
            blocking(decide("approve")),
            body=reason_body,
        ),
        AdminRoute(
            "POST",
            version + "/reject",
            "models.approve",
            "Reject a version (never its author)",
            blocking(decide("reject")),
            body=reason_body,
        ),
        AdminRoute(
            "POST",
            version + "/promote",
            "models.promote",
            "Move a version to staging or production",
            blocking(promote),
            body=promote_body,
        ),
        AdminRoute(
            "POST",
            "/models/{name}/rollback",
            "models.promote",
            "Bring back the previous production version",
            blocking(rollback),
            body={"type": "object", "properties": {"reason": {"type": "string"}}},
        ),
        *rollout_routes,
    ]
