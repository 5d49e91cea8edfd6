"""Admin API routes of the model registry: read, approve, reject, promote, roll back.

Registering stays a CLI command: it needs the artifact file on the machine that
runs the guardrails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from router._exceptions import InvalidArgument
from router.admin import AdminRequest, AdminRoute, Conflict
from serving.admin_api import blocking
from serving.config import GatewayConfig
from serving.promotion import ApprovalError, StageError, Stages
from serving.registry import GuardrailRefused, Registry


def _reason(body: dict[str, Any], required: bool) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str) or (required and not reason.strip()):
        raise InvalidArgument("'reason' must be a non-empty string")
    return reason


def model_routes(engine: sa.Engine, state_dir: Path, config: GatewayConfig) -> list[AdminRoute]:
    registry = Registry(engine, state_dir, config)
    stages = Stages(registry)

    def conflict(fn: Any) -> Any:
        def wrapped(req: AdminRequest) -> Any:
            try:
                return fn(req)
            except (ApprovalError, StageError, GuardrailRefused) as exc:
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
    ]
