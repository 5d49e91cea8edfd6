"""What every console page shares: the signed-in session, the admin API as that user, the
templates, the CSRF check of forms, and how refusals are shown.

A page is an ``async def handler(page: Page) -> Response`` declared with :func:`page`.
Before it runs, the session cookie is checked (no session: GET pages redirect to the
sign-in form, anything else gets 401); a POST must be a URL-encoded form whose ``csrf``
field is the session's token (else 403, nothing done). A :class:`Refused` answer of the
admin API becomes the error page with the API's status and message, so a role that may
not act learns why, in the words the API uses for the CLI.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from serving.console.api import AdminApi, Params, Refused
from serving.tenancy import Principal, Session, SessionStore, permits

SESSION_COOKIE = "gpugate_session"
# Sent by console.js when it fetches the live part of a page (``data-live``).
FRAGMENT_HEADER = "x-console-fragment"
MAX_FORM_BYTES = 64 * 1024
TEMPLATES = Path(__file__).parent / "templates"

# The areas of the console, in the navigation's order: (label, path, action to see it).
AREAS: tuple[tuple[str, str, str], ...] = (
    ("Overview", "/", "overview.read"),
    ("Models", "/models", "models.read"),
    ("Approvals", "/approvals", "models.read"),
    ("Rollouts", "/rollouts", "models.read"),
    ("Costs", "/costs", "costs.read"),
    ("Tenants", "/tenants", "tenants.list"),
    ("Audit", "/audit", "audit.read"),
)


@dataclass
class Console:
    """The console's parts, one per app (``request.app.state.console``)."""

    sessions: SessionStore
    api: AdminApi
    secure_cookies: bool = False  # Secure cookies and HSTS on plain HTTP (TLS ends before)
    templates: jinja2.Environment = field(
        default_factory=lambda: jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
    )

    def render(self, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        text = self.templates.get_template(name).render(**context)
        return HTMLResponse(text, status_code=code)


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def root_of(request: Request) -> str:
    """Where the console is mounted (``/console``)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


@dataclass
class Page:
    """One request of a signed-in user."""

    request: Request
    session: Session
    console: Console
    form: Mapping[str, str] = field(default_factory=dict)

    @property
    def user(self) -> Principal:
        return self.session.principal

    @property
    def root(self) -> str:
        return root_of(self.request)

    def may(self, action: str) -> bool:
        """Whether the user's role may do ``action``: what the page offers. The admin
        API decides what is done."""
        return permits(self.user, action)

    def query(self, name: str, default: str = "") -> str:
        return self.request.query_params.get(name, default)

    async def get(self, path: str, params: Params | None = None) -> Any:
        return await self.console.api.get(self.user, path, params)

    async def post(self, path: str, body: Any = None, params: Params | None = None) -> Any:
        return await self.console.api.post(self.user, path, body, params)

    def url(self, path: str, **params: str | int | None) -> str:
        query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
        return f"{self.root}{path}" + (f"?{query}" if query else "")

    def render(self, template: str, code: int = 200, **context: Any) -> HTMLResponse:
        areas = [(label, path) for label, path, action in AREAS if self.may(action)]
        return self.console.render(template, code, page=self, areas=areas, q=quote, **context)

    def done(self, path: str, message: str) -> RedirectResponse:
        """After an action: back to ``path`` (303, so a reload does not repeat it), with
        ``message`` shown there."""
        sep = "&" if "?" in path else "?"
        query = urlencode({"done": message, "seal": self._seal(message)})
        return RedirectResponse(f"{self.root}{path}{sep}{query}", 303)

    @property
    def notice(self) -> str:
        """The message of the action that led here, if this session's :meth:`done` sent
        it: a link made elsewhere cannot put its words in the console's mouth."""
        message = self.query("done")
        sealed = hmac.compare_digest(self.query("seal").encode(), self._seal(message).encode())
        return message if message and sealed else ""

    def _seal(self, message: str) -> str:
        mac = hmac.new(self.session.csrf.encode(), message.encode(), hashlib.sha256)
        return mac.hexdigest()[:32]


Handler = Callable[[Page], Awaitable[Response]]


def page(path: str, methods: tuple[str, ...] = ("GET",)) -> Callable[[Handler], Route]:
    """Declare a console page or action at ``path`` (relative to the console)."""

    def declare(handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            console = console_of(request)
            secret = request.cookies.get(SESSION_COOKIE)
            session = await run_in_threadpool(console.sessions.get, secret)
            if session is None:
                return _signed_out(request, expired=bool(secret))
            form: dict[str, str] = {}
            if request.method == "POST":
                parsed = await _form(request)
                if parsed is None:
                    return _error(
                        console,
                        request,
                        session,
                        400,
                        "expected a form of at most "
                        f"{MAX_FORM_BYTES} bytes (application/x-www-form-urlencoded)",
                    )
                if not session.csrf_matches(parsed.get("csrf")):
                    return _error(
                        console,
                        request,
                        session,
                        403,
                        "the form's CSRF token is "
                        "missing or not this session's: reload the page and try again",
                    )
                form = parsed
            current = Page(request, session, console, form)
            try:
                response = await handler(current)
            except Refused as refused:
                if FRAGMENT_HEADER in request.headers:  # the live part of a page: a message
                    return _alert(refused.message, refused.status)
                return current.render(
                    "error.html", refused.status, status=refused.status, message=refused.message
                )
            response.headers.setdefault("cache-control", "no-store")
            return response

        endpoint.__name__ = handler.__name__
        return Route(path, endpoint, methods=list(methods))

    return declare


async def _form(request: Request) -> dict[str, str] | None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        return None
    return {k: v[0] for k, v in fields.items()}


def _signed_out(request: Request, *, expired: bool) -> Response:
    root = root_of(request)
    if request.method == "GET" and FRAGMENT_HEADER not in request.headers:
        target = f"{root}/login?" + urlencode(
            {"next": request.url.path, **({"expired": "1"} if expired else {})}
        )
        response: Response = RedirectResponse(target, 303)
    else:
        message = "your session has expired: sign in again" if expired else "sign in first"
        response = _alert(message, 401)
    if expired:
        response.delete_cookie(SESSION_COOKIE, path=root or "/")
    return response


def _alert(message: str, status: int) -> HTMLResponse:
    """A refusal as console.js shows it above a page's live part, in place of its update."""
    return HTMLResponse(f'<p class="error" role="alert">{html.escape(message)}</p>', status)


def _error(
    console: Console, request: Request, session: Session, status: int, message: str
) -> Response:
    current = Page(request, session, console)
    return current.render("error.html", status, status=status, message=message)
