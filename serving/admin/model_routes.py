"""Admin routes of the model registry: register (an artifact upload), read, approve,
reject, promote, roll back.

Registering streams the request body into a temporary file beside the artifact store:
counted against the model's ``max_artifact_bytes`` while it arrives, then checked
against the sha256 the sender declared; the guardrails and the smoke test then run
here, under the gateway's own policy, and the artifact is kept only if they pass.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool

import serving.admin.schemas as schemas
from serving.admin.auth import Caller
from serving.admin.routing import AdminRoute, Services, route
from serving.admin.schemas import Name
from serving.admin.services import AdminServices
from serving.registry import (
    ArtifactTooLarge,
    ArtifactUpload,
    Candidate,
    Registry,
    Signature,
    VersionRow,
    against_production,
    guardrail_refusals,
    parse_tensor,
)
from serving.tenancy import Principal

router = APIRouter(route_class=AdminRoute)
ModelName = Annotated[Name, Path(description="The model's name.")]
VersionName = Annotated[Name, Path(description="The version's label.")]
VERSION = "/models/{name}/versions/{version}"
_WRITE_BYTES = 1 << 20

_ARTIFACT_BODY = {
    "requestBody": {
        "required": True,
        "description": "The artifact's bytes, streamed.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _version(row: VersionRow) -> schemas.Version:
    return schemas.Version.model_validate(row.as_json())


# -- register ----------------------------------------------------------------------


def _metrics(pairs: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not key or not math.isfinite(number):
            raise ValueError(f"metric {pair!r} must be NAME=NUMBER (a finite number)")
        out[key] = number
    return out


def _kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"model_kwargs: {name} is not a JSON number")

    try:
        kwargs = json.loads(text, parse_constant=refuse_constant)
        json.dumps(kwargs, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"model_kwargs is not valid JSON text: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("model_kwargs must be a JSON object")
    return kwargs


def _candidate(name: str, query: schemas.NewVersion, artifact: ArtifactUpload) -> Candidate:
    if bool(query.input) != bool(query.output):
        raise ValueError("give both input and output tensors, or neither (to inherit them)")
    signature = (
        Signature(tuple(map(parse_tensor, query.input)), tuple(map(parse_tensor, query.output)))
        if query.input
        else None
    )
    return Candidate(
        name=name,
        artifact=artifact.path,
        format=query.format,
        signature=signature,
        model_class=query.model_class,
        model_kwargs=_kwargs(query.model_kwargs),
        metrics=_metrics(query.metric),
        parent_version=query.parent,
        source_uri=query.source,
        dataset_digest=query.dataset_digest,
        code_revision=query.code_revision,
        version=query.version,
    )


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() else None


async def _receive(request: Request, upload: ArtifactUpload) -> None:
    """Write the body into ``upload``, a few chunks at a time from a worker thread (the
    event loop also serves inference); raises ArtifactTooLarge at its limit. The HTTP
    server reads and drops the rest, so the sender still gets the answer."""
    declared = _declared_length(request)
    if declared is not None and declared > upload.max_bytes:
        raise ArtifactTooLarge(f"artifact is {declared} bytes; the limit is {upload.max_bytes}")
    pending = bytearray()
    async for chunk in request.stream():
        pending += chunk
        if len(pending) >= _WRITE_BYTES:
            await run_in_threadpool(upload.write, bytes(pending))
            pending.clear()
    await run_in_threadpool(upload.write, bytes(pending))


def _register(
    services: AdminServices,
    caller: Principal,
    cand: Candidate,
    upload: ArtifactUpload,
    sha256: str,
) -> VersionRow:
    upload.finish(sha256)
    return services.registry.register_upload(caller.name, cand, upload)


@route(
    router,
    "POST",
    "/models/{name}/versions",
    "models.register",
    "Register a new version: upload its artifact; the guardrails run here",
    status_code=201,
    openapi_extra=_ARTIFACT_BODY,
)
async def register_version(
    name: ModelName,
    query: Annotated[schemas.NewVersion, Query()],
    request: Request,
    caller: Caller,
    services: Services,
) -> schemas.Version:
    policy = services.registry.policy(name)
    with ArtifactUpload(services.registry.state_dir, policy.max_artifact_bytes) as upload:
        cand = _candidate(name, query, upload)
        try:
            await _receive(request, upload)
        except ArtifactTooLarge as exc:
            target = Registry.target(name, query.version)
            await run_in_threadpool(services.registry.refuse, caller.name, target, exc, "register")
            raise
        row = await run_in_threadpool(_register, services, caller, cand, upload, query.sha256)
    return _version(row)


# -- read --------------------------------------------------------------------------


@route(router, "GET", "/models", "models.read", "Registered versions and their stages")
def list_versions(
    services: Services,
    name: Annotated[Name | None, Query(description="Only this model's versions.")] = None,
    stage: Annotated[
        schemas.Stage | None,
        Query(description="Only versions in this stage (registered: awaiting approval)."),
    ] = None,
) -> list[schemas.Version]:
    return [_version(r) for r in services.registry.list(name, stage)]


@route(
    router,
    "GET",
    VERSION,
    "models.read",
    "One version with its approvals, its standing against production and its guardrail refusals",
)
def show_version(name: ModelName, version: VersionName, services: Services) -> schemas.VersionCard:
    row = services.registry.get(name, version)
    return schemas.VersionCard.model_validate(
        {
            **services.stages.cards([row])[0],
            "against_production": against_production(services.registry, row),
            "guardrail_refusals": guardrail_refusals(services.engine, targets=[row.target]),
        }
    )


@route(router, "GET", VERSION + "/lineage", "models.read", "A version and its ancestors")
def version_lineage(
    name: ModelName, version: VersionName, services: Services
) -> list[schemas.Version]:
    return [_version(r) for r in services.registry.lineage(name, version)]


# -- decide, promote, roll back ----------------------------------------------------


@route(router, "POST", VERSION + "/approve", "models.approve", "Approve (never one's own)")
def approve_version(
    name: ModelName,
    version: VersionName,
    decision: schemas.Decision,
    caller: Caller,
    services: Services,
) -> schemas.Version:
    row = services.stages.decide(caller.name, name, version, "approve", decision.reason)
    return _version(row)


@route(router, "POST", VERSION + "/reject", "models.approve", "Reject (never one's own)")
def reject_version(
    name: ModelName,
    version: VersionName,
    decision: schemas.Decision,
    caller: Caller,
    services: Services,
) -> schemas.Version:
    row = services.stages.decide(caller.name, name, version, "reject", decision.reason)
    return _version(row)


@route(
    router,
    "POST",
    VERSION + "/promote",
    "models.promote",
    "Move a version to staging or production",
)
def promote_version(
    name: ModelName,
    version: VersionName,
    promotion: schemas.Promotion,
    caller: Caller,
    services: Services,
) -> schemas.Version:
    return _version(services.stages.promote(caller.name, name, version, promotion.to))


@route(
    router,
    "POST",
    "/models/{name}/rollback",
    "models.promote",
    "Bring back the previous production version",
)
def roll_back(
    name: ModelName, caller: Caller, services: Services, note: schemas.Note | None = None
) -> schemas.Version:
    reason = note.reason if note is not None else ""
    return _version(services.stages.rollback(caller.name, name, reason))
