"""The admin API's auth, role checks, error form and OpenAPI, with a fake user backend."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

from router.admin import AdminRequest, AdminRoute, Conflict, Principal, build_admin_app

ROLES = {"costs.read": ["admin", "finance"], "users.create": ["admin"]}
TOKENS = {"t-admin": Principal("root", "admin"), "t-fin": Principal("fiona", "finance")}


class FakeBackend:
    async def authenticate(self, token: str) -> Principal | None:
        return TOKENS.get(token)

    def permits(self, principal: Principal, action: str) -> bool:
        return principal.role in ROLES.get(action, [])

    def roles_for(self, action: str) -> Sequence[str]:
        return ROLES.get(action, [])


async def costs(req: AdminRequest) -> Any:
    return {"who": req.principal.name, "since": req.query.get("since")}


async def create(req: AdminRequest) -> Any:
    if req.body.get("name") == "dup":
        raise Conflict("user 'dup' already exists")
    return {"created": req.body["name"]}


class Client:
    """Synchronous calls into the ASGI app in memory (the app under test is real)."""

    def __init__(self) -> None:
        routes = [
            AdminRoute("GET", "/costs", "costs.read", "Costs", costs, query={"since": "ISO time"}),
            AdminRoute("POST", "/users", "users.create", "Create", create, status=201, body={}),
        ]
        self.app = build_admin_app(FakeBackend(), routes)

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.request(method, url, **kw)

        return asyncio.run(go())

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def delete(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", url, **kw)


def client() -> Client:
    return Client()


def test_token_and_role_are_checked_before_the_handler() -> None:
    c = client()
    r = c.get("/costs")
    assert r.status_code == 401 and "missing token" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert c.get("/costs", headers={"Authorization": "Basic x"}).status_code == 401
    assert c.get("/costs", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = c.get("/costs?since=2026", headers={"Authorization": "Bearer t-fin"})
    assert ok.status_code == 200 and ok.json() == {"who": "fiona", "since": "2026"}
    denied = c.post("/users", json={"name": "x"}, headers={"Authorization": "Bearer t-fin"})
    assert denied.status_code == 403
    assert denied.json() == {
        "error": "user 'fiona' (role finance) may not users.create; needs admin"
    }


def test_bodies_and_errors_keep_the_error_form() -> None:
    c = client()
    auth = {"Authorization": "Bearer t-admin"}
    made = c.post("/users", json={"name": "ann"}, headers=auth)
    assert made.status_code == 201 and made.json() == {"created": "ann"}
    assert c.post("/users", json={"name": "dup"}, headers=auth).status_code == 409
    bad = c.post("/users", content=b"{nope", headers=auth)
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
    assert c.post("/users", content=b"[1]", headers=auth).status_code == 400
    assert c.post("/users", content=b"x" * 70_000, headers=auth).status_code == 413
    assert c.get("/nope", headers=auth).json() == {"error": "no admin route /nope"}
    assert c.delete("/costs", headers=auth).status_code == 405


def test_openapi_describes_routes_and_roles() -> None:
    spec = client().get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    get_costs = spec["paths"]["/admin/costs"]["get"]
    assert "roles: admin, finance" in get_costs["description"]
    assert get_costs["parameters"][0]["name"] == "since"
    assert "requestBody" in spec["paths"]["/admin/users"]["post"]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
