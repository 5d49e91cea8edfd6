"""Console pages of tenants: each tenant's weight, models, quotas, budget and spend, and
its keys' labels and expiry; admins create tenants and create, rotate and revoke keys. A
new key is shown once, on the page that answers the form, and never again."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from serving.console.api import Refused
from serving.console.web import Page, page

# Larger numbers in a form field are refused here; the API has its own, smaller bounds.
MAX_FIELD = 1e12


def _deleted(tenant: Mapping[str, Any]) -> bool:
    return bool(tenant["status"] == "deleted")


async def _budget(page: Page, tenant: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tenant's budget and spend, for roles that may read budgets (a deleted tenant
    has none)."""
    if not page.may("budgets.read") or _deleted(tenant):
        return None
    budget: dict[str, Any] = await page.get(f"/tenants/{tenant['tenant']}/budget")
    return budget


@page("/tenants")
async def tenants(page: Page) -> Response:
    listed = await page.get("/tenants", {"all": page.query("all") == "1"})
    budgets = {t["tenant"]: await _budget(page, t) for t in listed}
    return page.render(
        "tenants.html", tenants=listed, budgets=budgets, show_all=page.query("all") == "1"
    )


async def _tenant(page: Page, name: str, **extra: Any) -> Response:
    listed = await page.get("/tenants", {"all": True})
    tenant = next((t for t in listed if t["tenant"] == name), None)
    if tenant is None:
        raise Refused(404, f"no tenant {name!r}")
    return page.render(
        "tenant.html",
        t=tenant,
        quotas=None if _deleted(tenant) else await page.get(f"/tenants/{name}/quotas"),
        keys=await page.get(f"/tenants/{name}/keys") if page.may("tenants.keys.list") else None,
        budget=await _budget(page, tenant),
        **{"issued": None, "issued_label": "", **extra},
    )


@page("/tenants/{name}")
async def tenant(page: Page) -> Response:
    return await _tenant(page, page.request.path_params["name"])


def _models(text: str) -> list[str]:
    return [m.strip() for m in text.replace(",", " ").split() if m.strip()] or ["*"]


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or abs(value) > MAX_FIELD:
        raise Refused(400, f"{what} must be a number, not {text[:40]!r}")
    return value


@page("/tenants", ("POST",))
async def create_tenant(page: Page) -> Response:
    form = page.form
    body: dict[str, Any] = {
        "name": form.get("name", "").strip(),
        "weight": _number(form.get("weight", "1") or "1", "the weight"),
        "models": _models(form.get("models", "")),
    }
    made = await page.post("/tenants", body)
    return await _tenant(page, made["tenant"], issued=made["api_key"], issued_label="default")


def _expiry(form: Mapping[str, str]) -> dict[str, int]:
    days = (form.get("expires_in_days") or "").strip()
    if not days:
        return {}
    return {"expires_in_s": round(_number(days, "the expiry in days") * 86400)}


@page("/tenants/{name}/keys", ("POST",))
async def create_key(page: Page) -> Response:
    name = page.request.path_params["name"]
    body = {"label": page.form.get("label", "").strip() or "default", **_expiry(page.form)}
    made = await page.post(f"/tenants/{name}/keys", body)
    return await _tenant(page, name, issued=made["api_key"], issued_label=made["label"])


@page("/tenants/{name}/keys/{key_id}/rotate", ("POST",))
async def rotate_key(page: Page) -> Response:
    name, key_id = page.request.path_params["name"], page.request.path_params["key_id"]
    grace = round(_number(page.form.get("grace_s") or "0", "the grace"))
    body = {"grace_s": grace, **_expiry(page.form)}
    made = await page.post(f"/tenants/{name}/keys/{key_id}/rotate", body)
    return await _tenant(page, name, issued=made["api_key"], issued_label=made["label"])


@page("/tenants/{name}/keys/{key_id}/revoke", ("POST",))
async def revoke_key(page: Page) -> Response:
    name, key_id = page.request.path_params["name"], page.request.path_params["key_id"]
    await page.post(
        f"/tenants/{name}/keys/{key_id}/revoke", {"reason": page.form.get("reason", "").strip()}
    )
    return page.done(f"/tenants/{name}", f"Key {key_id} of {name} revoked.")


ROUTES = [tenants, create_tenant, tenant, create_key, rotate_key, revoke_key]
