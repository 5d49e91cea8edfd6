"""A gateway's admin API and web console on one real socket, over a real state database,
and a browser's part done by hand (cookies, form fields)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.routing import Mount

from serving.admin import AdminServices, admin_app
from serving.config import CostsConfig, GatewayConfig
from serving.console import console_app
from serving.costs import Pricing
from serving.tenancy import SessionStore, UserStore, ensure_admin
from tests.integration.serving.admin.server import AdminServer


class Console:
    """The admin API and the console on one uvicorn socket; ``browser()`` is a client
    with a cookie jar of its own."""

    def __init__(self, engine: sa.Engine, state: Path, *, secure_cookies: bool = False) -> None:
        services = AdminServices.open(engine, state, GatewayConfig(), Pricing(CostsConfig()))
        admin = admin_app(services)
        sessions = SessionStore(engine, services.directory, ttl=timedelta(hours=1))
        self.engine = engine
        self.app = Starlette(
            routes=[
                Mount("/admin", app=admin),
                Mount("/console", app=console_app(admin, sessions, secure_cookies=secure_cookies)),
            ]
        )
        self.admin_token = ensure_admin(UserStore(engine), state)
        self.users = UserStore(engine)

    def browser(self, server: AdminServer) -> httpx.Client:
        return httpx.Client(base_url=server.url, timeout=60, follow_redirects=False)


def field(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found, f"no {name} field"
    return found.group(1)


def sign_in(browser: httpx.Client, token: str) -> httpx.Response:
    form = browser.get("/console/login")
    assert form.status_code == 200
    return browser.post(
        "/console/login",
        data={"login_csrf": field(form.text, "login_csrf"), "token": token, "next": ""},
    )
