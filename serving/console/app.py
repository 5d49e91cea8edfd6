"""The web console's ASGI app, mounted at ``/console`` on the gateway's HTTP port.

Server-rendered pages (Jinja2) with a small script of our own for live parts; charts
are SVG drawn on the server. Signing in exchanges a user token for a session cookie
(HttpOnly, SameSite=Strict, Secure under TLS, with the session's expiry); every page
then calls the admin API in-process as that user (serving.console.api), so the console
can do exactly what the user's role may do through the API, and no more.

Every answer carries a Content-Security-Policy that allows no inline script or style
and nothing from another origin.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import serving.console.audit_pages as audit_pages
import serving.console.cost_pages as cost_pages
import serving.console.model_pages as model_pages
import serving.console.overview as overview
import serving.console.rollout_pages as rollout_pages
import serving.console.tenant_pages as tenant_pages
from serving.console.api import AdminApi
from serving.console.web import SESSION_COOKIE, Console, _form, console_of, root_of
from serving.tenancy import SessionStore

LOGIN_COOKIE = "gpugate_login"
STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}
HSTS = "max-age=31536000"  # a year; only where the browser reached the console over TLS


def _secure(request: Request) -> bool:
    """Whether the browser reached the console over TLS: the gateway's own, or a
    balancer's in front of it (``server.console.secure_cookies``)."""
    return request.url.scheme == "https" or console_of(request).secure_cookies


def _safe_next(request: Request, target: str | None) -> str:
    """Where to go after signing in: a page of this console, never another site."""
    root = root_of(request)
    if target and target.startswith(f"{root}/") and not target.startswith("//"):
        return target
    return f"{root}/"


def _login_page(
    request: Request, code: int, *, next_page: str, message: str = "", notice: str = ""
) -> Response:
    """The sign-in form, with a fresh login CSRF token in it and in its cookie."""
    token = secrets.token_urlsafe(24)
    response = console_of(request).render(
        "login.html",
        code,
        root=root_of(request),
        login_csrf=token,
        next=next_page,
        message=message,
        notice=notice,
    )
    _set_cookie(request, response, LOGIN_COOKIE, token, max_age=600)
    response.headers["cache-control"] = "no-store"
    return response


async def login_form(request: Request) -> Response:
    query = request.query_params
    return _login_page(
        request,
        200,
        next_page=query.get("next", ""),
        message="Your session has expired: sign in again." if query.get("expired") == "1" else "",
        notice="Signed out." if query.get("signed_out") == "1" else "",
    )


async def login(request: Request) -> Response:
    console = console_of(request)
    form = await _form(request) or {}
    next_page = form.get("next", "")
    sent, expected = form.get("login_csrf", ""), request.cookies.get(LOGIN_COOKIE, "")
    if not sent or not expected or not secrets.compare_digest(sent, expected):
        message = "The sign-in form expired: reload it and try again."
        return _login_page(request, 403, next_page=next_page, message=message)
    opened = await run_in_threadpool(console.sessions.open, form.get("token", ""))
    if opened is None:
        message = (
            "Unknown, disabled or expired user token. Sign in with a user token "
            "(gpugate users create prints it); a tenant's API key cannot sign in."
        )
        return _login_page(request, 401, next_page=next_page, message=message)
    response = RedirectResponse(_safe_next(request, next_page), 303)
    left = (opened.session.expires_at - datetime.now(UTC)) // timedelta(seconds=1)
    _set_cookie(request, response, SESSION_COOKIE, opened.secret, max_age=max(1, int(left)))
    response.delete_cookie(LOGIN_COOKIE, path=root_of(request) or "/")
    return response


async def logout(request: Request) -> Response:
    """Sign out: the session is deleted on the server, then the cookie in the browser. A
    cross-site form cannot reach here with the cookie (SameSite=Strict), and the form
    must carry the session's CSRF token."""
    console = console_of(request)
    secret = request.cookies.get(SESSION_COOKIE)
    session = await run_in_threadpool(console.sessions.get, secret)
    form = await _form(request) or {}
    if session is not None and not session.csrf_matches(form.get("csrf")):
        return Response("the form's CSRF token is not this session's", 403)
    who = session.principal.name if session is not None else None
    await run_in_threadpool(lambda: console.sessions.close(secret, signed_out_by=who))
    root = root_of(request)
    response = RedirectResponse(f"{root}/login?" + urlencode({"signed_out": "1"}), 303)
    response.delete_cookie(SESSION_COOKIE, path=root or "/")
    return response


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=root_of(request) or "/",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


class _Headers:
    """Adds the security headers to every answer of the console, and HSTS over TLS."""

    def __init__(self, app: ASGIApp, secure_cookies: bool) -> None:
        self.app = app
        self.secure_cookies = secure_cookies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = SECURITY_HEADERS
        if scope.get("scheme") == "https" or self.secure_cookies:
            headers = {**headers, "strict-transport-security": HSTS}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [
                    (k.encode(), v.encode())
                    for k, v in headers.items()
                    if k.encode() not in present
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def console_app(admin: ASGIApp, sessions: SessionStore, *, secure_cookies: bool = False) -> ASGIApp:
    """The console over ``admin`` (the admin API's app) with ``sessions``;
    ``secure_cookies``: TLS ends before the gateway (a balancer's)."""
    routes: list[BaseRoute] = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        *overview.ROUTES,
        *model_pages.ROUTES,
        *rollout_pages.ROUTES,
        *cost_pages.ROUTES,
        *tenant_pages.ROUTES,
        *audit_pages.ROUTES,
    ]
    app = Starlette(routes=routes)
    app.state.console = Console(sessions, AdminApi(admin), secure_cookies)
    return _Headers(app, secure_cookies)
