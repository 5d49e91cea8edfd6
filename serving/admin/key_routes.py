"""Admin routes of tenants' API keys: create, list, revoke and rotate (with a grace).

After a change, this gateway's key cache forgets every key at once; other gateways
follow within their cache's TTL. Endpoints are plain functions: FastAPI runs them in
its thread pool, since every store call blocks on the database.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Path

import serving.admin.schemas as schemas
from serving.admin.auth import Caller
from serving.admin.routing import AdminRoute, Services, route
from serving.admin.schemas import Name
from serving.tenancy import IssuedKey, KeyRow

router = APIRouter(route_class=AdminRoute)
TenantName = Annotated[Name, Path(description="A tenant's name.")]
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The key's id (keys list).")]


def api_key(k: KeyRow) -> schemas.ApiKey:
    return schemas.ApiKey.model_validate(k.as_json())


def _issued(made: IssuedKey) -> dict[str, object]:
    k = made.row
    return {
        "tenant": k.tenant,
        "key_id": k.id,
        "label": k.label,
        "api_key": made.api_key,
        "fingerprint": k.fingerprint,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
    }


@route(
    router,
    "GET",
    "/tenants/{name}/keys",
    "tenants.keys.list",
    "A tenant's API keys, revoked and expired ones too (never the keys themselves)",
)
def list_keys(name: TenantName, services: Services) -> list[schemas.ApiKey]:
    return [api_key(k) for k in services.keys.list(name)]


@route(
    router,
    "POST",
    "/tenants/{name}/keys",
    "tenants.keys.create",
    "Give a CLI tenant another API key (returned once), with a label and an optional expiry",
    status_code=201,
)
def create_key(
    name: TenantName,
    caller: Caller,
    services: Services,
    new: Annotated[schemas.NewKey | None, Body()] = None,
) -> schemas.IssuedKey:
    new = new or schemas.NewKey()
    made = services.keys.create(name, new.label, expires_at=new.deadline(), actor=caller.name)
    services.on_tenants_changed()
    return schemas.IssuedKey.model_validate(_issued(made))


@route(
    router,
    "POST",
    "/tenants/{name}/keys/{key_id}/revoke",
    "tenants.keys.revoke",
    "Refuse a key from now on (within seconds on every gateway)",
)
def revoke_key(
    name: TenantName,
    key_id: KeyId,
    caller: Caller,
    services: Services,
    revocation: Annotated[schemas.KeyRevocation | None, Body()] = None,
) -> schemas.ApiKey:
    reason = revocation.reason if revocation else ""
    row = services.keys.revoke(name, key_id, actor=caller.name, reason=reason)
    services.on_tenants_changed()
    return api_key(row)


@route(
    router,
    "POST",
    "/tenants/{name}/keys/{key_id}/rotate",
    "tenants.keys.rotate",
    "Issue a new key with the same label (returned once); the old one keeps working for "
    "the grace period, then is refused",
)
def rotate_key(
    name: TenantName,
    key_id: KeyId,
    caller: Caller,
    services: Services,
    rotation: Annotated[schemas.KeyRotation | None, Body()] = None,
) -> schemas.RotatedKey:
    rotation = rotation or schemas.KeyRotation()
    made, old = services.keys.rotate(
        name,
        key_id,
        grace=timedelta(seconds=rotation.grace_s),
        expires_at=rotation.deadline(),
        actor=caller.name,
    )
    services.on_tenants_changed()
    return schemas.RotatedKey.model_validate({**_issued(made), "old_key": api_key(old)})
